"""Write the paper's experiment configs (reference §8b) from one table, so they cannot drift.

    python experiments/configs/make_paper_configs.py      # rewrites paper/ and small/

paper/: CodeLlama-7B (the paper's Table 2/3/4 rows): SFT, ReFT, offline/online self-training and
the verifier, for GSM8K / SVAMP / MathQA (MCQ) × N-CoT / P-CoT and MathQA-numeric N-CoT.
small/: the same recipes for SmolLM2-135M (the paper's small-model Table 5 settings).
small/experiment_*_paper.yaml: both phases of one recipe for `reft experiment small --budget paper`;
the shortened budgets there (gpu8min, cputiny) are written by hand.
Model paths are placeholders for the user's local copy (`hf_models/CodeLlama-7b-hf`).
"""
from __future__ import annotations

import copy
import pathlib

import yaml

HERE = pathlib.Path(__file__).resolve().parent

# (dataset, engine) rows of Table 2 and Table 3, with the warm-up epoch and KL coefficient the
# official scripts use for each.
ROWS = [
    ("gsm8k", "nl", 2, 0.05), ("gsm8k", "python", 2, 0.01),
    ("svamp", "nl", 2, 0.05), ("svamp", "python", 2, 0.01),
    ("mathqa", "nl", 5, 0.05), ("mathqa", "python", 2, 0.01),
    ("mathqa-numeric", "nl", 10, 0.01),
]

OFFLINE_EVAL_STEPS = {"gsm8k": 175, "mathqa-numeric": 175, "svamp": 90, "mathqa": 350}

# 8 devices, FSDP over all of them, bf16 compute with float32 master params, remat (docs/scaling.md).
BIG = {
    "model_path": "hf_models/CodeLlama-7b-hf",
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "model": {"remat": True},
    "compute_dtype": "bfloat16",
    # loss_group 3: ReFT's SFT loss is the mean of its per-GPU micro-batch (3 examples) token means
    "sft": {"lr": 1e-5, "epochs": 40, "batch": 48, "grad_accum": 2, "loss_group": 3},
    "ppo": {"lr": 3e-7, "epochs": 300, "questions": 32, "vf_coef": 5.0},
    "offline_epochs": 20,
}
SMALL = {
    "model_path": "smollm2-135m-instruct",  # `reft convert $(python -c ...smollm2_gguf_path()) smollm2-135m-instruct`
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    "model": {"remat": False},
    "compute_dtype": "float32",
    "sft": {"lr": 2e-5, "epochs": 40, "batch": 48, "grad_accum": 1, "loss_group": 6},  # 6 per GPU
    "ppo": {"lr": 3e-6, "epochs": 700, "questions": 256, "vf_coef": 5.0},
    "offline_epochs": 20,
    # The official small-model scripts (exps/small_model_exps, reference §8b) differ per dataset:
    # ReFT starts from SFT epoch 10 (GSM8K, SVAMP) or 40 (MathQA), and MathQA SFT runs 100 epochs.
    "warmup": {"gsm8k": 10, "svamp": 10, "mathqa": 40},
    "sft_epochs": {"mathqa": 100},
}


def data(dataset: str, engine: str) -> dict:
    return {"dataset": dataset, "engine": engine, "max_len": 1024, "max_prompt_len": 300}


def sft(s: dict, dataset: str, engine: str, warmup: int, tag: str) -> dict:
    epochs = s.get("sft_epochs", {}).get(dataset, s["sft"]["epochs"])
    return {
        "run_dir": f"runs/{tag}/sft_{dataset}_{engine}",
        "seed": 42,
        "model": {"path": s["model_path"], **s["model"]},
        "data": data(dataset, engine),
        "optim": {"lr": s["sft"]["lr"], "schedule": "linear_warmup_decay", "warmup_ratio": 0.1,
                  "weight_decay": 0.0, "eps": 1e-8, "clip_norm": 1.0, "grad_accum": s["sft"]["grad_accum"],
                  "compute_dtype": s["compute_dtype"]},
        "mesh": s["mesh"],
        "epochs": epochs,
        "batch_size": s["sft"]["batch"],
        "loss_group": s["sft"]["loss_group"],
        "warmup_epoch": warmup,
        "keep": epochs,  # ReFT keeps every epoch (the SFT number is the best one)
        "eval": {"every_epochs": 1, "batch_size": 24, "max_new_tokens": 1024, "max_total_len": 1024,
                 "select_on": "test"},
    }


def reft(s: dict, dataset: str, engine: str, kl: float, tag: str) -> dict:
    return {
        "run_dir": f"runs/{tag}/reft_{dataset}_{engine}",
        "seed": 42,
        "model": {"path": f"runs/{tag}/sft_{dataset}_{engine}", "step": "warmup", **s["model"]},
        "data": data(dataset, engine),
        "optim": {"lr": s["ppo"]["lr"], "schedule": "constant", "weight_decay": 0.0, "eps": 1e-8,
                  "clip_norm": 1.0, "compute_dtype": s["compute_dtype"]},
        "mesh": s["mesh"],
        "epochs": s["ppo"]["epochs"],
        "batch_questions": s["ppo"]["questions"],
        "n_samples": 1,
        "mini_batch_size": 0,
        "ppo_epochs": 2,
        "kl_coef": kl,
        "kl_estimator": "k1",
        "kl_in_reward": True,
        "gamma": 1.0,
        "lam": 0.95,
        "clip": 0.2,
        "value_clip": 0.2,
        "vf_coef": s["ppo"]["vf_coef"],
        "ref_dtype": "bfloat16" if s["compute_dtype"] == "bfloat16" else None,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "max_total_len": 700,
        "eval": {"every_epochs": 1, "batch_size": 8, "max_new_tokens": 700, "max_total_len": 700,
                 "select_on": "test"},
    }


