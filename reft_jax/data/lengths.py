"""Lengths: what a run's token budgets may be, and what happens to data that does not fit them.

`check_lengths(cfg, model_config)` refuses, at run setup (where the model is known), any length
setting longer than the model's `max_position_embeddings`.

`data.overlong` decides what happens to a *training* example longer than its budget: an SFT
example (prompt + target + EOS) over `data.max_len` tokens, a PPO / online self-training question
whose rollout prefix is over `data.max_prompt_len`:

* ``drop`` (default): the example is left out of the training set (at load time, so batches stay
  full). The default because a cut SFT example keeps its head and loses its end: the answer line
  and EOS, so the model is trained to ramble on where it should answer; a cut prompt loses the
  question's end (often the question itself), so the policy is rewarded on a problem it never saw.
* ``truncate``: keep the head, as ReFT's official code does (its SFT collator cuts at
  `max_input_length`, its rollouts keep the first `max_prompt_len` prompt tokens).
* ``error``: stop with one line naming the file, how many examples are too long and the longest.

Every policy counts and reports the over-long examples (how many, the longest, the file). Test
and validation prompts are never dropped (that would change what the accuracy is measured on):
they keep their head, with a warning (`rollout.generation`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from reft_jax.config import ConfigError
from reft_jax.data.batches import Encoded
from reft_jax.data.formats import DataError, Example
from reft_jax.data.prompts import encode_prefix, header_newline

OVERLONG = ("drop", "truncate", "error")

# The length settings each trainer uses (a run config's class or a base class -> dotted keys); they
# must fit the model's positions. A PPO run's `data.max_len` (an SFT setting) is not its business.
_EVAL = ("data.max_prompt_len", "eval.max_total_len")
LENGTH_KEYS: dict[str, tuple[str, ...]] = {
    "SFTConfig": ("data.max_len", *_EVAL),
    "PPOConfig": ("max_total_len", *_EVAL),
    "OnlineConfig": ("max_total_len", "gold_max_len", *_EVAL),
    "VerifierConfig": ("max_len",),
    "RunConfig": _EVAL,
}


def _lookup(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def check_lengths(cfg: Any, model_config: Any) -> None:
    """ConfigError (one line, every offending key) when a length setting the run `cfg` uses
    (`LENGTH_KEYS`) exceeds the model's `max_position_embeddings`. An evaluation without
    `eval.max_total_len` is bounded by `data.max_prompt_len + eval.max_new_tokens`, checked as
    `eval.max_new_tokens`."""
    limit = int(model_config.max_position_embeddings)
    keys = next((LENGTH_KEYS[k.__name__] for k in type(cfg).__mro__ if k.__name__ in LENGTH_KEYS), _EVAL)
    bad = []
    for key in keys:
        value = _lookup(cfg, key)
        if isinstance(value, int) and value > limit:
            bad.append(f"{key}={value}")
    prompt, new = _lookup(cfg, "data.max_prompt_len"), _lookup(cfg, "eval.max_new_tokens")
    if "eval.max_total_len" in keys and _lookup(cfg, "eval.max_total_len") is None \
            and isinstance(prompt, int) and isinstance(new, int) and prompt + new > limit:
        bad.append(f"eval.max_new_tokens={new} (+ data.max_prompt_len={prompt}, no eval.max_total_len)")
    if bad:
        raise ConfigError(f"{'; '.join(bad)}: longer than the model's max_position_embeddings={limit}; "
                          f"lower {'it' if len(bad) == 1 else 'them'} to at most {limit}")


@dataclasses.dataclass(frozen=True)
class OverlongReport:
    """What `fit_examples` / `fit_prompts` found: `count` of `total` examples in `where` were
    longer than `limit` tokens (`key`); the longest is `longest_id` at `longest` tokens."""

    where: str
    key: str
    limit: int
    policy: str
    total: int
    count: int = 0
    longest: int = 0
    longest_id: str | None = None
    kept: int = 0

    def line(self) -> str:
        """One line for the run's log ('' when nothing was over-long)."""
        if not self.count:
            return ""
        done = {"drop": f"dropped them ({self.kept:,} remain)",
                "truncate": f"kept their first {self.limit} tokens (ReFT's truncation)",
                "error": "stopping"}[self.policy]
        return (f"{self.count:,} of {self.total:,} training examples in {self.where} are longer than "
                f"{self.key}={self.limit} tokens (longest: {self.longest_id}, {self.longest:,} tokens); "
                f"data.overlong={self.policy}: {done}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fit(lengths: Sequence[int], ids: Sequence[str], limit: int, policy: str, where: str, key: str
         ) -> tuple[list[int], OverlongReport]:
    """(indices kept, report); raises DataError under `error` when any is over-long."""
    if policy not in OVERLONG:
        raise ConfigError(f"must be one of {', '.join(OVERLONG)}", key="data.overlong", value=policy)
    over = [i for i, n in enumerate(lengths) if n > limit]
    keep = [i for i in range(len(lengths)) if policy != "drop" or lengths[i] <= limit]
    worst = max(over, key=lambda i: lengths[i]) if over else None
    report = OverlongReport(where=where, key=key, limit=limit, policy=policy, total=len(lengths), count=len(over),
                            longest=lengths[worst] if over else 0, longest_id=ids[worst] if over else None,
                            kept=len(keep))
    if over and policy == "error":
        raise DataError(f"{len(over):,} of {len(lengths):,} training examples are longer than {key}={limit} "
                        f"tokens (longest: {report.longest_id}, {report.longest:,} tokens); raise {key} or "
                        "set data.overlong=drop (leave them out) or truncate (keep their head)", where)
    if not keep:
        raise DataError(f"every one of the {len(lengths):,} training examples is longer than {key}={limit} "
                        f"tokens (the shortest has {min(lengths):,}); raise {key}", where)
    return keep, report


