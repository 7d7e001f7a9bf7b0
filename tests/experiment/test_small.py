"""`reft experiment small`: the selection and pairing rules (fast), and the whole command on CPU with
SmolLM2-135M-Instruct at the cpu-tiny budget (slow: SFT -> warm-up -> PPO -> evaluation -> table,
plot, timings)."""
import json

import pytest

from reft_jax import cli
from reft_jax import config as config_lib
from reft_jax.experiment.small import POLICIES, TOP1, ExperimentConfig, config_path, correctness, select


def test_selection_takes_the_best_test_epoch_and_never_ppos_epoch_zero():
    curve = [{"epoch": 0, TOP1: 0.9}, {"epoch": 1, TOP1: 0.3}, {"epoch": 2, TOP1: 0.5}, {"epoch": 3, TOP1: 0.5}]
    assert select(curve, skip_epoch0=True) == (3, 0.5)  # tie -> the later epoch, as the trainers keep it
    assert select(curve, skip_epoch0=False) == (0, 0.9)
    with pytest.raises(FileNotFoundError):
        select([], skip_epoch0=False)


def test_correctness_vectors_pair_questions_by_item_id():
    records = [{"item_id": "svamp_2", "correct": True}, {"item_id": "svamp_1", "correct": False},
               {"item_id": "svamp_3", "correct": True, "vote_correct": False}]
    assert correctness(records, ["svamp_1", "svamp_2", "svamp_3"]) == [0, 1, 1]
    assert correctness(records, ["svamp_3"], "vote_correct") == [0]
    with pytest.raises(ValueError):
        correctness(records, ["svamp_4"])


def test_unknown_budget_is_a_one_line_error(capsys):
    assert cli.main(["experiment", "small", "--dataset", "svamp", "--cot", "python", "--budget", "nope"]) == 2
    err = capsys.readouterr().err
    assert "experiment_svamp_python_nope.yaml" in err and "experiment_svamp_python_gpu8min.yaml" in err


def test_budgets_keep_both_phases_on_the_same_questions():
    for budget in ("gpu-8min", "cpu-tiny", "paper"):
        cfg = config_lib.load_config(ExperimentConfig, config_path("svamp", "python", budget))
        assert cfg.sft.warmup_epoch <= cfg.sft.epochs
        assert cfg.sft.eval.every_epochs == 1 and cfg.ppo.eval.every_epochs == 1  # a test eval every epoch
    paper = config_lib.load_config(ExperimentConfig, config_path("svamp", "python", "paper"))
    assert (paper.sft.epochs, paper.sft.warmup_epoch, paper.ppo.epochs, paper.ppo.batch_questions) == (40, 10, 700, 256)
    gpu = config_lib.load_config(ExperimentConfig, config_path("svamp", "python", "gpu-8min"))
    assert gpu.sft.data.max_train_examples is None and gpu.sft.data.max_test_examples is None  # all 1,000


def _seed_result(sft, warm, reft, diff, epochs=(3, 2)):
    row = lambda top1, ep: {"epoch": ep, "top1": top1, "vote@4": top1 + 0.01, "pass@4": top1 + 0.1}
    return {"policies": {"SFT": row(sft, epochs[0]), "warm-up": row(warm, 1), "ReFT": row(reft, epochs[1])},
            "reft_minus_sft": {"top1": {"mean": diff, "lo": diff - 0.02, "hi": diff + 0.02},
                               "vote@4": {"mean": diff, "lo": diff - 0.03, "hi": diff + 0.03}},
            "curves": {"sft": [(1, warm), (2, 0.1), (3, sft)], "ppo": [(0, warm), (1, 0.2), (2, reft)]},
            "epochs": {"sft": 3, "warmup": 1, "ppo": 2},
            "seconds": {"sft": 100.0, "ppo": 200.0, "eval": 50.0, "total": 350.0}}


