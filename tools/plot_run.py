"""Plot a run's curves: `python tools/plot_run.py RUN_DIR` -> RUN_DIR/plots.png.

Reads RUN_DIR/metrics.jsonl (one JSON object per step, key `step`, written by
`miles_fsdp.observe.metrics.MetricsLogger`) and draws one panel per group below. A panel
whose metrics are all absent is skipped with a note; non-finite values (written as the
strings "nan"/"inf") are left out of the line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# panel title -> metric names drawn in it (exact names, or a prefix ending in "*")
PANELS = {
    "reward": ["rollout/reward_mean"],
    "accuracy": ["eval/accuracy", "eval/pass@*"],
    "response length (tokens)": ["rollout/response_len_mean", "eval/response_len_mean"],
    "train/rollout log-prob diff (max abs)": ["train/logprob_abs_diff_max"],
    "loss": ["train/loss"],
    "phase time (s)": ["time/*"],
}


class PlotError(ValueError):
    """A run directory or metrics file that cannot be plotted."""


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: not found; pass the run directory that holds metrics.jsonl")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise PlotError(f"{path}:{lineno}: expected a JSON object with a 'step' key")
        rows.append(row)
    if not rows:
        raise PlotError(f"{path}: no rows; the run has not logged a step yet")
    return rows


def series(rows: list[dict], name: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, rows without it or with a non-finite value left out."""
    xs, ys = [], []
    for row in rows:
        v = row.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(row["step"])
            ys.append(float(v))
    return xs, ys


def panel_metrics(rows: list[dict], patterns: list[str]) -> list[str]:
    names = sorted({k for row in rows for k in row})
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in names if n.startswith(pat[:-1])] if pat.endswith("*") else [pat] if pat in names else []
        out += [n for n in hits if n not in out]
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, list[str]]:
    """Render the panels; returns (png path, notes about skipped panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_rows(run_dir)
    drawn, notes = [], []
    for title, patterns in PANELS.items():
        names = [n for n in panel_metrics(rows, patterns) if series(rows, n)[0]]
        if names:
            drawn.append((title, names))
        else:
            notes.append(f"skipped '{title}': no {', '.join(patterns)} in metrics.jsonl")
    if not drawn:
        raise PlotError(f"{run_dir / 'metrics.jsonl'}: none of the plotted metrics are present ({notes})")
    cols = 2 if len(drawn) > 1 else 1
    nrows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.2 * nrows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, drawn):
        for name in names:
            ax.plot(*series(rows, name), label=name, marker="." if len(series(rows, name)[0]) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "plots.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output image (default RUN_DIR/plots.png)")
    args = parser.parse_args(argv)
    try:
        out, notes = plot_run(args.run_dir, args.out)
    except PlotError as e:
        print(f"plot_run: {e}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
