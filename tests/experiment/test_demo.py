"""`reft demo` end to end, shortened: SFT -> PPO -> evaluation -> table, plots and run directory."""
import json

import pytest

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


@pytest.mark.slow
@pytest.mark.big_memory
def test_demo_on_a_real_model_and_dataset(tmp_path, capsys):
    """`reft demo --model GGUF --dataset svamp --cot python`: the same pipeline on SmolLM2-135M and
    SVAMP P-CoT with the real sandbox, cut to a few questions (CPU minutes)."""
    from reft_jax.model.io import smollm2_gguf_path

    run_dir = tmp_path / "demo"
    rc = cli.main(["demo", "--model", str(smollm2_gguf_path()), "--dataset", "svamp", "--cot", "python",
                   "--run-dir", str(run_dir), "sft.epochs=2", "sft.warmup_epoch=1", "sft.eval.every_epochs=2",
                   "sft.data.max_train_examples=8", "sft.data.max_test_examples=8", "sft.data.max_len=256", "sft.data.max_prompt_len=160",
                   "sft.eval.max_new_tokens=48", "sft.eval.max_total_len=256", "ppo.epochs=1",
                   "ppo.max_new_tokens=48", "ppo.max_total_len=256", "ppo.length_bucket=48", "vote_k=0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "SFT" in out and "ReFT" in out
    result = json.loads((run_dir / "summary.json").read_text())["results"]["0"]
    for policy in ("SFT", "warm-up", "ReFT"):
        assert 0.0 <= result[policy]["accuracy"] <= 1.0
        assert result[policy]["num_examples"] == 8
    sft_cfg = (run_dir / "seed0" / "sft" / "config.yaml").read_text()
    assert "svamp" in sft_cfg and "python" in sft_cfg
    # the program sandbox scored the PPO rollouts
    rec = [json.loads(line) for line in (run_dir / "seed0" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/exec_timeout" in r for r in rec)


@pytest.mark.slow
def test_shortened_pcot_demo_writes_programs_that_run(tmp_path, capsys):
    """`reft demo --cot python`, shortened: the programs fit the length caps and the rollout
    prefix continues the header as SFT tokenised it, so the sandbox gets answers from both
    prefixes (once every P-CoT reward here was 0)."""
    run_dir = tmp_path / "demo"
    rc = cli.main(["demo", "--cot", "python", "--run-dir", str(run_dir), "sft.epochs=6", "sft.warmup_epoch=6",
                   "sft.eval.every_epochs=6", "sft.data.max_train_examples=480", "sft.data.val_fraction=0.1",
                   "sft.data.max_test_examples=16", "ppo.epochs=1", "ppo.batch_questions=64", "vote_k=0"])
    assert rc == 0
    assert "ReFT" in capsys.readouterr().out

    def records(phase):
        return [json.loads(x) for x in (run_dir / "seed0" / phase / "metrics.jsonl").read_text().splitlines()]

    # greedy from the SFT prompt (SFT's eval) and from the rollout prefix, header included (PPO's
    # eval of the warm-up): both write programs that run to an answer (reward >= 0.1 each)
    sft = [r for r in records("sft") if "eval/val_mean_reward" in r][-1]["eval/val_mean_reward"]
    warm = [r for r in records("ppo") if r.get("eval/epoch") == 0][0]["eval/val_mean_reward"]
    assert sft >= 0.09 and warm >= 0.09, (sft, warm)
    assert any("train/exec_timeout" in r for r in records("ppo"))  # the sandbox scored rollouts


@pytest.mark.parametrize("cot", ["nl", "python"])
def test_demo_length_caps_fit_every_synthetic_solution(cot):
    """`reft demo --cot {nl,python}` on the embedded problems: every training target fits the SFT
    length cap and every solution fits the sampling budgets (truncated P-CoT programs once scored
    0 everywhere), measured with the tokenizer the demo trains."""
    import argparse

    from reft_jax import config as config_lib
    from reft_jax.commands.demo import shortcut_overrides
    from reft_jax.data.tokenizer import train_tokenizer
    from reft_jax.experiment.demo import DemoConfig
    from reft_jax.eval.evaluate import eval_prefix
    from reft_jax.data.prompts import sft_prompt, sft_target
    from reft_jax.data.splits import load_examples, tokenizer_corpus

    args = argparse.Namespace(run_dir=None, model=None, dataset=None, cot=cot)
    cfg = config_lib.load_config(DemoConfig, None, shortcut_overrides(args))
    data = cfg.sft.data
    assert data.engine == cot
    rows = load_examples(data, 0).train
    tok = train_tokenizer(tokenizer_corpus(rows, cot), cfg.sft.model.tokenizer_vocab_size)
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    longest_target = max(n(sft_target(r, cot)) for r in rows) + 1  # + EOS
    longest_example = max(n(sft_prompt(r.question) + sft_target(r, cot)) for r in rows) + 1
    longest_prompt = max(n(eval_prefix(r.question, cot)) for r in rows)
    assert longest_example <= data.max_len, (longest_example, data.max_len)
    for budget, total in ((cfg.sft.eval.max_new_tokens, cfg.sft.eval.max_total_len),
                          (cfg.ppo.max_new_tokens, cfg.ppo.max_total_len)):
        assert longest_target <= budget and longest_prompt + longest_target <= total, \
            (longest_prompt, longest_target, budget, total)


def test_demo_rejects_a_bad_phase_combination_before_training(tmp_path, capsys):
    """The PPO phase runs on `sft.data`: a prompt cap at or above PPO's total length fails at
    load time, naming both keys, before any SFT step runs."""
    rc = cli.main(["demo", "--run-dir", str(tmp_path / "demo"), "sft.data.max_prompt_len=200",
                   "ppo.max_total_len=144"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ppo: data.max_prompt_len=200: must be below max_total_len=144" in err
    assert not (tmp_path / "demo").exists()
