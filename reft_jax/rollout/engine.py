"""One rollout path for PPO and online self-training: sample, score on the host, and let the
caller's device work (PPO's score pass) run meanwhile.

One PPO step, in dispatch order (``->`` = asynchronous dispatch, ``[wait]`` = the host blocks)::

    1. -> sample(policy, prefixes)                      device: prefill + decode loop
    2. [wait] fetch tokens and lengths                  the host needs the text to score it
    3. -> score_pass(policy, reference, rollout)        device: two full forwards (policy
                                                        log-probs + values, reference log-probs)
    4.    decode texts, extract answers / run the       host (and the sandbox worker processes)
          programs in the sandbox pool                  while the device runs 3
    5. -> assemble(scores) -> ppo_epochs x minibatch    device: GAE, whitening, updates
          updates                                       (ppo.py)
    6.    encode the next batch's prefixes, write       host while the device runs 5
          logs                                          (ppo.py)

The score pass needs no reward, which is what lets 3 and 4 overlap: on an accelerator the
reference and policy forwards are hidden behind program execution (or the other way round);
the timer's ``reward`` span is host work, ``score_wait`` what was left of 3 after it.
Sampling cannot overlap the previous update: ReFT is on-policy, the rollout needs the updated
params.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from reft_jax import parallel
from reft_jax.rollout import sampler as sampling
from reft_jax.data.batches import bucket_length, epoch_batches, left_pad, steps_per_epoch
from reft_jax.data.prompts import encode_prefix, header_newline
from reft_jax.data.sources import Example
from reft_jax.metrics import Timer
from reft_jax.model.config import ModelConfig
from reft_jax.reward import reward as reward_lib
from reft_jax.reward.answers import completion_from_text
from reft_jax.reward.sandbox import STATUSES


@dataclasses.dataclass
class RolloutConfig:
    """How a run samples its rollouts: the settings PPO and online self-training share (each
    run's config extends it). ReFT: 32 questions a step, one sample each, pure sampling
    (temperature 1, no top-k / top-p), prompt (padded) + completion capped at 700 tokens as
    HF's ``max_length``; widths are bucketed (multiples of ``prompt_bucket`` /
    ``length_bucket``) so a run compiles a handful of programs."""

    batch_questions: int = 32
    n_samples: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_total_len: int = 700
    max_new_tokens: int | None = None  # None: as many as max_total_len allows
    prompt_bucket: int = 32
    length_bucket: int = 64
    # A last partial question batch each epoch: ``fill`` completes it with the epoch's first
    # questions (ReFT's DataLoader: accelerate's even_batches), ``drop`` leaves it out.
    last_batch: Literal["fill", "drop"] = "fill"

    def question_batches(self, n: int, seed: int, epoch: int) -> list[np.ndarray]:
        """Indices of each step's questions in `epoch` (a pure function of (seed, epoch))."""
        return epoch_batches(n, self.batch_questions, seed, epoch, last=self.last_batch)

    def rollout_steps(self, n: int) -> int:
        """Rollout steps per epoch over `n` training questions."""
        return steps_per_epoch(n, self.batch_questions, self.last_batch)

    def validate_rollout(self, max_prompt_len: int) -> None:
        from reft_jax.config import ConfigError

        for name in ("batch_questions", "n_samples", "prompt_bucket", "length_bucket"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", key=name, value=getattr(self, name))
        if max_prompt_len >= self.max_total_len:
            raise ConfigError(f"must be below max_total_len={self.max_total_len}", key="data.max_prompt_len",
                              value=max_prompt_len)

    @property
    def rows(self) -> int:
        """Sequences per rollout step."""
        return self.batch_questions * self.n_samples

    def sample_config(self, eos_ids: tuple[int, ...], pad_id: int) -> sampling.SampleConfig:
        return sampling.SampleConfig(max_new_tokens=self.max_new_tokens or self.max_total_len,
                                     max_total_len=self.max_total_len, temperature=self.temperature,
                                     top_k=self.top_k, top_p=self.top_p, n=self.n_samples, eos_ids=eos_ids,
                                     pad_id=pad_id)


@dataclasses.dataclass(frozen=True)
class Prefixes:
    """Left-padded rollout prefixes of one question batch (host arrays)."""

    tokens: np.ndarray  # int32 [Q, P]
    mask: np.ndarray  # bool [Q, P]
    truncated: int  # prompts cut to max_prompt_len (ReFT keeps the head)


def encode_prefixes(tokenizer: Any, questions: Sequence[str], engine: str, max_prompt_len: int,
                    pad_id: int, bucket: int = 32, header: str = "auto") -> Prefixes:
    """ReFT's rollout prefixes (P-CoT: with the ``def solution():`` header, its newline as
    ``header`` says: `data.header_newline`), each truncated to ``max_prompt_len`` tokens keeping
    the head, left-padded to the longest rounded up to ``bucket`` (few compiled shapes)."""
    newline = header_newline(tokenizer, header)
    ids = [encode_prefix(tokenizer, q, engine, max_len=10**9, newline=newline) for q in questions]
    truncated = sum(len(x) > max_prompt_len for x in ids)
    ids = [x[:max_prompt_len] for x in ids]
    width = bucket_length(max(len(x) for x in ids), bucket, max_prompt_len)
    tokens, mask = left_pad(ids, width, pad_id)
    return Prefixes(tokens, mask, truncated)


# ----------------------------------------------------------------------------------------------
# Rollout arrays
# ----------------------------------------------------------------------------------------------
def trim_rollout(tokens: np.ndarray, mask: np.ndarray, logprobs: np.ndarray, prompt_width: int,
                 bucket: int, eos_id: int, pad_id: int) -> dict[str, np.ndarray]:
    """The PPO rollout batch ``[R, L]`` from the sampler's ``[R, P + T]`` arrays.

    ``L = P + (longest completion rounded up to `bucket`)``: ReFT pads to the longest sequence of
    the batch; a bucket keeps the number of compiled score/update programs small.
    ``mask_tokens`` are the tokens as the action mask must read them: an EOS id on every row's
    last real token. For rows that ended with EOS this changes nothing; a row cut by the length
    cap then gets its actions up to its last real token, which is ReFT's "no EOS: actions run
    to the last column" now that the padded width can exceed the row (the forward passes keep
    reading the real ``tokens``). ``sampler_logp`` is the sampler's per-token log-prob moved to
    the action convention (column ``t`` emits ``t+1``).
    """
    P = prompt_width
    lengths = mask[:, P:].sum(-1)
    if (lengths < 1).any():
        raise ValueError("a rollout row has no completion token (prompt longer than the length cap?)")
    T = mask.shape[1] - P
    L = P + min(T, bucket_length(int(lengths.max()), bucket, T))
    tokens, mask = tokens[:, :L].copy(), mask[:, :L].copy()
    tokens[:, P:][~mask[:, P:]] = pad_id
    mask_tokens = tokens.copy()
    mask_tokens[np.arange(len(tokens)), P + lengths - 1] = eos_id
    logp = np.zeros(tokens.shape, np.float32)
    logp[:, P - 1:L - 1] = logprobs[:, :L - P]
    return {"tokens": tokens.astype(np.int32), "mask_tokens": mask_tokens.astype(np.int32),
            "attention_mask": mask, "prompt_len": np.full((len(tokens),), P, np.int32), "sampler_logp": logp}


def decode_texts(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """ReFT's scored text: decode the whole real sequence (prompt + completion) without special
    tokens, strip, keep what follows the last CoT trigger, strip (reference §2)."""
    seqs = [row[m].tolist() for row, m in zip(tokens, mask)]
    return [completion_from_text(t) for t in tokenizer.batch_decode(seqs, skip_special_tokens=True)]


@dataclasses.dataclass(frozen=True)
class Rewards:
    """Host-side outcome of scoring one rollout batch."""

    scores: np.ndarray  # float32 [R]: 1 / 0.1 / 0
    correct: np.ndarray  # bool [R]
    statuses: collections.Counter  # executor (P-CoT) or extraction (N-CoT) statuses
    texts: list[str]


def score_rollouts(texts: Sequence[str], examples: Sequence[Example], kind: str, engine: str,
                   executor: Any, config: reward_lib.RewardConfig | None = None) -> Rewards:
    """Rewards of the decoded texts (P-CoT programs run as one batch in the sandbox)."""
    scored = reward_lib.score_completions(texts, [ex.answer_value for ex in examples], kind, engine,
                                          executor, config)
    return Rewards(np.asarray([s.reward for s in scored], np.float32),
                   np.asarray([s.correct for s in scored], bool),
                   collections.Counter(s.status for s in scored), list(texts))


# ----------------------------------------------------------------------------------------------
# One rollout, overlapped
# ----------------------------------------------------------------------------------------------
class Rollout(NamedTuple):
    """One rollout: the trimmed host arrays (``trim_rollout``), the same on the mesh, whatever
    the caller's device work returned (None without it), and the host-side rewards."""

    host: dict[str, np.ndarray]
    batch: dict[str, jax.Array]
    device: Any
    rewards: Rewards


@dataclasses.dataclass
class RolloutEngine:
    """Everything a rollout needs besides params; built once per run."""

    model_config: ModelConfig
    sample_config: sampling.SampleConfig
    tokenizer: Any
    mesh: Mesh
    kind: str  # numeric | mcq
    engine: str  # nl | python
    executor: Any = None
    reward_config: reward_lib.RewardConfig | None = None
    length_bucket: int = 64
    keep_sampler_logp: bool = False  # keep the sampler's log-probs in the batch (``sampler_logp``)
    sync: bool = False  # block after every phase: exact per-phase device times, no overlap

    def run(self, params: Any, prefixes: Prefixes, examples: Sequence[Example], rng: jax.Array, timer: Timer,
            on_device: Callable[[dict[str, jax.Array]], Any] | None = None) -> Rollout:
        """Sample, dispatch ``on_device(batch)`` (PPO: its score pass), score on the host meanwhile.

        ``examples`` has one entry per prompt; with ``n`` samples per prompt the rows of prompt
        ``i`` are ``i*n .. i*n+n-1`` (what the group advantage estimators expect).
        """
        sc = self.sample_config
        with timer("rollout"):
            out = sampling.sample(params, prefixes.tokens, prefixes.mask, rng, self.model_config, sc,
                                  mesh=self.mesh)
            tokens, mask, logprobs = jax.device_get((out.tokens, out.mask, out.logprobs))
            host = trim_rollout(tokens, mask, logprobs, prefixes.tokens.shape[1], self.length_bucket,
                                sc.eos_ids[0], sc.pad_id)
            if not self.keep_sampler_logp:
                del host["sampler_logp"]
            batch = parallel.shard_batch(host, self.mesh)
        device = None
        if on_device is not None:
            with timer("score_dispatch" if not self.sync else "score") as span:
                device = on_device(batch)
                if self.sync:
                    span.block(device)
        with timer("reward"):
            rows = [ex for ex in examples for _ in range(sc.n)]
            texts = decode_texts(self.tokenizer, host["tokens"], host["attention_mask"])
            rewards = score_rollouts(texts, rows, self.kind, self.engine, self.executor, self.reward_config)
        if device is not None and not self.sync:
            with timer("score_wait") as span:
                span.block(device)
        return Rollout(host, batch, device, rewards)


def status_counts(statuses: collections.Counter) -> dict[str, int]:
    """Fixed-key counts of executor outcomes (zeros included, so every record has every key)."""
    return {f"exec_{s}": int(statuses.get(s, 0)) for s in STATUSES}


def scores_on_mesh(scores: np.ndarray, mesh: Mesh) -> jax.Array:
    return parallel.shard_batch(jnp.asarray(scores, jnp.float32), mesh)
