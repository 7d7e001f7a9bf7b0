"""The verifier at inference: ReFT's reward-model reranker (reference §7.4) scoring and reranking
sampled solutions. Training it is `train/verifier.py`.

Model: the policy's Flax backbone (its params minus the value head) with a 2-class, bias-free
linear head (init N(0, 0.02), HF's `AutoModelForSequenceClassification` score layer) on the
final normed hidden state at the *last non-pad token* of a right-padded row. Params are
`{"backbone": <policy params without value_head>, "head": {"kernel": [D, 2]}}`: the backbone
keeps the policy's layout and shardings, so any policy checkpoint (best SFT, best ReFT) starts
a verifier. The input is `INSTRUCTION + q + COT_TRIGGER + completion` tokenised as ONE string
(as ReFT does here, unlike SFT), head kept at 700 tokens, no EOS. Reranking picks, among each
test question's unique completions with a valid prediction, the most probably correct one
(`inference.rerank_pick`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from reft_jax import parallel
from reft_jax.data.batches import Encoded, bucket_length, pad_sft_batch
from reft_jax.data.prompts import COT_TRIGGER, INSTRUCTION, needs_bos, special_ids, tokenize
from reft_jax.distributed import process_batch_slice
from reft_jax.eval import inference
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig

HEAD_INIT_STD = 0.02  # HF's initializer_range for the score layer
MARKER = "verifier.json"


class VerifierError(ValueError):
    """A verifier that cannot be used as asked (wrong directory, tokenizer mismatch)."""


# ----------------------------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------------------------
def backbone_params(policy_params: dict) -> dict:
    """The policy's params without its value head (the verifier has its own head)."""
    return {k: v for k, v in policy_params.items() if k != "value_head"}


def init_head(rng: jax.Array, hidden_size: int, dtype: Any = jnp.float32) -> dict:
    """The bias-free 2-class score layer, N(0, 0.02)."""
    return {"kernel": (HEAD_INIT_STD * jax.random.normal(rng, (hidden_size, 2), jnp.float32)).astype(dtype)}


def param_axes(config: ModelConfig) -> dict:
    """Logical axes of the verifier's params (the backbone's are the policy's)."""
    return {"backbone": backbone_params(llama.logical_axes(config)), "head": {"kernel": ("embed", None)}}


def param_shapes(config: ModelConfig) -> dict:
    head = jax.ShapeDtypeStruct((config.hidden_size, 2), jnp.dtype(config.param_dtype))
    return {"backbone": backbone_params(llama.param_shapes(config)), "head": {"kernel": head}}


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    return parallel.logical_to_sharding(param_axes(config), param_shapes(config), mesh)


def init_params(policy_params: dict, config: ModelConfig, rng: jax.Array, mesh: Mesh) -> dict:
    """Verifier params from a policy's (placed) params: its backbone plus a fresh head."""
    head = init_head(rng, config.hidden_size, jnp.dtype(config.param_dtype))
    head = jax.device_put(head, param_shardings(config, mesh)["head"])
    return {"backbone": backbone_params(policy_params), "head": head}


# ----------------------------------------------------------------------------------------------
# The model and the train step (pure)
# ----------------------------------------------------------------------------------------------
def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of each row's last real token (right padding; 0 for an all-padding dummy row)."""
    t = jnp.arange(mask.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask.astype(bool), t, 0), axis=1)


def verifier_logits(params: dict, tokens: jax.Array, mask: jax.Array, config: ModelConfig) -> jax.Array:
    """float32 logits [B, 2] from the final hidden state at the last non-pad token."""
    hidden = llama.forward_hidden(params["backbone"], tokens, llama.positions_from_mask(mask), mask, config)
    last = jnp.take_along_axis(hidden, last_token_index(mask)[:, None, None], axis=1)[:, 0]  # [B, D]
    return last @ params["head"]["kernel"].astype(jnp.float32)


def positive_probs(params: dict, tokens: jax.Array, mask: jax.Array, config: ModelConfig) -> jax.Array:
    """P(label = 1), i.e. P(correct), per row [B]."""
    return jax.nn.softmax(verifier_logits(params, tokens, mask, config), axis=-1)[:, 1]



@dataclasses.dataclass(frozen=True)
class Pair:
    """One verifier example: a unique completion of a question, labelled by its correctness."""

    set_index: int  # which sample set (question)
    sample_index: int  # first occurrence of this completion in the set
    question: str
    completion: str
    label: int


def unique_pairs(sets: Sequence[inference.SampleSet]) -> list[Pair]:
    """Every question's unique completions (first occurrence, sample order), valid or not."""
    return [Pair(si, i, s.question, s.completions[i], int(s.correct[i]))
            for si, s in enumerate(sets) for i in inference.unique_indices(s.completions)]