def test_table_over_seeds_reports_selected_epochs_intervals_and_mean_std(tmp_path):
    from reft_jax.experiment.small import format_table, plot_accuracy

    results = {"model": "M", "dataset": "svamp", "cot": "P-CoT", "budget": "b", "train_questions": 10,
               "test_questions": 5, "vote_k": 4, "n_boot": 10000,
               "seeds": {"0": _seed_result(0.30, 0.10, 0.34, 0.04), "1": _seed_result(0.20, 0.12, 0.30, 0.10)}}
    table = format_table(results)
    assert "| SFT | SFT epoch 3 of 3 (best on test) | 30.00 | 31.00 | 40.00 |" in table
    assert "| warm-up | SFT epoch 1 (fixed in advance) |" in table
    assert "| ReFT | PPO epoch 2 of 2 (best on test) | 34.00 |" in table
    assert "+4.00 [+2.00, +6.00]" in table and "+10.00 [+7.00, +13.00]" in table
    # mean ± sample std over the two seeds: SFT top-1 (30, 20) -> 25.00 ± 7.07; ReFT - SFT (4, 10) -> 7.00 ± 4.24
    assert "| SFT | 25.00 ± 7.07 |" in table
    assert "| ReFT − SFT | 7.00 ± 4.24 | 7.00 ± 4.24 | - |" in table
    assert "| 1 | 100 | 200 | 50 | 350 |" in table
    png = plot_accuracy(results, tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.big_memory
def test_cpu_tiny_experiment_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "small"
    rc = cli.main(["experiment", "small", "--dataset", "svamp", "--cot", "python", "--budget", "cpu-tiny",
                   "--run-dir", str(run_dir)])
    assert rc == 0
    cfg = config_lib.load_config(ExperimentConfig, config_path("svamp", "python", "cpu-tiny"))
    n_test, k = cfg.sft.data.max_test_examples, cfg.vote_k
    out = capsys.readouterr().out
    assert "ReFT − SFT" in out

    results = json.loads((run_dir / "results.json").read_text())
    assert results["test_questions"] == n_test and results["train_questions"] == cfg.sft.data.max_train_examples
    seed = results["seeds"]["0"]
    for name in POLICIES:
        row = seed["policies"][name]
        assert row["num_examples"] == n_test
        # the selected checkpoint evaluated again reproduces its per-epoch greedy number
        assert row["top1_reevaluated"] == pytest.approx(row["top1"])
        assert 0.0 <= row[f"vote@{k}"] <= row[f"pass@{k}"] <= 1.0
    assert seed["policies"]["warm-up"]["epoch"] == cfg.sft.warmup_epoch

    # every evaluation the trainers wrote covers the configured test questions
    first_ppo_eval = 0 if cfg.ppo.eval_at_start else 1
    for phase, epochs in (("sft", range(1, cfg.sft.epochs + 1)), ("ppo", range(first_ppo_eval, cfg.ppo.epochs + 1))):
        for epoch in epochs:
            lines = (run_dir / "seed0" / phase / "eval" / f"epoch{epoch:03d}_test.jsonl").read_text().splitlines()
            assert len(lines) == n_test
        rows = [json.loads(x) for x in (run_dir / "seed0" / phase / "metrics.jsonl").read_text().splitlines()]
        counts = [r["eval/test_num_examples"] for r in rows if "eval/test_num_examples" in r]
        assert counts and set(counts) == {n_test}

    # the difference is ReFT's minus SFT's top-1 on the same questions, inside its interval
    diff = seed["reft_minus_sft"]["top1"]
    assert diff["mean"] == pytest.approx(seed["policies"]["ReFT"]["top1"] - seed["policies"]["SFT"]["top1"])
    assert diff["lo"] <= diff["mean"] <= diff["hi"]

    t = seed["seconds"]
    assert min(t["sft"], t["ppo"], t["eval"]) > 0
    assert t["total"] == pytest.approx(t["sft"] + t["ppo"] + t["eval"], rel=1e-6)

    table = (run_dir / "table.md").read_text()
    for text in ("| SFT |", "| warm-up |", "| ReFT |", "ReFT − SFT", "best on test", "wall time", "SMOKE"):
        assert text in table
    png = (run_dir / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
