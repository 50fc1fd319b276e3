"""OpenMP wait defaults and thread caps (miles_fsdp/threads.py): what keeps the quickstart
fast when another process is busy, and never overrides what the user set."""

import os
import subprocess
import sys
import textwrap

import torch

from miles_fsdp import threads


def test_configure_env_fills_defaults_only():
    env = {}
    assert threads.configure_env(env) == threads.WAIT_DEFAULTS and env == threads.WAIT_DEFAULTS
    env = {"GOMP_SPINCOUNT": "300000"}
    threads.configure_env(env)
    assert env["GOMP_SPINCOUNT"] == "300000" and env["KMP_BLOCKTIME"] == threads.WAIT_DEFAULTS["KMP_BLOCKTIME"]
    env = {"OMP_WAIT_POLICY": "ACTIVE"}  # a spin count would override the user's policy
    assert threads.configure_env(env) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_cli_sets_wait_env_before_the_command_imports_torch(tmp_path):
    (tmp_path / "probe_cmd.py").write_text(textwrap.dedent("""
        import os, sys
        from dataclasses import dataclass
        SEEN = (os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules)

        @dataclass
        class Config:
            x: int = 0

        def main(cfg):
            print(SEEN)
    """))
    script = ("import sys; from miles_fsdp import cli; "
              "cli.COMMANDS['probe'] = ('probe_cmd', 'Config', ''); sys.exit(cli.main(['probe']))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}  # no GOMP_SPINCOUNT from outside
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr((threads.WAIT_DEFAULTS["GOMP_SPINCOUNT"], False))


def test_fit_torch_threads_caps_unless_the_user_set_a_count(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "available_cpus", lambda: 1)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.fit_torch_threads() == 2  # the user's count stays
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        assert threads.fit_torch_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_available_cpus_within_affinity():
    assert 1 <= threads.available_cpus() <= len(os.sched_getaffinity(0))
