"""Paper-style results from run directories: one row per run with top-1, voting@k and rerank@k,
each the best over the run's evaluations (as the paper selects its checkpoints, on the test set)
with the epoch it came from, plus the plots.

Sources, all written by the runs themselves:
* `metrics.jsonl` eval records: `eval/test_accuracy` (top-1), `eval/test_vote@K_accuracy`,
  and for verifier runs `eval/rerank@K_accuracy` / `eval/vote@K_accuracy`; the epoch comes
  from `eval/epoch` or, where a loop does not log it (SFT), from the train record of the
  same step;
* `eval/*.summary.json` files that `reft eval` leaves in a run directory it evaluated
  (`write_eval_summary`), with the epoch of the evaluated checkpoint.
The method is read from the run's markers: `verifier.json` (a verifier), `selftrain.json`
(offline / online self-training), a PPO config (ReFT), else SFT.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

from reft_jax.checkpoint import SELFTRAIN_MARKER

SUMMARY_SUFFIX = ".summary.json"
_VOTE = re.compile(r"^eval/(?:test_)?vote@(\d+)_accuracy$")
_RERANK = re.compile(r"^eval/(?:test_)?rerank@(\d+)_accuracy$")


@dataclasses.dataclass(frozen=True)
class Best:
    """The best value of one metric over a run's evaluations (the earliest on ties)."""

    value: float
    epoch: float | None
    step: int | None


@dataclasses.dataclass
class RunSummary:
    run_dir: str
    method: str
    top1: Best | None = None
    vote: dict[int, Best] = dataclasses.field(default_factory=dict)  # k -> best
    rerank: dict[int, Best] = dataclasses.field(default_factory=dict)
    curve: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (epoch, top-1) per eval


# ----------------------------------------------------------------------------------------------
# Reading runs (pure functions of the records)
# ----------------------------------------------------------------------------------------------
def method_of(run_dir: str | os.PathLike) -> str:
    """The method a run directory holds, from the markers its runs write."""
    run_dir = pathlib.Path(run_dir)
    if (run_dir / "verifier.json").is_file():
        return "Rerank (verifier)"
    if (run_dir / SELFTRAIN_MARKER).is_file():
        mode = json.loads((run_dir / SELFTRAIN_MARKER).read_text()).get("mode")
        return {"offline": "Offline-ST", "online": "Online-ST"}.get(mode, f"self-training ({mode})")
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        data = yaml.safe_load(config.read_text()) or {}
        if "kl_coef" in data and "ppo_epochs" in data:
            return "ReFT"
    return "SFT"


