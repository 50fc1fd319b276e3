"""`miles-fsdp quickstart`: the whole framework end to end on a laptop CPU, in a few minutes.

    data (reverse-a-word task, noisy demonstrations)     run_dir/data/*.jsonl
    tokenizer + tiny Qwen3 from scratch (HF format)      run_dir/init
    stage 1: SFT on the demonstrations                   run_dir/sft   (exported to sft/hf)
    stage 2: GRPO, true on-policy, exact-match reward    run_dir/rl    (metrics, tensorboard, hf)
    eval on the held-out split before, during and after RL; summary table + run_dir/summary.json
    the MTP draft: trained in SFT and online in RL; the final eval with speculation on vs off
    (speedup, mean accepted length, outputs identical)

Every stage goes through the paths real models use: HF checkpoint directories, jsonl data
in the user format, the trainer, the engine, the RL loop. See
miles_fsdp/quickstart/task.py for why RL can fix what SFT learned.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from miles_fsdp.data.datasets import DataConfig, PromptDataset
from miles_fsdp.data.tokenizer import load_tokenizer
from miles_fsdp.engine.sequence import Request, SamplingParams
from miles_fsdp.engine.spec_compare import compare_speculation
from miles_fsdp.quickstart.model import write_tiny_model
from miles_fsdp.quickstart.presets import engine_config, quickstart_preset, rl_config, sft_config
from miles_fsdp.quickstart.task import write_task
from miles_fsdp.rl.loop import run_rl
from miles_fsdp.rl.run import build_engine
from miles_fsdp.train.run_dir import prepare_run_dir
from miles_fsdp.train.sft import train_sft


@dataclass
class QuickstartConfig:
    run_dir: str = "runs/quickstart"
    """Where data, checkpoints, metrics, tensorboard logs and summary.json go."""
    short: bool = False
    """A smaller run (~1.5 min) that checks the pipeline and that RL improves the model, e.g. in CI."""
    seed: int = 0
    """Seeds data, initialisation and sampling: the same seed gives the same run."""
    sft_steps: int = 0
    """SFT optimizer steps (0 = the preset's)."""
    rl_steps: int = 0
    """RL steps (0 = the preset's)."""
    num_speculative_tokens: int = 2
    """Draft tokens per step of RL's rollouts and evals; the MTP draft trains in SFT and online
    in RL, and the final eval runs with speculation on and off. 0 = no draft."""
    overwrite: bool = False
    """Start over in a run_dir that holds an earlier quickstart (it is moved aside to RUN_DIR.old-<time>)."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default, at most the CPUs this process may use)."""

    def __post_init__(self):
        if self.sft_steps < 0 or self.rl_steps < 0:
            raise ValueError("QuickstartConfig.sft_steps / rl_steps must be >= 0 (0 = preset)")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"--num-speculative-tokens {self.num_speculative_tokens}: must be >= 0 (0 = no draft)")


def main(cfg: QuickstartConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    run = prepare_run_dir(cfg.run_dir, False, cfg.overwrite, None, "--run-dir")
    p = quickstart_preset(cfg.short, cfg.seed)
    p.sft_steps = cfg.sft_steps or p.sft_steps
    p.rl_steps = cfg.rl_steps or p.rl_steps
    p.spec_tokens = cfg.num_speculative_tokens
    write_task(run / "data", p.task)
    init_dir = write_tiny_model(run / "init", p.model)
    _say(f"data in {run / 'data'}, fresh tiny Qwen3 in {init_dir}")

    train_sft(sft_config(p, init_dir, run / "data", run / "sft"))
    t_sft = time.perf_counter() - t0
    if not (run / "sft" / "hf" / "config.json").is_file():  # SIGTERM/SIGINT stopped SFT early
        _say(f"SFT stopped before its last step (interrupted?); its checkpoint is in {run / 'sft' / 'checkpoints'}. "
             "Rerun with --overwrite to start over.")
        return 1
    summary = run_rl(rl_config(p, run / "sft" / "hf", run / "data", run / "rl"))
    rows = _eval_rows(run / "rl")
    spec = _speculation(p, run) if p.spec_tokens else None
    out = {
        "sft_accuracy": rows[0][1] if rows else None,
        "rl_accuracy": rows[-1][1] if rows else None,
        "logprob_abs_diff_max": summary["logprob_abs_diff_max"],
        "wall_seconds": time.perf_counter() - t0,
        "sft_seconds": t_sft,
        "sft_steps": p.sft_steps,
        "rl_steps": p.rl_steps,
        "accuracy_by_rl_step": rows,
        "mean_accept_length": spec["mean_accept_length"] if spec else None,
        "speculation": spec,
        "run_dir": str(run),
        "tensorboard": str(run / "rl" / "tb"),
        "hf_checkpoint": str(run / "rl" / "hf"),
    }
    (run / "summary.json").write_text(json.dumps(out, indent=2))
    _table(out)
    if spec and not spec["outputs_identical"]:
        _say("speculative decoding changed the eval's outputs: a bug, please report it with summary.json")
        return 1
    return 0


def _speculation(p, run: Path) -> dict:
    """The held-out eval (greedy) on the final model with speculation on vs off."""
    hf = run / "rl" / "hf"
    tokenizer = load_tokenizer(str(hf))
    data = PromptDataset(DataConfig(path=str(run / "data" / "heldout.jsonl"), shuffle=False), tokenizer.tokenize_prompt)
    prompts = data.next_batch(min(len(data), p.eval_prompts))
    requests = [Request(s.prompt_ids, SamplingParams(temperature=0.0, max_new_tokens=8)) for s in prompts]
    out = compare_speculation(
        lambda k: build_engine(str(hf), tokenizer, engine_config(p, k), torch.float32, torch.device("cpu")),
        requests, p.spec_tokens, repeats=3)
    _say(f"eval with speculation (K={p.spec_tokens}): {out['speedup']:.2f}x the tokens/s without, "
         f"{out['mean_accept_length']:.2f} tokens per step, outputs identical: {out['outputs_identical']}")
    return out


def _eval_rows(rl_dir: Path) -> list[tuple[int, float]]:
    from miles_fsdp.observe.metrics import read_metrics
    return [(r["step"], r["eval/accuracy"]) for r in read_metrics(rl_dir) if "eval/accuracy" in r]


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def _table(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="miles-fsdp quickstart", show_header=False)
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    t.add_row("held-out accuracy after SFT", pct(s["sft_accuracy"]))
    t.add_row("held-out accuracy after RL", pct(s["rl_accuracy"]))
    t.add_row("steps (SFT / RL)", f"{s['sft_steps']} / {s['rl_steps']}")
    t.add_row("wall time", f"{s['wall_seconds']:.0f} s")
    t.add_row("train/logprob_abs_diff_max (whole run)", repr(s["logprob_abs_diff_max"]))
    if s["speculation"]:
        sp = s["speculation"]
        t.add_row(f"draft mean accept length (K={sp['k']})", f"{sp['mean_accept_length']:.2f} tokens / step")
        t.add_row("eval speedup, speculation on / off", f"{sp['speedup']:.2f}x (outputs identical: "
                  f"{'yes' if sp['outputs_identical'] else 'NO'})")
    t.add_row("run directory", s["run_dir"])
    t.add_row("tensorboard", f"tensorboard --logdir {s['tensorboard']}")
    t.add_row("exported HF checkpoint", s["hf_checkpoint"])
    t.add_row("curves", f"python tools/plot_run.py {Path(s['run_dir']) / 'rl'}")
    Console().print(t)
