"""The PPO loop: rollout assembly, learning from an SFT warm-up, exact resume, mesh invariance,
the NaN stop, and (slow) SmolLM2 on SVAMP P-CoT with the real sandbox.

All loop tests start from one SFT warm-up of a tiny from-scratch model on one-step synthetic
add/sub problems (a module fixture; ~128 SFT steps). The test file of held-out questions is
in-distribution (the next problems of the same generator), so its greedy accuracy measures what
the policy learned, not compositional generalisation.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from reft_jax import config as config_lib
from reft_jax.checkpoint import Checkpointer
from reft_jax.data.synthetic import SyntheticConfig, generate
from reft_jax.data.tokenizer import train_tokenizer
from reft_jax.metrics import read_metrics
from reft_jax.train import ppo_math
from reft_jax.train.ppo import PPOConfig, TrainingDiverged, minibatch_orders, run_ppo
from reft_jax.rollout.engine import decode_texts, encode_prefixes, trim_rollout
from reft_jax.train.sft import SFTConfig, run_sft

pytestmark = pytest.mark.usefixtures("persistent_compile_cache")

SYN = SyntheticConfig(num_train=512, num_test=4, operations=("add", "sub"), start_range=(2, 9),
                      operand_range=(2, 9), train_steps=(1, 1), test_steps=(2, 2), held_out_pairs=(),
                      max_value=50)
SYN_YAML = ("{num_train: 512, num_test: 4, operations: [add, sub], start_range: [2, 9], operand_range: [2, 9], "
            "train_steps: [1, 1], test_steps: [2, 2], held_out_pairs: [], max_value: 50}")
N_TEST = 256
# The warm-up: 8 of a 16-epoch schedule (ReFT takes an early epoch of the full SFT run).
SFT_TINY = [
    "model.scratch.num_layers=2", "model.scratch.hidden_size=64", "model.scratch.intermediate_size=128",
    "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2", "model.scratch.head_dim=16",
    "model.tokenizer_vocab_size=1000", f"data.synthetic={SYN_YAML}", "data.max_test_examples=0",
    "data.max_len=128", "bucket=64", "batch_size=32", "optim.lr=1e-2", "mesh.fsdp=1", "epochs=16",
    "stop_after_epoch=8", "warmup_epoch=8", "keep=1",
]


# Tuned for the tiny model (reference values in parentheses): lr 5e-4 (3e-7), 4 samples per question
# (1), 4 PPO epochs (2) over minibatches of 64 of the 256 sequences (all), vf_coef 0.5 (5) with a
# zero value head (random) -- with ReFT's, the value loss swamps the tiny shared backbone at first.
LEARN = ["epochs=3", "batch_questions=64", "n_samples=4", "ppo_epochs=4", "mini_batch_size=64", "optim.lr=5e-4"]


def ppo_cfg(run_dir, warmup_dir, *more: str) -> PPOConfig:
    base = [f"run_dir={run_dir}", f"model.path={warmup_dir}", "model.step=warmup", f"data.synthetic={SYN_YAML}",
            "data.max_test_examples=0", "data.max_prompt_len=32", "prompt_bucket=32", "max_new_tokens=32",
            "max_total_len=64", "length_bucket=32", "mesh.fsdp=1", "value_head_init=zeros", "vf_coef=0.5",
            "optim.lr=1e-3", "eval.batch_size=64", "eval.max_new_tokens=32", "eval.max_total_len=64"]
    return config_lib.load_config(PPOConfig, overrides=[*base, *more])


@pytest.fixture(scope="module")
def warmup(tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("sft_warmup")
    run_sft(config_lib.load_config(SFTConfig, overrides=[f"run_dir={run_dir}", *SFT_TINY]))
    return run_dir


@pytest.fixture(scope="module")
def test_file(tmp_path_factory) -> pathlib.Path:
    """Held-out in-distribution questions: the generator's next N_TEST problems after the
    training ones (distinct questions by construction)."""
    rows = generate(dataclasses.replace(SYN, num_train=SYN.num_train + N_TEST), "train", "nl")[SYN.num_train:]
    path = tmp_path_factory.mktemp("data") / "synthetic_heldout.json"
    path.write_text(json.dumps([{"item_id": r.item_id, "question": r.question, "answer_value": r.answer_value}
                                for r in rows]))
    return path


def grab_at(step: int, box: dict):
    def hook(s, state):
        if s == step:
            box["params"] = jax.device_get(state.params)
    return hook


def train_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(pathlib.Path(run_dir) / "metrics.jsonl") if "train/loss" in r]


# ----------------------------------------------------------------------------------------------
# Host-side rollout pieces
# ----------------------------------------------------------------------------------------------
def test_trim_rollout_gives_reft_action_masks_with_a_padded_width():
    """A length-capped row shorter than the bucketed width must still act on exactly its real
    tokens (ReFT: no EOS -> actions to the last real token); EOS rows through their EOS."""
    P, T, EOS, PAD = 3, 8, 2, 0
    tokens = np.full((3, P + T), PAD, np.int32)
    mask = np.zeros((3, P + T), bool)
    tokens[:, :P], mask[:, 1:P] = 7, True  # one left-pad column
    for r, (n, eos) in enumerate([(3, True), (5, False), (1, True)]):
        tokens[r, P:P + n] = 9
        if eos:
            tokens[r, P + n - 1] = EOS
        mask[r, P:P + n] = True
    logp = np.tile(-np.arange(1, T + 1, dtype=np.float32), (3, 1)) * mask[:, P:]
    out = trim_rollout(tokens, mask, logp, P, bucket=4, eos_id=EOS, pad_id=PAD)
    assert out["tokens"].shape == (3, P + 8)  # longest 5 -> bucket 8
    m = np.asarray(ppo_math.action_mask(out["mask_tokens"], out["prompt_len"], (EOS,)))
    want = np.zeros_like(m)
    want[:, :-1] = out["attention_mask"][:, 1:] & (np.arange(P + 8)[1:] >= P)  # action t emits t+1
    np.testing.assert_array_equal(m, want)
    assert m.sum(-1).tolist() == [3, 5, 1]
    np.testing.assert_array_equal(out["tokens"], tokens[:, :P + 8])  # the forward sees real tokens
    np.testing.assert_array_equal(out["sampler_logp"][1, P - 1:P + 4], [-1, -2, -3, -4, -5])


def test_prefixes_keep_the_head_and_decoding_is_reft_scored_text():
    tok = train_tokenizer(["Question:\nTom has 3 apples.\nAnswer reasoning:\n3 + 4 = 7 the answer is: 7"] * 4, 300)
    pre = encode_prefixes(tok, ["Tom has 3 apples.", "Tom has 3 apples. " * 20], "nl", 40, 0, bucket=16)
    assert pre.truncated == 1 and pre.tokens.shape == (2, 40) and pre.mask[1].all()
    assert tok.decode(pre.tokens[1][:5].tolist()).startswith("Question")  # the head is kept
    ids = tok("Question:\nTom has 3 apples.\nAnswer reasoning:\n3 + 4 = 7", add_special_tokens=False)["input_ids"]
    tokens = np.asarray([[0, 0] + ids], np.int32)
    assert decode_texts(tok, tokens, tokens != 0) == ["3 + 4 = 7"]


def test_minibatch_orders_partition_the_batch_deterministically():
    assert minibatch_orders(8, 8, 0, 3, 2) == [[None], [None]]
    orders = minibatch_orders(8, 4, 0, 3, 2)
    for epoch in orders:
        assert sorted(np.concatenate(epoch).tolist()) == list(range(8))
    assert [o.tolist() for e in orders for o in e] == [o.tolist() for e in minibatch_orders(8, 4, 0, 3, 2) for o in e]


def test_every_training_question_is_in_each_epoch(tmp_path):
    """ReFT's DataLoader (accelerate, even_batches) completes the last question batch with the
    epoch's first questions: 40 questions, 16 a step -> 3 steps, every question each epoch."""
    cfg = ppo_cfg(tmp_path, tmp_path, "batch_questions=16")
    assert cfg.last_batch == "fill" and cfg.rollout_steps(40) == 3
    for epoch in range(3):
        batches = cfg.question_batches(40, cfg.seed, epoch)
        assert [len(b) for b in batches] == [16, 16, 16] and set(np.concatenate(batches)) == set(range(40))
    dropped = ppo_cfg(tmp_path, tmp_path, "batch_questions=16", "last_batch=drop")
    assert dropped.rollout_steps(40) == 2 and len(set(np.concatenate(dropped.question_batches(40, 0, 0)))) == 32
    with pytest.raises(config_lib.ConfigError, match="last_batch"):
        ppo_cfg(tmp_path, tmp_path, "last_batch=short")


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="n_samples"):
        config_lib.load_config(PPOConfig, overrides=[f"run_dir={tmp_path}", "advantage_estimator=grpo"])
    with pytest.raises(config_lib.ConfigError, match="mini_batch_size"):
        config_lib.load_config(PPOConfig, overrides=[f"run_dir={tmp_path}", "mini_batch_size=5"])
    with pytest.raises(config_lib.ConfigError, match="kl_estimator"):
        config_lib.load_config(PPOConfig, overrides=[f"run_dir={tmp_path}", "kl_estimator=k9"])
    cfg = config_lib.load_config(PPOConfig, "experiments/configs/ppo_synthetic_tiny.yaml",
                                 [f"run_dir={tmp_path}", f"model.path={tmp_path}"])
    assert cfg.optim.lr > 3e-7 and cfg.max_total_len < 700


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def test_ppo_raises_training_reward_and_greedy_test_accuracy(warmup, test_file, tmp_path):
    """The heart of ReFT on the tiny setting: from the SFT warm-up, 3 PPO epochs raise the mean
    training reward and the greedy accuracy on held-out questions by more than their noise.

    Seeds 1, 2, 3 gave rewards by epoch [.433 .488 .544], [.397 .482 .527], [.391 .470 .534] and
    greedy test accuracy .348 -> .508, .527, .637. Noise: an epoch's mean reward averages 2048
    samples (std ~0.011); a 256-question accuracy has std ~0.03.
    """
    run_dir = tmp_path / "ppo"
    cfg = ppo_cfg(run_dir, warmup, f"data.test_file={test_file}", "data.max_test_examples=null",
                  "eval.every_epochs=3", *LEARN)
    summary = run_ppo(cfg)
    rec = train_records(run_dir)
    reward = np.asarray([r["train/score_mean"] for r in rec]).reshape(3, -1).mean(1)
    acc = np.asarray([r["train/accuracy"] for r in rec]).reshape(3, -1).mean(1)
    before, after = summary["history"][0]["test_accuracy"], summary["history"][-1]["test_accuracy"]
    print(f"\ntrain reward by epoch {reward.round(3)}, train accuracy {acc.round(3)}; "
          f"greedy test accuracy {before:.3f} -> {after:.3f} ({N_TEST} questions)")
    assert reward[-1] - reward[0] > 0.06
    assert after - before > 0.10
    for key in ("kl_seq_mean", "entropy", "pg_clipfrac", "vf_clipfrac", "vf_loss", "pg_loss",
                "explained_variance", "response_length", "approx_kl", "reft_acc", "exec_timeout",
                "exec_rejected", "time/rollout", "time/reward", "time/score_wait", "time/update"):
        assert f"train/{key}" in rec[-1], key
    assert (run_dir / "plots" / "train.png").is_file()
    with Checkpointer(run_dir / "checkpoints", keep=None) as ck:
        assert ck.read_meta(ck.latest_step())["best"]["epoch"] == 3


