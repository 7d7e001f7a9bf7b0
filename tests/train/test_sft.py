"""The SFT loop: exact resume, damaged-checkpoint fallback, NaN stop, mesh invariance, learning.

The loop tests share one uninterrupted reference run (a module fixture) and a persistent
compilation cache (conftest): every `run_sft` builds fresh jitted functions, so without the cache
each run would compile the same programs again.
"""
import json
import pathlib
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reft_jax import config as config_lib
from reft_jax import parallel
from reft_jax.checkpoint import Checkpointer, CheckpointWarning
from reft_jax.data.batches import Encoded
from reft_jax.data.synthetic import SyntheticConfig, generate
from reft_jax.metrics import read_metrics
from reft_jax.train.run import load_run_params
from reft_jax.train.loop import keep_finite
from reft_jax.train.sft import SFTConfig, make_batch, run_sft, with_lr
from reft_jax.train.loop import TrainingDiverged
from reft_jax.data.splits import load_examples, split_validation
from reft_jax.train.state import TrainState

# 2 layers, d 32, 40 examples, batch 16: 3 steps per epoch, one length bucket (one compile).
TINY = [
    "model.scratch.num_layers=2", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
    "model.scratch.num_heads=2", "model.scratch.num_kv_heads=1", "model.scratch.head_dim=16",
    "model.tokenizer_vocab_size=300", "data.synthetic={num_train: 40, num_test: 4}",
    "data.max_test_examples=0", "data.max_len=256", "bucket=256", "batch_size=16", "epochs=2",
    "optim.lr=3e-3", "mesh.fsdp=1", "save_every_steps=2", "warmup_epoch=1", "keep=10",
]
LAST = 6  # 2 epochs x 3 steps; checkpoints at steps 2, 3 (end of epoch 1), 4, 6 (end of epoch 2)
pytestmark = pytest.mark.usefixtures("persistent_compile_cache")


def tiny(run_dir, *more: str) -> SFTConfig:
    return config_lib.load_config(SFTConfig, overrides=[f"run_dir={run_dir}", *TINY, *more])


class Crash(Exception):
    pass


def grab_at(step: int, box: dict):
    """Hook keeping the params after `step` on the host."""
    def hook(s, state):
        if s == step:
            box["params"] = jax.device_get(state.params)
    return hook


def assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(pathlib.Path(run_dir) / "metrics.jsonl")
            if "train/loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run on one device: (run_dir, final params, summary)."""
    run_dir = tmp_path_factory.mktemp("sft_ref")
    box: dict = {}
    summary = run_sft(tiny(run_dir), _after_step=grab_at(LAST, box))
    return run_dir, box["params"], summary


# --- pure pieces -------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="stop_after_epoch"):
        tiny(tmp_path, "stop_after_epoch=3")
    with pytest.raises(config_lib.ConfigError, match="nan_policy"):
        tiny(tmp_path, "nan_policy=explode")
    with pytest.raises(config_lib.ConfigError, match="run_dir"):
        config_lib.load_config(SFTConfig, overrides=["epochs=1"])