def _epochs_by_step(rows: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Training epoch reached at each step (for loops whose eval records carry no epoch)."""
    return {r["step"]: r["train/epoch"] for r in rows if isinstance(r.get("train/epoch"), (int, float))}


def eval_points(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per eval record: `{"step", "epoch", metric name: value}`."""
    epochs = _epochs_by_step(rows)
    out = []
    for r in rows:
        metrics = {k: v for k, v in r.items() if k.startswith("eval/") and isinstance(v, (int, float))}
        if not metrics:
            continue
        epoch = metrics.pop("eval/epoch", None)
        if epoch is None:
            epoch = epochs.get(r["step"])
        out.append({"step": r["step"], "epoch": None if epoch is None else round(float(epoch), 4), **metrics})
    return out


def best_of(points: Iterable[Mapping[str, Any]], key: str) -> Best | None:
    """The maximum of `key` over the points (NaN skipped), the earliest one on ties."""
    best = None
    for p in points:
        v = p.get(key)
        if isinstance(v, (int, float)) and not math.isnan(v) and (best is None or v > best.value):
            best = Best(float(v), p.get("epoch"), p.get("step"))
    return best


def summarize_points(run_dir: str, method: str, points: Sequence[Mapping[str, Any]]) -> RunSummary:
    """The table row of a run from its eval points (metrics.jsonl records and eval summaries)."""
    out = RunSummary(run_dir, method, top1=best_of(points, "eval/test_accuracy"))
    keys = {k for p in points for k in p}
    for pattern, target in ((_VOTE, out.vote), (_RERANK, out.rerank)):
        for key in sorted(keys):
            m = pattern.match(key)
            if m:
                found = best_of(points, key)
                k = int(m.group(1))
                if found is not None and (k not in target or found.value > target[k].value):
                    target[k] = found
    out.curve = sorted((p["epoch"], p["eval/test_accuracy"]) for p in points
                       if p.get("epoch") is not None and isinstance(p.get("eval/test_accuracy"), (int, float)))
    return out


def read_run(run_dir: str | os.PathLike) -> RunSummary:
    """A run directory's row: its metrics.jsonl evaluations and `reft eval` summaries."""
    from reft_jax.metrics import read_metrics

    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    path = run_dir / "metrics.jsonl"
    points = eval_points(read_metrics(path)) if path.is_file() else []
    for summary in sorted((run_dir / "eval").glob(f"*{SUMMARY_SUFFIX}")) if (run_dir / "eval").is_dir() else []:
        data = json.loads(summary.read_text())
        points.append({"step": data.get("step"), "epoch": data.get("epoch"),
                       **{f"eval/test_{k}": v for k, v in data.get("metrics", {}).items()}})
    return summarize_points(str(run_dir), method_of(run_dir), points)


def checkpoint_epoch(run_dir: str | os.PathLike, selector: str) -> tuple[float | None, int | None]:
    """(epoch, step) of the checkpoint `selector` names in a reft run directory."""
    from reft_jax.checkpoint import Checkpointer, checkpoint_step

    sub = "warmup" if selector == "warmup" else "checkpoints"
    with Checkpointer(pathlib.Path(run_dir) / sub, keep=None) as ckpt:
        step = checkpoint_step(ckpt, selector)
        meta = ckpt.read_meta(step)
    return meta.get("epoch_end", meta.get("epoch")), step


def write_eval_summary(run_dir: str | os.PathLike, strategy: str, k: int, checkpoint: str,
                       metrics: Mapping[str, Any], epoch: float | None = None, step: int | None = None,
                       **extra: Any) -> pathlib.Path:
    """Record a `reft eval` result on the test split in the evaluated run's directory, for
    `reft report`. Metric names as `reft eval` prints them (`accuracy`, `vote@K_accuracy`,
    `rerank@K_accuracy`, ...)."""
    path = pathlib.Path(run_dir) / "eval" / f"{strategy}@{k}_{checkpoint.replace(':', '')}{SUMMARY_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"strategy": strategy, "k": k, "checkpoint": checkpoint, "epoch": epoch,
                                "step": step, "metrics": dict(metrics), **extra}, indent=2))
    return path


# ----------------------------------------------------------------------------------------------
# Table and plots
# ----------------------------------------------------------------------------------------------
def _cell(best: Best | None) -> str:
    if best is None:
        return "-"
    where = f"ep {best.epoch:g}" if best.epoch is not None else f"step {best.step}"
    return f"{100 * best.value:.2f} ({where})"


def format_table(runs: Sequence[RunSummary]) -> str:
    """A Markdown table: run | method | top-1 | voting@k | rerank@k (percent, best epoch)."""
    ks_vote = sorted({k for r in runs for k in r.vote})
    ks_rerank = sorted({k for r in runs for k in r.rerank})
    header = ["run", "method", "top-1"] + [f"voting@{k}" for k in ks_vote] + [f"rerank@{k}" for k in ks_rerank]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [pathlib.Path(r.run_dir).name or r.run_dir, r.method, _cell(r.top1)]
        cells += [_cell(r.vote.get(k)) for k in ks_vote] + [_cell(r.rerank.get(k)) for k in ks_rerank]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_plot(runs: Sequence[RunSummary], path: str | os.PathLike) -> pathlib.Path | None:
    """Test top-1 accuracy per epoch, one line per run (None when no run has a curve)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = [r for r in runs if r.curve]
    if not drawn:
        return None
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in drawn:
        epochs, acc = zip(*r.curve)
        ax.plot(epochs, [100 * a for a in acc], marker="o" if len(epochs) <= 40 else None, markersize=3,
                label=f"{pathlib.Path(r.run_dir).name} ({r.method})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> tuple[str, list[pathlib.Path]]:
    """The table (also written to `out_dir/table.md`) and every plot written: each run's own
    curves (`metrics.plot_metrics`, in the run's `plots/`) and the comparison."""
    from reft_jax.metrics import plot_metrics

    runs = [read_run(d) for d in run_dirs]
    table = format_table(runs)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    written = [p for d in run_dirs for p in plot_metrics(d)]
    compared = comparison_plot(runs, out / "accuracy_by_epoch.png")
    return table, written + ([compared] if compared else [])
