"""The console script: every command's --help, the eval command, and errors for bad usage."""

import json
import subprocess

import pytest

from miles_fsdp.cli import COMMANDS
from miles_fsdp.models.testing import build_tiny_checkpoint


def _cli(*args, timeout=300):
    return subprocess.run(["miles-fsdp", *args], capture_output=True, text=True, timeout=timeout)


def test_top_level_help_lists_every_command():
    out = _cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help(name):
    out = _cli(name, "--help", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: miles-fsdp " + name in out.stdout


def test_unknown_command_and_bad_flag():
    out = _cli("trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr
    bad = _cli("eval", "--model", "x", "--data", "y", "--no-such-flag", "1")
    assert bad.returncode != 0


def test_eval_command(tmp_path):
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", "qwen3")
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "label": str(i + 1)}) + "\n" for i in range(6)))
    out = _cli("eval", "--model", str(ckpt), "--data", str(data), "--max-new-tokens", "4",
               "--n-samples", "2", "--temperature", "1.0", "--out", str(tmp_path / "m.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["eval/num_prompts"] == 6 and 0.0 <= m["eval/pass@2"] <= 1.0 and "eval/pass@1" in m
    missing = _cli("eval", "--model", str(tmp_path / "nope"), "--data", str(data))
    assert missing.returncode != 0 and "nope" in missing.stderr