def test_validation_split_is_seeded_and_disjoint():
    rows = generate(SyntheticConfig(num_train=50, num_test=4), "train", "nl")
    train, val = split_validation(rows, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert not {r.item_id for r in train} & {r.item_id for r in val}
    assert split_validation(rows, 0.2, seed=3) == (train, val)
    assert split_validation(rows, 0.2, seed=4) != (train, val)


def test_short_last_batch_is_padded_with_zero_weight_rows():
    enc = [Encoded(np.arange(2, 2 + n, dtype=np.int32), 2) for n in (5, 9, 7)]
    b = make_batch(enc, [1, 2], batch_size=4, bucket=8, max_len=64, pad_id=0)
    assert b["tokens"].shape == (4, 16)  # longest 9 -> bucket 16
    assert b["loss_weights"][2:].sum() == 0 and b["loss_weights"][:2].sum() == (9 - 2) + (7 - 2)


def test_skip_policy_keeps_the_state_on_a_non_finite_loss():
    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": batch, "grad_norm": jnp.float32(1)}

    state = TrainState(params={"w": jnp.ones(2)}, opt_state=(), step=jnp.int32(0), rng=jax.random.key(0))
    guarded = jax.jit(keep_finite(with_lr(step, lambda c: 0.1 * c)))
    new, m = guarded(state, jnp.float32(jnp.nan))
    assert int(new.step) == 0 and int(m["nonfinite"]) == 1
    new, m = guarded(state, jnp.float32(2.0))
    assert int(new.step) == 1 and int(m["nonfinite"]) == 0 and float(m["lr"]) == 0.0


def test_load_examples_cuts_prefixes_and_val(tmp_path):
    cfg = tiny(tmp_path, "data.max_train_examples=30", "data.val_fraction=0.1", "data.max_test_examples=3")
    splits = load_examples(cfg.data, cfg.seed)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (27, 3, 3)
    assert splits.test[0].answer_cot is None


def test_bad_synthetic_knobs_name_the_section(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="data.synthetic"):
        load_examples(tiny(tmp_path, "data.synthetic={num_trian: 3}").data, 0)


# --- the loop ----------------------------------------------------------------------------------


def test_reference_run_writes_checkpoints_warmup_metrics_and_plots(reference):
    run_dir, _, summary = reference
    assert summary["step"] == LAST and summary["epochs_done"] == 2
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, LAST + 1))
    with Checkpointer(run_dir / "checkpoints", keep=None) as ck:
        assert ck.all_steps() == [2, 3, 4, 6]
        meta = ck.read_meta(3)
        assert (meta["epoch"], meta["batch"], meta["epoch_end"]) == (1, 0, 1)
        assert ck.read_meta(4)["batch"] == 1 and ck.read_meta(4)["epoch_end"] is None
        assert meta["config"]["epochs"] == 2
    with Checkpointer(run_dir / "warmup", keep=None) as ck:
        assert ck.all_steps() == [3]
    mc, params, tok, meta = load_run_params(run_dir, "warmup", parallel.single_device_mesh())
    assert meta["epoch_end"] == 1 and len(tok) == mc.vocab_size
    assert (run_dir / "plots" / "train.png").is_file() and (run_dir / "config.yaml").is_file()


def test_eval_every_steps_only_saves_each_evaluated_step_and_the_schedule_spans_what_trains(tmp_path):
    """ReFT's offline self-training evaluates every N steps, not per epoch (`eval.every_epochs=0`):
    each evaluated step is saved, so the best checkpoint exists. `data.max_len=110` drops 9 of
    the 40 examples: 2 steps per epoch instead of 3, and the LR schedule is sized on the 31 left
    (a schedule sized before the drop would end at half the peak LR instead of a quarter)."""
    cfg = tiny(tmp_path, "data.max_len=110", "bucket=64", "data.max_test_examples=4", "eval.every_epochs=0",
               "eval.every_steps=3", "save_every_steps=0", "eval.batch_size=4", "eval.max_new_tokens=8",
               "eval.max_total_len=110", "optim.schedule=linear_warmup_decay", "optim.warmup_ratio=0")
    summary = run_sft(cfg)
    assert summary["step"] == 4
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/test_accuracy" in r] == [3, 4]
    with Checkpointer(tmp_path / "checkpoints", keep=None) as ck:
        assert ck.all_steps() == [2, 3, 4]
        assert ck.read_meta(4)["best"]["step"] in (3, 4)
    lr = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    np.testing.assert_allclose([lr[s] for s in (1, 2, 3, 4)], [3e-3 * (1 - k / 4) for k in range(4)], rtol=1e-6)