def fit_examples(encoded: Sequence[Encoded], examples: Sequence[Example], max_len: int, policy: str,
                 where: str, key: str = "data.max_len") -> tuple[list[Encoded], OverlongReport]:
    """The SFT training examples that fit `max_len` tokens under `policy` (drop | truncate |
    error), and the report. `encoded` are whole (`encode_sft(..., max_len=None)`), in the order
    of `examples` (whose item_ids name the longest); truncation keeps the head."""
    if len(encoded) != len(examples):
        raise ValueError(f"{len(encoded)} encoded examples for {len(examples)} rows")
    keep, report = _fit([len(e.ids) for e in encoded], [ex.item_id for ex in examples], max_len, policy,
                        where, key)
    out = []
    for i in keep:
        e = encoded[i]
        if len(e.ids) > max_len:  # truncate: the head, as ReFT's collator
            e = Encoded(ids=np.asarray(e.ids[:max_len], np.int32), n_prompt=min(e.n_prompt, max_len))
        out.append(e)
    return out, report


def fit_prompts(tokenizer: Any, examples: Sequence[Example], engine: str, max_prompt_len: int, policy: str,
                where: str, header: str = "auto") -> tuple[list[Example], OverlongReport]:
    """The training questions whose rollout prefix (as `rollout.engine.encode_prefixes` builds
    it) fits `max_prompt_len` tokens under `policy`, and the report. Under `truncate` every
    question is kept (the prefix keeps its head when encoded); under `drop` the long ones are
    left out, so every rollout batch stays full."""
    newline = header_newline(tokenizer, header)
    lengths = [len(encode_prefix(tokenizer, ex.question, engine, max_len=10**9, newline=newline))
               for ex in examples]
    keep, report = _fit(lengths, [ex.item_id for ex in examples], max_prompt_len, policy, where,
                        "data.max_prompt_len")
    return [examples[i] for i in keep], report