def experiment(s: dict, dataset: str, engine: str, warmup: int, kl: float) -> dict:
    """`reft experiment small` (reft_jax/experiment/small.py): SFT and ReFT of one recipe, run
    directories derived per seed (so the phases' own run_dir / model path are left out)."""
    phase_sft = copy.deepcopy(sft(s, dataset, engine, warmup, "small"))
    phase_ppo = copy.deepcopy(reft(s, dataset, engine, kl, "small"))
    for phase in (phase_sft, phase_ppo):  # set per seed from the experiment's own keys
        for key in ("run_dir", "seed", "mesh"):
            phase.pop(key)
    phase_ppo["model"].pop("path")
    return {"run_dir": f"runs/experiment_small/{dataset}_{engine}_paper",
            "budget": "paper: the official small-model recipe (reference section 8b), Table 5 protocol",
            "seeds": [0], "vote_k": 100, "n_boot": 10000, "mesh": dict(s["mesh"]), "sft": phase_sft,
            "ppo": phase_ppo}


def selftrain(s: dict, dataset: str, engine: str, tag: str) -> dict:
    offline_sft = sft(s, dataset, engine, None, tag)
    offline_sft.update(run_dir=f"runs/{tag}/offline_st_{dataset}_{engine}", epochs=s["offline_epochs"], keep=1)
    # ReFT's offline self-training evaluates (and saves) every 175 / 90 / 350 steps, not per epoch
    offline_sft["eval"].update(every_epochs=0, every_steps=OFFLINE_EVAL_STEPS[dataset])
    online = reft(s, dataset, engine, 0.0, tag)
    for key in ("n_samples", "mini_batch_size", "ppo_epochs", "kl_coef", "kl_estimator", "kl_in_reward",
                "gamma", "lam", "clip", "value_clip", "vf_coef", "ref_dtype"):
        online.pop(key)
    online.update(run_dir=f"runs/{tag}/online_st_{dataset}_{engine}", updates_per_step=2)
    return {
        "offline": {"sft": offline_sft,
                    "warmup": {"path": f"runs/{tag}/sft_{dataset}_{engine}", "step": "warmup"},
                    "k": 100, "per_question": 10, "temperature": 1.0, "top_k": 50, "max_total_len": 1024},
        "online": online,
    }


def verifier(s: dict, dataset: str, engine: str, tag: str, policy: str) -> dict:
    return {
        "run_dir": f"runs/{tag}/rerank_{policy}_{dataset}_{engine}",
        "train_samples": f"runs/{tag}/samples/warmup_{dataset}_{engine}_train.jsonl",
        "eval_samples": f"runs/{tag}/samples/{policy}_{dataset}_{engine}_test.jsonl",
        "seed": 42,
        "model": {"path": f"runs/{tag}/{policy}_{dataset}_{engine}", "step": "best", **s["model"]},
        "data": data(dataset, engine),
        "optim": {"lr": 1e-6, "schedule": "linear_warmup_decay", "warmup_ratio": 0.1,
                  "compute_dtype": s["compute_dtype"]},
        "mesh": s["mesh"],
        "epochs": 3,
        "batch_size": 24,
        "max_len": 700,
    }


def write(path: pathlib.Path, cfg: dict, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {header}\n# generated by experiments/configs/make_paper_configs.py: edit the table there\n"
                    + yaml.safe_dump(cfg, sort_keys=False))


def main() -> None:
    for tag, s in (("paper", BIG), ("small", SMALL)):
        for dataset, engine, warmup, kl in ROWS:
            if tag == "small" and engine != "python":
                continue  # Table 5 is P-CoT only
            name = f"{dataset}_{engine}"
            warmup = s.get("warmup", {}).get(dataset, warmup)
            write(HERE / tag / f"sft_{name}.yaml", sft(s, dataset, engine, warmup, tag),
                  f"SFT (and the ReFT warm-up at epoch {warmup}) on {name}")
            write(HERE / tag / f"reft_{name}.yaml", reft(s, dataset, engine, kl, tag), f"ReFT PPO on {name}")
            if tag == "small":
                write(HERE / tag / f"experiment_{name}_paper.yaml", experiment(s, dataset, engine, warmup, kl),
                      f"`reft experiment small --dataset {dataset} --cot {engine} --budget paper`: the official "
                      f"small-model recipe, SFT {sft(s, dataset, engine, warmup, tag)['epochs']} epochs, "
                      f"ReFT from epoch {warmup}, {s['ppo']['epochs']} PPO epochs")
            if tag == "paper":
                write(HERE / tag / f"selftrain_{name}.yaml", selftrain(s, dataset, engine, tag),
                      f"offline / online self-training baselines on {name}")
        if tag == "paper":
            for engine in ("nl", "python"):  # Table 4: GSM8K reranking
                for policy in ("sft", "reft"):
                    write(HERE / tag / f"rerank_{policy}_gsm8k_{engine}.yaml",
                          verifier(s, "gsm8k", engine, tag, policy),
                          f"verifier for {policy.upper()}+Reranking on gsm8k_{engine}")


if __name__ == "__main__":
    main()
