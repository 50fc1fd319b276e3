"""A user's mistake (missing model, data or tokenizer, a malformed line, an unknown reward)
prints one message naming the file and the fix, and exits 1; a bug keeps its traceback."""

import json
import shutil
import subprocess
import sys

import pytest

from miles_fsdp import cli
from miles_fsdp.errors import UserError
from miles_fsdp.models.testing import build_tiny_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_errors")
    ckpt = build_tiny_checkpoint(root / "ckpt", "qwen3")
    no_config = root / "no_config"
    shutil.copytree(ckpt, no_config)
    (no_config / "config.json").unlink()
    no_tok = build_tiny_checkpoint(root / "no_tok", "qwen3", tokenizer=False)
    (root / "d.jsonl").write_text(json.dumps({"prompt": "a", "label": "b"}) + "\n")
    (root / "bad.jsonl").write_text(json.dumps({"prompt": "a", "label": "b"}) + '\n{"prompt": oops}\n')
    return root, ckpt, no_config, no_tok


def _rl(root, model, data="d.jsonl", *extra):
    return ["rl", "--model", str(model), "--data.path", str(root / data), "--rollout.max-new-tokens", "4",
            "--run-dir", str(root / f"run{abs(hash((str(model), data, extra)))}"), *extra]


@pytest.mark.parametrize("case, expect", [
    ("missing model", r"missing_model: not a directory"),
    ("no config.json", r"no_config/config.json: not found"),
    ("no tokenizer", r"no_tok: no tokenizer files"),
    ("missing data", r"nofile.jsonl: no such file"),
    ("malformed line", r"bad.jsonl:2: malformed JSON"),
    ("unknown reward", r"unknown reward 'nosuch'"),
])
def test_user_errors_print_one_message(files, case, expect):
    import re

    root, ckpt, no_config, no_tok = files
    args = {
        "missing model": _rl(root, root / "missing_model"),
        "no config.json": _rl(root, no_config),
        "no tokenizer": _rl(root, no_tok),
        "missing data": _rl(root, ckpt, "nofile.jsonl"),
        "malformed line": _rl(root, ckpt, "bad.jsonl"),
        "unknown reward": _rl(root, ckpt, "d.jsonl", "--rollout.reward", "nosuch"),
    }[case]
    out = subprocess.run([sys.executable, "-m", "miles_fsdp.cli", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("miles-fsdp rl: error:")]
    assert len(errors) == 1 and re.search(expect, errors[0]), out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_a_bug_keeps_its_traceback_and_a_user_error_does_not(monkeypatch, capsys, tmp_path):
    import miles_fsdp.commands.convert as convert

    def user_mistake(cfg):
        raise type("SomeFileError", (UserError, ValueError), {})("x.jsonl:3: bad line; fix it")

    monkeypatch.setattr(convert, "main", user_mistake)
    args = ["convert", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]
    assert cli.main(args) == 1
    assert capsys.readouterr().err.strip() == "miles-fsdp convert: error: x.jsonl:3: bad line; fix it"

    def bug(cfg):
        raise KeyError("internal")

    monkeypatch.setattr(convert, "main", bug)
    with pytest.raises(KeyError):
        cli.main(args)