def make_batch(encoded: Sequence[np.ndarray], labels: Sequence[int], indices: Sequence[int], batch_size: int,
               bucket: int, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A right-padded classification batch of `batch_size` rows (dummy rows weigh 0), its
    length the longest row rounded up to `bucket` (few compiled shapes)."""
    items = [Encoded(encoded[i], len(encoded[i])) for i in indices]
    length = bucket_length(max(len(it.ids) for it in items), bucket, max_len)
    padded = pad_sft_batch(items, length, pad_id, batch_size)
    out_labels = np.zeros((batch_size,), np.int32)
    out_labels[:len(indices)] = [labels[i] for i in indices]
    return {"tokens": padded["tokens"], "attention_mask": padded["attention_mask"], "labels": out_labels,
            "weights": padded["attention_mask"].any(axis=1).astype(np.float32)}


def encode_verifier(tokenizer: Any, question: str, completion: str, max_len: int = 700) -> np.ndarray:
    """Token ids of `INSTRUCTION + q.strip() + COT_TRIGGER + completion` as one string (BOS only
    for the families that need it), head kept, no EOS."""
    bos = [tokenizer.bos_token_id] if needs_bos(tokenizer) else []
    ids = bos + tokenize(tokenizer, INSTRUCTION + question.strip() + COT_TRIGGER + completion)
    return np.asarray(ids[:max_len], np.int32)


# ----------------------------------------------------------------------------------------------
# Scoring with a verifier
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Verifier:
    """A verifier ready to score: params on `mesh` and its own tokenizer."""

    model_config: ModelConfig
    params: dict
    tokenizer: Any
    mesh: Mesh
    max_len: int = 700
    bucket: int = 64
    _probs: Callable | None = None

    def __post_init__(self) -> None:
        if self._probs is None:
            mc = self.model_config
            self._probs = jax.jit(lambda p, t, m: positive_probs(p, t, m, mc))

    def with_params(self, params: dict) -> "Verifier":
        """The same verifier (and compiled scorer) with other params (training-time evals)."""
        return dataclasses.replace(self, params=params)

    def score(self, questions: Sequence[str], completions: Sequence[str], batch_size: int = 24) -> np.ndarray:
        """P(correct) of each (question, completion), float32 [N]."""
        encoded = [encode_verifier(self.tokenizer, q, c, self.max_len) for q, c in zip(questions, completions)]
        if not encoded:
            return np.zeros((0,), np.float32)
        div = parallel.batch_divisor(self.mesh)
        batch_size = -(-batch_size // div) * div
        rows = process_batch_slice(batch_size, self.mesh)
        pad = special_ids(self.tokenizer).pad
        out = []
        for start in range(0, len(encoded), batch_size):
            idx = list(range(start, min(start + batch_size, len(encoded))))
            batch = make_batch(encoded, [0] * len(encoded), idx, batch_size, self.bucket, self.max_len, pad)
            local = {k: batch[k][rows] for k in ("tokens", "attention_mask")}
            on_mesh = parallel.shard_batch(local, self.mesh)
            probs = self._probs(self.params, on_mesh["tokens"], on_mesh["attention_mask"])
            out.append(_host(probs)[:len(idx)])
        return np.concatenate(out).astype(np.float32)


def _host(x: jax.Array) -> np.ndarray:
    """A batch-sharded result as one host array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def rerank(verifier: Verifier, sets: Sequence[inference.SampleSet], kind: str, batch_size: int = 24
           ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score every unique completion, rerank each question, and summarise: rerank@k, vote@k,
    pass@k (any correct, the upper bound), pass@1 and `cls_accuracy` (argmax of the 2-class head
    against the labels over all unique completions, ReFT's cls_acc). Returns (metrics, one
    record per question with the pick)."""
    pairs = unique_pairs(sets)
    probs = verifier.score([p.question for p in pairs], [p.completion for p in pairs], batch_size)
    per_set: list[dict[int, float]] = [{} for _ in sets]
    for pair, prob in zip(pairs, probs):
        per_set[pair.set_index][pair.sample_index] = float(prob)
    metrics = inference.summarize(sets, kind, per_set)
    metrics["cls_accuracy"] = float(np.mean([(prob > 0.5) == bool(p.label) for p, prob in zip(pairs, probs)])) \
        if pairs else 0.0
    records = []
    for s, p in zip(sets, per_set):
        pick = inference.rerank_pick(inference.rerank_candidates(s, kind), p)
        records.append({"item_id": s.item_id, "answer_value": s.answer_value, "pick": pick,
                        "completion": None if pick is None else s.completions[pick],
                        "prediction": None if pick is None else s.predictions[pick],
                        "correct": pick is not None and s.correct[pick],
                        "prob": None if pick is None else p[pick]})
    return metrics, records


def check_policy_tokenizer(verifier: Verifier, policy_tokenizer: Any, where: str) -> None:
    """The verifier must read the policy's texts with the policy's vocabulary: a backbone sized
    for another tokenizer, or another tokenizer, would score garbage without failing."""
    n_policy = len(policy_tokenizer)
    if verifier.model_config.vocab_size < n_policy:
        raise VerifierError(f"{where}: the verifier's backbone has vocab size {verifier.model_config.vocab_size}, "
                            f"but the policy tokenizer has {n_policy} tokens: it was not built from this policy")
    mine, theirs = verifier.tokenizer.get_vocab(), policy_tokenizer.get_vocab()
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        raise VerifierError(f"{where}: the verifier's tokenizer ({len(mine)} tokens) differs from the policy's "
                            f"({len(theirs)} tokens), e.g. {diff}: train the verifier from this policy")
