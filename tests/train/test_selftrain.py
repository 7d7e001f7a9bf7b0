"""Offline and online self-training: the row selection against a plain-Python reference (§8.1),
the OnSL loss against a direct computation, and both modes end to end on the tiny synthetic
setting (from a warm-up made here) and on SmolLM2-135M (slow)."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reft_jax import config as config_lib
from reft_jax.eval import inference as inf
from reft_jax import parallel
from reft_jax.data.prompts import ANSWER_TRIGGER
from reft_jax.data.sources import DataError, Example
from reft_jax.metrics import read_metrics
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig
from reft_jax.train import selftrain as st
from reft_jax.train.run import build_policy, load_run_params
from reft_jax.train.sft import SFTConfig, run_sft
from reft_jax.train.state import OptimConfig, TrainState, make_optimizer, make_schedule


# --- offline row selection ------------------------------------------------------------------------
def ref_offline(sample_items, train_items, engine, n):
    """§8.1 as the text states it: per sampling item, correct completions stripped, unique in
    order, the first n, then the gold CoT (N-CoT: + answer line) if not already present."""
    out = []
    for item in sample_items:
        gold = train_items[item["item_id"]]
        cot = gold["answer_cot"].strip()
        if engine == "nl":
            cot += ANSWER_TRIGGER + gold["answer_value"].strip()
        unique = []
        for c, ok in zip(item["completions"], item["correct"]):
            if ok and c.strip() not in unique:
                unique.append(c.strip())
        chosen = unique[:n]
        if cot not in chosen:
            chosen.append(cot)
        out += [(item["item_id"], c) for c in chosen]
    return out


def test_offline_rows_match_the_reference():
    train = {"svamp_1": {"answer_cot": "1 + 2 = 3", "answer_value": "3"},
             "svamp_2": {"answer_cot": "2 * 2 = 4", "answer_value": "4.0"}}
    gold1 = "1 + 2 = 3" + ANSWER_TRIGGER + "3"
    items = [
        {"item_id": "svamp_1",  # duplicates after strip, wrong ones, the gold among the samples
         "completions": [" a\nTherefore, the answer is: 3", "a\nTherefore, the answer is: 3 ", "wrong", gold1,
                         "b\nTherefore, the answer is: 3.0"],
         "correct": [True, True, False, True, True]},
        {"item_id": "svamp_2",  # more correct samples than kept, gold not among them
         "completions": [f"x{i}" for i in range(18)], "correct": [i % 3 != 0 for i in range(18)]},
        {"item_id": "svamp_1", "completions": ["z"], "correct": [False]},  # none correct: gold only
    ]
    sets = [inf.SampleSet(it["item_id"], "q", "3", tuple(it["completions"]), tuple([1.0] * len(it["correct"])),
                          tuple(it["correct"])) for it in items]
    rows = st.offline_rows(sets, {k: Example(k, "q", v["answer_value"], v["answer_cot"]) for k, v in train.items()},
                           "nl", per_question=10)
    expected = ref_offline(items, train, "nl", 10)
    assert [(r.item_id, r.answer_cot) for r in rows] == expected
    assert [c for i, c in expected if i == "svamp_1"][:3] == ["a\nTherefore, the answer is: 3", gold1,
                                                              "b\nTherefore, the answer is: 3.0"]
    assert len([1 for i, _ in expected if i == "svamp_2"]) == 11  # 10 samples + gold
    with pytest.raises(DataError, match="svamp_9.*train split"):
        st.offline_rows([inf.SampleSet("svamp_9", "q", "1", ("a",), (1.0,), (True,))], {}, "nl")


def test_sample_weights_cover_completion_tokens_of_correct_rows():
    mask = np.array([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]], bool)  # prompt width 3
    w = st.sample_weights(mask, 3, np.array([True, True, False]))
    assert w.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]]


# --- the OnSL step ----------------------------------------------------------------------------------
TINY = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                   num_kv_heads=1, head_dim=8)


_logits = jax.jit(lambda p, t, m: llama.forward(p, t, llama.positions_from_mask(m), m, TINY)[0])


def _token_mean_ce(params, tokens, mask, weights):
    """Weighted mean of -log p(tokens[t+1]) at positions t, straight from the logits."""
    logits = _logits(params, tokens, mask)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    nll = [-logp[b, t, tokens[b, t + 1]] * weights[b, t] for b in range(tokens.shape[0])
           for t in range(tokens.shape[1] - 1)]
    return float(np.sum(nll) / weights.sum())


def test_onsl_loss_is_half_samples_half_gold_and_exact_under_accumulation():
    rng = np.random.default_rng(0)
    params = jax.jit(lambda r: llama.init_params(TINY, r))(jax.random.key(0))
    s_mask = np.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
    gold_mask = np.array([[1] * 5 + [0], [1] * 6, [1] * 3 + [0] * 3, [1] * 4 + [0] * 2], bool)
    base = {"sample_tokens": rng.integers(1, 40, (4, 6)).astype(np.int32), "sample_mask": s_mask,
            "gold_tokens": rng.integers(1, 40, (4, 6)).astype(np.int32), "gold_mask": gold_mask,
            "gold_weights": np.zeros((4, 6), np.float32), "unit": np.eye(4, dtype=np.float32)[0]}
    base["gold_weights"][:, 1:-1] = gold_mask[:, 2:]  # targets from position 2 on (a 2-token prompt)
    optim = OptimConfig(lr=1e-3, schedule="constant")
    tx = make_optimizer(optim, 10)
    gold_ce = _token_mean_ce(params, base["gold_tokens"], gold_mask, base["gold_weights"])
    steps = {accum: jax.jit(st.make_onsl_step(TINY, tx, make_schedule(optim, 10), accum)) for accum in (1, 2)}
    for correct in ([True, False, True, False], [False] * 4):
        batch = {**base, "sample_weights": st.sample_weights(s_mask, 2, np.array(correct))}
        out = {accum: step(TrainState.create(params, tx, jax.random.key(0)), batch)[1]
               for accum, step in steps.items()}
        expected = 0.5 * gold_ce
        if any(correct):
            expected += 0.5 * _token_mean_ce(params, batch["sample_tokens"], s_mask, batch["sample_weights"])
        np.testing.assert_allclose(out[1]["loss"], expected, rtol=1e-5)
        np.testing.assert_allclose(out[2]["loss"], out[1]["loss"], rtol=1e-6)
        np.testing.assert_allclose(out[2]["grad_norm"], out[1]["grad_norm"], rtol=1e-5)


# --- end to end on the tiny synthetic setting ------------------------------------------------------
TINY_SFT = [
    "model.scratch.num_layers=2", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
    "model.scratch.num_heads=2", "model.scratch.num_kv_heads=1", "model.scratch.head_dim=16",
    "model.tokenizer_vocab_size=300", "data.synthetic={num_train: 32, num_test: 4}", "data.max_test_examples=0",
    "data.max_len=128", "bucket=128", "batch_size=16", "optim.lr=3e-3", "mesh.fsdp=1", "keep=1",
]


# the warm-up run and the offline SFT compile the same step: share it through a disk cache
pytestmark = pytest.mark.usefixtures("persistent_compile_cache")


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory):
    """A tiny SFT run whose epoch-1 checkpoint is the warm-up (2 steps)."""
    run_dir = tmp_path_factory.mktemp("warm")
    run_sft(config_lib.load_config(SFTConfig, overrides=[f"run_dir={run_dir}", *TINY_SFT, "epochs=1",
                                                          "warmup_epoch=1"]))
    return run_dir


def test_offline_end_to_end_samples_from_the_warmup_and_trains_the_base_model(warm_run, tmp_path):
    cfg = config_lib.load_config(st.OfflineConfig, overrides=[
        f"sft.run_dir={tmp_path / 'off'}", *[f"sft.{o}" for o in TINY_SFT], "sft.epochs=1", "sft.warmup_epoch=null",
        f"warmup.path={warm_run}", "warmup.step=warmup", "k=3", "max_new_tokens=32", "sample_batch_size=8"])
    summary = st.run_offline(cfg)
    samples = inf.read_sample_file(tmp_path / "off" / "selftrain_samples.jsonl")
    assert len(samples) == 32 and all(len(s.completions) == 3 for s in samples)
    n_correct = sum(len({c.strip() for c, ok in zip(s.completions, s.correct) if ok}) for s in samples)
    assert summary["selftrain_rows"] >= 32 and summary["selftrain_rows"] <= 32 + n_correct
    steps = [r["step"] for r in read_metrics(tmp_path / "off" / "metrics.jsonl") if "train/loss" in r]
    assert len(steps) == -(-(32 + summary["selftrain_rows"]) // 16)  # gold rows + self-training rows
    saved = config_lib.load_yaml(tmp_path / "off" / "config.yaml")
    assert saved["model"]["path"] is None  # the base model, not the warm-up


def test_online_end_to_end_from_the_warmup(warm_run, tmp_path):
    cfg = config_lib.load_config(st.OnlineConfig, overrides=[
        f"run_dir={tmp_path / 'on'}", f"model.path={warm_run}", "model.step=warmup", "data.dataset=synthetic",
        "data.synthetic={num_train: 32, num_test: 4}", "data.max_train_examples=16", "data.max_test_examples=4",
        "data.max_prompt_len=128", "max_total_len=160", "max_new_tokens=32", "eval.max_new_tokens=32",
        "eval.max_total_len=160", "eval.batch_size=4", "batch_questions=8", "epochs=1", "optim.lr=1e-3",
        "mesh.fsdp=1"])
    mesh = parallel.make_mesh(parallel.MeshConfig(1, 1, 1), jax.devices()[:1])
    before = jax.device_get(build_policy(cfg.model, mesh)[1])
    summary = st.run_online(cfg)
    records = read_metrics(tmp_path / "on" / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["train/loss"]) for r in train)
    assert all(r["train/gold_tokens"] > 0 for r in train) and "train/accuracy" in train[0]
    assert any("eval/test_accuracy" in r for r in records) and summary["best"]["epoch"] == 1
    _, after, _, meta = load_run_params(tmp_path / "on", "best", mesh)
    assert meta["step"] == 2
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(jax.device_get(after)),
                                                            jax.tree.leaves(before))]
    assert max(moved) > 0  # 2 steps x 2 updates changed the policy


def test_selftrain_configs_name_bad_keys(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="samples"):
        config_lib.load_config(st.OfflineConfig, overrides=[f"sft.run_dir={tmp_path}"])
    with pytest.raises(config_lib.ConfigError, match="data.max_prompt_len"):
        config_lib.load_config(st.OnlineConfig, overrides=[f"run_dir={tmp_path}", "max_total_len=200"])


def test_selftrain_command_runs_the_modes_section(tmp_path, capsys):
    from reft_jax import cli

    path = "experiments/configs/selftrain_synthetic_tiny.yaml"
    assert cli.main(["selftrain", "--mode", "online", "--config", path, f"online.model.path={tmp_path}",
                     f"offline.warmup.path={tmp_path}", "online.epochs=1", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["online"]["epochs"] == 1 and printed["offline"]["k"] == 16
    only_online = tmp_path / "online.yaml"
    only_online.write_text(f"online:\n  run_dir: {tmp_path / 'run'}\n")
    assert cli.main(["selftrain", "--mode", "offline", "--config", str(only_online)]) == 2
    assert "no `offline:` section" in capsys.readouterr().err


# --- SmolLM2-135M (slow) ------------------------------------------------------------------------------
def _svamp_python_rows(data_dir, n):
    from reft_jax.data.sources import load_dataset

    return load_dataset("svamp", "train", "python", data_dir)[:n]


@pytest.mark.slow
@pytest.mark.big_memory
def test_smollm2_offline_two_sft_steps(tmp_path, data_dir):
    from reft_jax.model.io import smollm2_gguf_path

    rows = _svamp_python_rows(data_dir, 8)
    sets = [inf.SampleSet(r.item_id, r.question, r.answer_value, (r.answer_cot, "def solution():\n    return 0"),
                          (float(r.answer_value), 0.0), (True, False)) for r in rows]
    samples = inf.write_sample_file(tmp_path / "samples.jsonl", sets)
    cfg = config_lib.load_config(st.OfflineConfig, overrides=[
        f"samples={samples}", f"sft.run_dir={tmp_path / 'run'}", f"sft.model.path={smollm2_gguf_path()}",
        "sft.data.dataset=svamp", "sft.data.engine=python", "sft.data.max_train_examples=8",
        "sft.data.max_test_examples=0", "sft.data.max_len=256", "sft.bucket=256", "sft.batch_size=8",
        "sft.epochs=1", "sft.warmup_epoch=null", "sft.mesh.fsdp=1", "sft.keep=1"])
    summary = st.run_offline(cfg)
    assert summary["selftrain_rows"] == 8  # the correct sample is the gold program: not added twice
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.slow
@pytest.mark.big_memory
def test_smollm2_online_one_step(tmp_path):
    from reft_jax.model.io import smollm2_gguf_path

    cfg = config_lib.load_config(st.OnlineConfig, overrides=[
        f"run_dir={tmp_path}", f"model.path={smollm2_gguf_path()}", "data.dataset=svamp", "data.engine=nl",
        "data.max_train_examples=2", "data.max_test_examples=0", "data.max_prompt_len=128", "max_total_len=160",
        "max_new_tokens=24", "batch_questions=2", "epochs=1", "mesh.fsdp=1", "sandbox.timeout=2"])
    summary = st.run_online(cfg)
    train = [r for r in read_metrics(pathlib.Path(tmp_path) / "metrics.jsonl") if "train/loss" in r]
    print("SmolLM2 OnSL:", json.dumps(train))
    assert summary["step"] == 1 and np.isfinite(train[0]["train/loss"]) and train[0]["train/gold_tokens"] > 0
