"""The verifier (reranker): head and last-token pooling, data, the jitted step, a real training
run on crafted synthetic samples (held-out AUC computed here, rerank@k vs top-1) and bad input.

Sample sets are crafted, not sampled: each synthetic question gets k completions drawn from a
fixed error mix, i.e. the gold N-CoT, the gold N-CoT with its final answer perturbed (±1, ±2),
a degenerate one repeating its last line before a wrong answer, and one cut before its answer
line (no prediction, as when the length cap hits). Numbers are single digits so the tiny model
can learn, in a few hundred steps, to compare the answer with the last computed value.
"""
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reft_jax import config as config_lib
from reft_jax.eval import inference as inf
from reft_jax import parallel
from reft_jax.data.prompts import ANSWER_TRIGGER, COT_TRIGGER, INSTRUCTION
from reft_jax.data.synthetic import SyntheticConfig, generate_problems
from reft_jax.data.tokenizer import train_tokenizer
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig
from reft_jax.reward.answers import extract_nl, is_correct
from reft_jax.eval import verifier as EV
from reft_jax.train import verifier as V

SYN = SyntheticConfig(num_train=240, num_test=4, start_range=(2, 9), operand_range=(2, 4), max_value=9,
                      operations=("add", "sub"), held_out_pairs=(("sub", "add"),))
K = 4
N_TRAIN_Q = 180  # the remaining 60 questions are held out


def craft(problem, rng: random.Random) -> str:
    lines = problem.nl_cot.split("\n")
    r = rng.random()
    if r < 0.45:
        return problem.nl_cot + ANSWER_TRIGGER + str(problem.answer)
    if r < 0.70:  # the gold answer, perturbed
        bad = problem.answer + rng.choice([d for d in (-2, -1, 1, 2) if problem.answer + d > 0])
        return problem.nl_cot + ANSWER_TRIGGER + str(bad)
    if r < 0.85:  # a repetition loop, then a wrong answer
        return "\n".join(lines + [lines[-1]]) + ANSWER_TRIGGER + str(problem.answer + 1)
    return problem.nl_cot  # cut before the answer line: no prediction


def crafted_sets(problems, k: int, seed: int) -> list[inf.SampleSet]:
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(problems):
        texts = [craft(p, rng) for _ in range(k)]
        preds = [extract_nl(t, "numeric") for t in texts]
        out.append(inf.SampleSet(f"synthetic_{i}", p.question, str(p.answer), tuple(texts), tuple(preds),
                                 tuple(is_correct(x, float(p.answer), "numeric") for x in preds)))
    return out