RESUME = ["data.max_train_examples=40", "batch_questions=16", "epochs=2", "save_every_steps=2", "keep=5",
          "max_new_tokens=32", "length_bucket=32"]  # 3 steps per epoch (the last one filled), 6 in all


@pytest.fixture(scope="module")
def resume_reference(warmup, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ppo_ref")
    box: dict = {}
    run_ppo(ppo_cfg(run_dir, warmup, *RESUME), _after_step=grab_at(6, box))
    return run_dir, box["params"]


def test_killed_run_resumes_bitwise_exactly(warmup, resume_reference, tmp_path):
    class Crash(Exception):
        pass

    def crash(step, state):
        if step == 5:  # after the mid-epoch checkpoint at step 4
            raise Crash()

    with pytest.raises(Crash):
        run_ppo(ppo_cfg(tmp_path, warmup, *RESUME), _after_step=crash)
    box: dict = {}
    summary = run_ppo(ppo_cfg(tmp_path, warmup, *RESUME), _after_step=grab_at(6, box))
    assert summary["step"] == 6
    for a, b in zip(jax.tree.leaves(box["params"]), jax.tree.leaves(resume_reference[1]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    ref = {r["step"]: r["train/loss"] for r in train_records(resume_reference[0])}
    got = {r["step"]: r["train/loss"] for r in train_records(tmp_path)}  # steps 5, 6 logged twice
    assert got == ref


@pytest.mark.parametrize("poison_after,message,last_good", [
    (5, r"non-finite loss .* at step 6 \(epoch 2, batch 3/3\)", [2, 3, 4]),
    (3, r"non-finite params after the update at step 3 \(epoch 1, batch 3/3\)", [2])])
def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(warmup, tmp_path, poison_after,
                                                                           message, last_good):
    """(5): the next step's loss is NaN, the update is skipped and the run stops. (3): the params
    go bad right before a checkpoint: the state check refuses to save them."""
    def poison(step, state):
        if step == poison_after:
            return state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
        return None

    with pytest.raises(TrainingDiverged, match=message + f".*last good checkpoint is step {last_good[-1]}"):
        run_ppo(ppo_cfg(tmp_path, warmup, *RESUME), _after_step=poison)
    with Checkpointer(tmp_path / "checkpoints", keep=None) as ck:
        assert ck.all_steps() == last_good


@pytest.mark.slow
def test_one_step_on_8_devices_equals_one_device(warmup, tmp_path):
    """The whole loop step -- sampling, scoring, whitening, the update -- on data 2 x fsdp 2 x
    tensor 2 == 1 device. (Slow: compiles the sampler twice; test_ppo_step checks the device step
    on the same mesh by default.)"""
    out = {}
    for name, mesh in (("one", ["mesh.fsdp=1"]), ("eight", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])):
        box: dict = {}
        run_ppo(ppo_cfg(tmp_path / name, warmup, *RESUME, "max_steps=1", *mesh, "optim.grad_accum=2"),
                _after_step=grab_at(1, box))
        out[name] = (train_records(tmp_path / name)[0], box["params"])
    one, eight = out["one"], out["eight"]
    for key in ("score_mean", "response_length", "kl_seq_mean", "entropy", "loss", "pg_loss", "vf_loss",
                "grad_norm", "explained_variance"):
        np.testing.assert_allclose(eight[0][f"train/{key}"], one[0][f"train/{key}"], rtol=1e-3, atol=1e-5,
                                   err_msg=key)
    # Sharded matmuls sum in another order. Adam moves an element by up to ~lr (1e-3) a step
    # whatever its gradient's size, so where a gradient is ~0 that order can move it by up to
    # 2 lr; all but a handful of elements must agree to 5e-5 (measured: 1 of 25,344 was 2.6e-4 off).
    for a, b in zip(jax.tree.leaves(eight[1]), jax.tree.leaves(one[1]), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        off = np.abs(a - b) > 5e-5 + 1e-4 * np.abs(b)
        assert np.abs(a - b).max() <= 2e-3 and off.mean() < 1e-3, (np.abs(a - b).max(), int(off.sum()), a.size)


@pytest.mark.slow
@pytest.mark.big_memory
def test_smollm2_svamp_pcot_end_to_end(tmp_path, data_dir):
    """The real model and the real sandbox: 2 PPO steps of 4 SVAMP P-CoT questions."""
    from reft_jax.model.io import smollm2_gguf_path

    cfg = config_lib.load_config(PPOConfig, overrides=[
        f"run_dir={tmp_path}", f"model.path={smollm2_gguf_path()}", "model.step=latest", "data.dataset=svamp",
        "data.engine=python", "data.max_train_examples=8", "data.max_test_examples=0", "batch_questions=4",
        "max_new_tokens=64", "epochs=1", "mesh.fsdp=1", "optim.lr=1e-6", "length_bucket=64", "max_steps=2",
        "prompt_bucket=256", "sandbox.timeout=5.0"])  # one shape bucket: the second step compiles nothing
    summary = run_ppo(cfg)
    rec = train_records(tmp_path)
    assert summary["step"] == 2 and len(rec) == 2
    for r in rec:
        assert r["train/nonfinite"] == 0 and np.isfinite(r["train/loss"])
        assert sum(r[f"train/exec_{s}"] for s in ("ok", "error", "timeout", "rejected")) == 4
        assert 0 <= r["train/score_mean"] <= 1 and r["train/response_length"] > 0


def test_each_program_compiles_once_per_shape_bucket(tmp_path, warmup):
    """Prompt and sequence widths come from a small fixed set of buckets (printed at start), and
    a step whose widths were seen before compiles nothing (compile seconds from JAX's events)."""
    from reft_jax.data.batches import bucket_sizes

    cfg = ppo_cfg(tmp_path, warmup, "epochs=1", "batch_questions=16", "n_samples=2", "mini_batch_size=32",
                  "ppo_epochs=1", "max_steps=10", "eval_at_start=false")
    run_ppo(cfg)
    recs = train_records(tmp_path)
    prompts = bucket_sizes(cfg.prompt_bucket, cfg.data.max_prompt_len)
    lengths = {p + c for p in prompts for c in bucket_sizes(cfg.length_bucket, cfg.max_new_tokens)}
    seen = set()
    for r in recs:
        key = (r["train/prompt_width"], r["train/seq_width"])
        assert key[0] in prompts and key[1] in lengths, key
        if key in seen:
            assert r["train/compile_seconds"] == 0.0, (r["step"], key)
        seen.add(key)
    assert recs[0]["train/compile_seconds"] > 0 and len(recs) == 10 and len(seen) < len(recs)
