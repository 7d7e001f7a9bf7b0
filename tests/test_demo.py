"""`reft demo` end to end, shortened: SFT -> PPO -> evaluation -> table, plots and run directory."""
import json

from reft_jax import cli


def test_shortened_demo_writes_table_plots_and_runs(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    rc = cli.main(["demo", "--run-dir", str(run_dir), "sft.epochs=2", "sft.warmup_epoch=1",
                   "sft.data.synthetic.num_train=128", "sft.data.max_test_examples=16", "sft.eval.every_epochs=2",
                   "ppo.epochs=1", "ppo.batch_questions=32", "vote_k=2"])
    assert rc == 0
    out = capsys.readouterr().out
    for policy in ("SFT", "warm-up", "ReFT"):
        assert policy in out
    assert "vote@2" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    result = summary["results"]["0"]
    for policy in ("SFT", "warm-up", "ReFT"):
        assert 0.0 <= result[policy]["accuracy"] <= 1.0
        assert result[policy]["num_examples"] == 16
    assert (run_dir / "summary.png").stat().st_size > 1000
    for phase in ("sft", "ppo"):
        assert (run_dir / "seed0" / phase / "metrics.jsonl").is_file()
        assert (run_dir / "seed0" / phase / "config.yaml").is_file()
        assert list((run_dir / "seed0" / phase / "plots").glob("*.png"))
    assert (run_dir / "seed0" / "sft" / "warmup").is_dir()