def auc(scores, labels) -> float:
    """Mann-Whitney AUC (ties count one half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


TINY_MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)


def one_device_mesh():
    return parallel.make_mesh(parallel.MeshConfig(1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module")
def tiny_params():
    policy = jax.jit(lambda r: llama.init_params(TINY_MODEL, r))(jax.random.key(0))
    return V.init_params(policy, TINY_MODEL, jax.random.key(1), one_device_mesh())


logits_fn = jax.jit(lambda p, t, m: V.verifier_logits(p, t, m, TINY_MODEL))


# --- pure pieces ----------------------------------------------------------------------------------
def test_params_are_backbone_plus_bias_free_head(tiny_params):
    params = tiny_params
    assert set(params) == {"backbone", "head"} and "value_head" not in params["backbone"]
    assert set(params["head"]) == {"kernel"} and params["head"]["kernel"].shape == (32, 2)
    big = EV.init_head(jax.random.key(2), 4096)["kernel"]
    assert abs(float(jnp.std(big)) - 0.02) < 1e-3 and abs(float(jnp.mean(big))) < 1e-3
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), V.param_shapes(TINY_MODEL))
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), params)


def test_logits_read_the_last_real_token_of_right_padded_rows(tiny_params):
    rng = np.random.default_rng(0)
    rows = [rng.integers(4, 64, n).astype(np.int32) for n in (5, 9, 3)]
    batch = V.make_batch(rows, [1, 0, 1], [0, 1, 2], batch_size=4, bucket=16, max_len=64, pad_id=0)
    assert batch["tokens"].shape == (4, 16) and batch["weights"].tolist() == [1, 1, 1, 0]
    assert EV.last_token_index(batch["attention_mask"]).tolist() == [4, 8, 2, 0]
    logits = logits_fn(tiny_params, batch["tokens"], batch["attention_mask"])
    alone = logits_fn(tiny_params, rows[0][None], np.ones((1, 5), bool))  # unpadded
    np.testing.assert_allclose(logits[0], alone[0], atol=1e-5)
    assert not np.allclose(logits[0], logits[1])


def test_encoding_is_one_string_head_kept_no_eos():
    tok = train_tokenizer(["Question:\nq one\nAnswer reasoning:\n1 + 2 = 3"], 280)
    ids = V.encode_verifier(tok, "  q one ", "1 + 2 = 3", max_len=700)
    assert ids.tolist() == tok(INSTRUCTION + "q one" + COT_TRIGGER + "1 + 2 = 3", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids.tolist()
    assert V.encode_verifier(tok, "q one", "1 + 2 = 3", max_len=5).tolist() == ids[:5].tolist()


def test_pairs_are_unique_per_question_valid_or_not():
    s = inf.SampleSet("x_1", "q", "3", ("a", "b", "a", "c"), (3.0, None, 3.0, 2.0), (True, False, True, False))
    t = inf.SampleSet("x_2", "r", "1", ("a",), (1.0,), (True,))
    pairs = V.unique_pairs([s, t])
    assert [(p.set_index, p.sample_index, p.completion, p.label) for p in pairs] == [
        (0, 0, "a", 1), (0, 1, "b", 0), (0, 3, "c", 0), (1, 0, "a", 1)]


# --- a real run -------------------------------------------------------------------------------------
SCRATCH = ["model.scratch.num_layers=2", "model.scratch.hidden_size=32", "model.scratch.intermediate_size=64",
           "model.scratch.num_heads=4", "model.scratch.num_kv_heads=2", "model.scratch.head_dim=8",
           "model.tokenizer_vocab_size=300", "mesh.fsdp=1"]
SYN_YAML = ("data.synthetic={num_train: 240, num_test: 4, start_range: [2, 9], operand_range: [2, 4], "
            "max_value: 9, operations: [add, sub], held_out_pairs: [[sub, add]]}")
TINY_RUN = ["optim.lr=5e-3", "epochs=8", "batch_size=24", "bucket=128", "eval.every_steps=100000",
            "eval.batch_size=120", "keep=2", "mesh.fsdp=1"]


def write_sets(path, sets):
    return str(inf.write_sample_file(path, sets))


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """The policy the verifier starts from and reranks for: a tiny SFT run (one step)."""
    from reft_jax.train.sft import SFTConfig, run_sft

    run_dir = tmp_path_factory.mktemp("policy")
    run_sft(config_lib.load_config(SFTConfig, overrides=[
        f"run_dir={run_dir}", *SCRATCH, SYN_YAML, "data.max_train_examples=16", "data.max_test_examples=0",
        "data.max_len=128", "bucket=128", "batch_size=16", "epochs=1", "warmup_epoch=null", "keep=1"]))
    return run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, policy):
    """(run_dir, held-out sets, summary): a verifier trained on crafted samples of 180 questions,
    its backbone the policy's."""
    root = tmp_path_factory.mktemp("verifier")
    problems = generate_problems(SYN, "train")
    train_sets = crafted_sets(problems[:N_TRAIN_Q], K, seed=0)
    held_out = crafted_sets(problems[N_TRAIN_Q:], K, seed=1)
    cfg = config_lib.load_config(V.VerifierConfig, overrides=[
        f"run_dir={root / 'run'}", f"train_samples={write_sets(root / 'train.jsonl', train_sets)}",
        f"eval_samples={write_sets(root / 'test.jsonl', held_out)}", f"model.path={policy}", *TINY_RUN])
    summary = V.train_verifier(cfg)
    return root / "run", held_out, summary


def test_verifier_separates_held_out_samples_and_rerank_beats_top1(trained, record_property):
    run_dir, held_out, summary = trained
    verifier = V.load_verifier(run_dir, one_device_mesh(), step="latest")
    pairs = V.unique_pairs(held_out)
    probs = verifier.score([p.question for p in pairs], [p.completion for p in pairs], batch_size=64)
    labels = [p.label for p in pairs]
    valid = [held_out[p.set_index].predictions[p.sample_index] is not None for p in pairs]
    all_auc = auc(probs, labels)
    valid_auc = auc([x for x, v in zip(probs, valid) if v], [y for y, v in zip(labels, valid) if v])
    metrics, records = V.rerank(verifier, held_out, "numeric", batch_size=64)
    top1 = float(np.mean([s.correct[0] for s in held_out]))  # crafted sets have no greedy decode:
    # "top-1" is the first sample's accuracy (its expectation is pass@1, also reported)
    numbers = {"auc": all_auc, "auc_valid_only": valid_auc, "top1_first_sample": top1, **metrics}
    print("\nverifier on held-out crafted samples:", json.dumps(numbers, indent=1))
    for k, v in numbers.items():
        record_property(k, v)
    assert all_auc > 0.6 and valid_auc > 0.55  # better than chance (0.5)
    assert metrics[f"rerank@{K}_accuracy"] >= top1 and metrics[f"rerank@{K}_accuracy"] >= metrics["pass@1"]
    assert metrics[f"rerank@{K}_accuracy"] <= metrics[f"pass@{K}"]  # never above the upper bound
    # the run logged the same evaluation and kept its artifacts
    assert summary["eval"][f"rerank@{K}_accuracy"] == pytest.approx(metrics[f"rerank@{K}_accuracy"])
    assert (run_dir / V.MARKER).is_file() and (run_dir / "plots").is_dir()
    assert sum(r["correct"] for r in records) / len(records) == metrics[f"rerank@{K}_accuracy"]