def test_killed_run_resumes_bitwise_exactly(reference, tmp_path):
    _, ref_params, _ = reference

    def crash(step, state):
        if step == 5:  # after the mid-epoch checkpoint at step 4
            raise Crash()

    with pytest.raises(Crash):
        run_sft(tiny(tmp_path), _after_step=crash)
    box: dict = {}
    summary = run_sft(tiny(tmp_path), _after_step=grab_at(LAST, box))
    assert summary["step"] == LAST
    assert_bitwise_equal(box["params"], ref_params)
    assert train_losses(tmp_path) == train_losses(reference[0])


def test_truncated_checkpoint_is_skipped_and_the_previous_one_used(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    for f in sorted((run_dir / "checkpoints" / str(LAST) / "state").rglob("*")):
        if f.is_file() and f.stat().st_size > 64 and "ocdbt" not in f.name and f.suffix != ".json":
            with open(f, "r+b") as handle:
                handle.truncate(f.stat().st_size // 3)
    box: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_sft(tiny(run_dir), _after_step=grab_at(LAST, box))
    assert any(issubclass(w.category, CheckpointWarning) and f"step {LAST}" in str(w.message) for w in caught)
    assert_bitwise_equal(box["params"], reference[1])  # resumed from step 4 and redid 5, 6


@pytest.mark.parametrize("poison_after,fails_at,last_good", [(5, 6, 4), (4, 4, 3)])
def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, poison_after, fails_at,
                                                                           last_good):
    """(5, 6, 4): the step after poisoning has a NaN loss. (4, 4, 3): params go non-finite right
    before a checkpoint, whose own loss was still finite: the state check must catch it."""

    def poison(step, state):
        if step == poison_after:
            return state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        return None

    with pytest.raises(TrainingDiverged, match=rf"step {fails_at} \(epoch 2, batch \d/3\)") as err:
        run_sft(tiny(tmp_path), _after_step=poison)
    assert f"last good checkpoint is step {last_good}" in str(err.value)
    with Checkpointer(tmp_path / "checkpoints", keep=None) as ck:
        assert ck.all_steps()[-1] == last_good
    _, params, _, _ = load_run_params(tmp_path, "latest", parallel.single_device_mesh())
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


def test_eight_devices_give_the_same_loss_curve(reference, tmp_path):
    run_sft(tiny(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "save_every_steps=0", "warmup_epoch=null"))
    ref, eight = train_losses(reference[0]), train_losses(tmp_path)
    assert sorted(eight) == sorted(ref)
    np.testing.assert_allclose([eight[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=2e-5)


# --- learning ----------------------------------------------------------------------------------


def held_out_file(path: pathlib.Path, knobs: dict, n: int) -> pathlib.Path:
    """In-distribution test problems the training run never sees: the generator's train split
    under another seed, minus every training question (written as a ReFT test file)."""
    as_cfg = lambda **kw: SyntheticConfig(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v)  # noqa: E731
                                             if isinstance(v, list) else v for k, v in kw.items()})
    seen = {r.question for r in generate(as_cfg(**knobs), "train", "nl")}
    fresh = [r for r in generate(as_cfg(**{**knobs, "seed": 99, "num_train": 4 * n}), "train", "nl")
             if r.question not in seen][:n]
    rows = [{"item_id": f"synthetic_{10_000 + i}", "question": r.question, "answer_value": r.answer_value}
            for i, r in enumerate(fresh)]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """From scratch, under a CPU minute, on one-step additions with small numbers (11 possible
    answers, so ~9% by chance); evaluated on unseen problems of that distribution every epoch.
    Returns (run_dir, test file, summary)."""
    root = tmp_path_factory.mktemp("sft_learn")
    knobs = {"num_train": 1500, "num_test": 8, "operations": ["add"], "train_steps": [1, 1], "test_steps": [2, 2],
             "held_out_pairs": [], "operand_range": [2, 5], "start_range": [2, 9]}
    test_file = held_out_file(root / "test.json", knobs, 64)
    cfg = config_lib.load_config(SFTConfig, overrides=[
        f"run_dir={root / 'run'}", f"data.test_file={test_file}", f"data.synthetic={json.dumps(knobs)}",
        "model.scratch.num_layers=2", "model.scratch.hidden_size=128", "model.scratch.intermediate_size=256",
        "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2", "model.scratch.head_dim=32",
        "model.tokenizer_vocab_size=300", "data.max_len=128", "bucket=16", "batch_size=32", "epochs=3",
        "optim.lr=3e-3", "optim.schedule=constant_with_warmup", "mesh.fsdp=1", "warmup_epoch=null",
        "eval.batch_size=32", "eval.max_new_tokens=32"])
    return root / "run", test_file, run_sft(cfg)


def test_tiny_model_learns_the_synthetic_problems(learned):
    run_dir, _, summary = learned
    rows = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    accuracy = [r["eval/test_accuracy"] for r in rows if "eval/test_accuracy" in r]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; test accuracy by epoch {accuracy}")
    assert losses[-1] < 0.1 * losses[0]
    assert len(accuracy) == 3 and accuracy[-1] >= 0.4 and accuracy[-1] > accuracy[0] + 0.2
    assert summary["best"]["value"] == max(accuracy)
    preds = (run_dir / "eval" / "epoch003_test.jsonl").read_text().splitlines()
    assert len(preds) == 64 and json.loads(preds[0])["completion"]


@pytest.mark.slow
@pytest.mark.big_memory
def test_smollm2_sft_steps_on_svamp_pcot_lower_the_loss(tmp_path):
    """The real 135M model: four full fine-tuning steps on SVAMP P-CoT programs (4 x 256 tokens)."""
    from reft_jax.model.io import smollm2_gguf_path

    cfg = config_lib.load_config(SFTConfig, overrides=[
        f"run_dir={tmp_path}", f"model.path={smollm2_gguf_path()}", "data.dataset=svamp", "data.engine=python",
        "data.max_train_examples=16", "data.max_test_examples=0", "data.max_len=256", "bucket=256",
        "batch_size=4", "epochs=1", "optim.lr=1e-4", "optim.schedule=constant", "mesh.fsdp=1",
        "warmup_epoch=null", "keep=1"])
    summary = run_sft(cfg)
    losses = train_losses(tmp_path)
    print(f"SmolLM2 SVAMP P-CoT losses {losses}, {summary['tokens_per_s']:.0f} tokens/s")
    assert sorted(losses) == [1, 2, 3, 4] and losses[1] < 3.0
    assert losses[4] < 0.8 * losses[1]


# --- command line ------------------------------------------------------------------------------


def test_yaml_configs_load():
    root = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs"
    cfg = config_lib.load_config(SFTConfig, root / "sft_synthetic_tiny.yaml", ["epochs=2"])
    assert cfg.model.path is None and cfg.data.dataset == "synthetic" and cfg.warmup_epoch == 2


def test_cli_sft_reports_config_errors(capsys, tmp_path):
    from reft_jax import cli

    assert cli.main(["sft", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_cli_eval_of_a_run_dir_matches_the_loop_and_votes(learned, tmp_path, capsys):
    """`reft eval` on the learned run's last checkpoint reproduces the loop's own greedy accuracy."""
    from reft_jax import cli

    run_dir, test_file, summary = learned
    out = tmp_path / "preds.jsonl"
    assert cli.main(["eval", "--checkpoint", str(run_dir), "--step", "epoch:3", "--data", str(test_file),
                     "--engine", "nl", "--vote", "2", "--out", str(out), "--max-new-tokens", "32",
                     "--batch-size", "32", "--max-examples", "64", "--mesh", "1,1,1"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.rindex("{"):printed.rindex("}") + 1])  # the flat metrics object
    assert metrics["num_examples"] == 64 and metrics["accuracy"] == summary["eval"]["test_accuracy"]
    assert metrics["pass@2"] >= metrics["vote@2_accuracy"] > 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 64
    assert all({"completion", "prediction", "correct", "vote", "vote_correct", "pass"} <= set(p) for p in preds)
