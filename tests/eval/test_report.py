"""`reft report`: best-over-epochs selection with the epoch, methods from the run markers, eval
summaries, the table and the plots, on run directories written the way the loops write them."""
import json

import pytest

from reft_jax import cli
from reft_jax.eval import report as rp
from reft_jax.checkpoint import SELFTRAIN_MARKER
from reft_jax.metrics import MetricsWriter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sft_like(run_dir, accuracies, vote=None):
    """SFT's records: eval at epoch ends without an epoch field; train records carry it."""
    with MetricsWriter(run_dir, enabled=True, tensorboard=False) as w:
        for e, acc in enumerate(accuracies, start=1):
            for b in range(2):
                w.write(2 * (e - 1) + b + 1, {"loss": 1.0 / e, "epoch": e - 1 + (b + 1) / 2}, prefix="train")
            rec = {"test_accuracy": acc, "val_accuracy": 0.99}
            if vote is not None:
                rec["test_vote@8_accuracy"] = vote[e - 1]
            w.write(2 * e, rec, prefix="eval")
    return run_dir


def test_best_over_epochs_with_the_epoch_earliest_on_ties(tmp_path):
    run = rp.read_run(sft_like(tmp_path / "sft", [0.2, 0.5, 0.5, 0.4], vote=[0.3, 0.6, 0.7, 0.7]))
    assert run.method == "SFT"
    assert run.top1 == rp.Best(0.5, 2.0, 4)  # epoch 2, not the tied epoch 3; val is not selected on
    assert run.vote == {8: rp.Best(0.7, 3.0, 6)}
    assert run.curve == [(1.0, 0.2), (2.0, 0.5), (3.0, 0.5), (4.0, 0.4)]


def test_methods_summaries_and_table(tmp_path):
    sft = sft_like(tmp_path / "sft", [0.30, 0.41])
    ppo = tmp_path / "reft"
    with MetricsWriter(ppo, enabled=True, tensorboard=False) as w:
        for e, acc in enumerate([0.45, 0.52, 0.50]):
            w.write(10 * e, {"test_accuracy": acc, "epoch": e}, prefix="eval")
    (ppo / "config.yaml").write_text("kl_coef: 0.05\nppo_epochs: 2\n")
    online = sft_like(tmp_path / "onsl", [0.33])
    (online / SELFTRAIN_MARKER).write_text(json.dumps({"mode": "online"}))
    verifier = tmp_path / "verifier"
    with MetricsWriter(verifier, enabled=True, tensorboard=False) as w:
        w.write(21, {"rerank@16_accuracy": 0.61, "vote@16_accuracy": 0.55, "epoch": 1}, prefix="eval")
        w.write(42, {"rerank@16_accuracy": 0.64, "vote@16_accuracy": 0.55, "epoch": 2}, prefix="eval")
    (verifier / "verifier.json").write_text("{}")
    # a `reft eval --strategy rerank` result recorded in the SFT run
    rp.write_eval_summary(sft, "rerank", 16, "best", {"accuracy": 0.41, "rerank@16_accuracy": 0.58,
                                                      "vote@16_accuracy": 0.50}, epoch=2, step=4)
    runs = [rp.read_run(d) for d in (sft, ppo, online, verifier)]
    assert [r.method for r in runs] == ["SFT", "ReFT", "Online-ST", "Rerank (verifier)"]
    assert runs[0].rerank == {16: rp.Best(0.58, 2, 4)} and runs[0].vote == {16: rp.Best(0.5, 2, 4)}
    assert runs[1].top1 == rp.Best(0.52, 1, 10)
    assert runs[3].rerank[16] == rp.Best(0.64, 2, 42) and runs[3].top1 is None
    table = rp.format_table(runs).splitlines()
    assert table[0] == "| run | method | top-1 | voting@16 | rerank@16 |"
    assert table[2] == "| sft | SFT | 41.00 (ep 2) | 50.00 (ep 2) | 58.00 (ep 2) |"
    assert table[3] == "| reft | ReFT | 52.00 (ep 1) | - | - |"
    assert table[5] == "| verifier | Rerank (verifier) | - | 55.00 (ep 1) | 64.00 (ep 2) |"


def test_reft_report_command_prints_the_table_and_writes_plots(tmp_path, capsys):
    a = sft_like(tmp_path / "a", [0.1, 0.3])
    b = sft_like(tmp_path / "b", [0.2, 0.25])
    (b / SELFTRAIN_MARKER).write_text(json.dumps({"mode": "offline"}))
    assert cli.main(["report", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| a | SFT | 30.00 (ep 2) |" in out and "| b | Offline-ST | 25.00 (ep 2) |" in out
    assert (tmp_path / "out" / "table.md").read_text().startswith("| run | method | top-1 |")
    for png in (tmp_path / "out" / "accuracy_by_epoch.png", a / "plots" / "eval.png", b / "plots" / "train.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "missing: no such run directory" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["nan"])
def test_nan_evaluations_never_win(tmp_path, bad):
    run = rp.read_run(sft_like(tmp_path / "r", [float(bad), 0.1]))
    assert run.top1 == rp.Best(0.1, 2.0, 4)