def test_tokenizer_or_vocab_mismatch_is_refused(trained, tmp_path):
    run_dir, held_out, _ = trained
    verifier = V.load_verifier(run_dir, one_device_mesh())
    V.check_policy_tokenizer(verifier, verifier.tokenizer, str(run_dir))  # its own policy: fine
    other = train_tokenizer(["some other corpus entirely, with other merges 123"], 280)
    with pytest.raises(V.VerifierError, match=f"{run_dir}.*tokenizer"):
        V.check_policy_tokenizer(verifier, other, str(run_dir))
    bigger = train_tokenizer([INSTRUCTION + s.question + COT_TRIGGER + c for s in held_out for c in s.completions],
                             verifier.model_config.vocab_size + 100)
    with pytest.raises(V.VerifierError, match="vocab size"):
        V.check_policy_tokenizer(verifier, bigger, str(run_dir))


def test_reft_eval_rerank_strategy_reranks_the_policys_samples(trained, policy, tmp_path, capsys):
    """`reft eval --strategy rerank` end to end: greedy top-1, k samples from the policy, the
    verifier's picks; the run directory keeps the summary for `reft report`."""
    from reft_jax import cli

    run_dir, held_out, _ = trained
    data = tmp_path / "test.json"
    data.write_text(json.dumps([{"item_id": s.item_id, "question": s.question, "answer_value": s.answer_value}
                                for s in held_out[:4]]))
    common = ["eval", "--checkpoint", str(policy), "--data", str(data), "--engine", "nl", "--batch-size", "4",
              "--max-new-tokens", "16", "--max-total-len", "160", "--max-prompt-len", "128", "--k", "2"]
    assert cli.main(common + ["--strategy", "rerank", "--verifier", str(run_dir), "--verifier-step", "latest"]) == 0
    metrics = json.loads(capsys.readouterr().out.split("\n", 1)[1].rsplit("summary ->", 1)[0])
    assert {"accuracy", "rerank@2_accuracy", "vote@2_accuracy", "pass@2", "cls_accuracy"} <= set(metrics)
    summary = json.loads((policy / "eval" / "rerank@2_latest.summary.json").read_text())
    assert summary["metrics"] == metrics and summary["epoch"] == 1
    assert cli.main(common + ["--strategy", "rerank"]) == 2  # no verifier: refused before any work


def test_load_refuses_a_directory_that_is_not_a_verifier(tmp_path):
    with pytest.raises(V.VerifierError, match="not a verifier"):
        V.load_verifier(tmp_path, one_device_mesh())


def test_rerank_commands_score_and_refuse_bad_samples(trained, tmp_path, capsys):
    from reft_jax import cli

    run_dir, held_out, _ = trained
    samples = write_sets(tmp_path / "held_out.jsonl", held_out)
    assert cli.main(["rerank", "score", "--verifier", str(run_dir), "--step", "latest", "--samples", samples,
                     "--dataset", "synthetic", "--engine", "nl", "--out", str(tmp_path / "picks.jsonl")]) == 0
    metrics = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert metrics["num_questions"] == len(held_out) and f"rerank@{K}_accuracy" in metrics
    assert len((tmp_path / "picks.jsonl").read_text().splitlines()) == len(held_out)

    bad = tmp_path / "samples.jsonl"
    bad.write_text(json.dumps({"item_id": "synthetic_0", "question": "q", "answer_value": "1"}) + "\n")
    config = tmp_path / "verifier.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ntrain_samples: {bad}\nmesh: {{fsdp: 1}}\n")
    assert cli.main(["rerank", "train", "--config", str(config)]) == 2
    assert "samples.jsonl: line 1: field 'completions': missing" in capsys.readouterr().err
