"""Evaluation as ReFT does it: greedy top-1, voting@k and pass@k (reference §2, §3, §5.8, §7.3).

Shared by the SFT and PPO trainers and `reft eval`. Generation goes through
`generation.generate_texts`; everything else here is host-side and pure: building the prefixes,
reconstructing the text ReFT scores, scoring (P-CoT programs through the sandbox's batch API) and
voting. The caller writes the per-example records (`write_predictions`).

Prefixes: `"sft"` is `INSTRUCTION + q + COT_TRIGGER` for both engines (SFT evaluation; the P-CoT
model writes `def solution():` itself); `"rollout"` adds the `def solution():` header for P-CoT
(RL evaluation). ReFT decodes prompt + completion and keeps the text after the last COT trigger,
so with the rollout prefix the scored program is header + completion: `scored_text` does exactly
that on the prefix string and the generated text.
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
from typing import Any, NamedTuple, Sequence

from reft_jax.data.prompts import header_newline, rollout_prefix, sft_prompt
from reft_jax.reward import reward as reward_lib
from reft_jax.reward.answers import MCQ, Prediction, answer_kind, completion_from_text, is_correct, parse_gold

PREFIXES = ("sft", "rollout")


class Score(NamedTuple):
    """One scored completion (unpacks as `(prediction, correct, reward)`)."""

    prediction: Prediction
    correct: bool
    reward: float


def eval_prefix(question: str, engine: str, prefix: str = "sft", newline: bool = True) -> str:
    """The generation prefix of one question (see the module docstring); `newline` ends a P-CoT
    rollout header (`prompts.header_newline`)."""
    if prefix == "sft":
        return sft_prompt(question)
    if prefix == "rollout":
        return rollout_prefix(question, engine, newline)
    raise ValueError(f"prefix must be one of {PREFIXES}, got {prefix!r}")


def eval_prefixes(examples: Sequence[Any], data_cfg: Any, prefix: str, tokenizer: Any) -> list[str]:
    """`eval_prefix` of every example; a P-CoT rollout header ends as `data_cfg.header_newline`
    decides for this tokenizer."""
    newline = True
    if prefix == "rollout" and data_cfg.engine == "python":
        newline = header_newline(tokenizer, data_cfg.header_newline)
    return [eval_prefix(ex.question, data_cfg.engine, prefix, newline) for ex in examples]


def scored_text(prefix_text: str, generated: str) -> str:
    """What ReFT scores: the text after the last COT trigger of prefix + generation (for a
    P-CoT rollout prefix: the program header followed by the generated body)."""
    return completion_from_text(prefix_text + generated)


def score_completions(completions: Sequence[str], examples: Sequence[Any], dataset: str, engine: str,
                      executor: Any = None, config: reward_lib.RewardConfig | None = None) -> list[Score]:
    """Score texts as returned by `scored_text` against the examples' gold answers. `dataset`
    is a dataset name or an item_id (`svamp_12`): it picks numeric vs multiple-choice answers."""
    golds = [ex.answer_value for ex in examples]
    scored = reward_lib.score_completions(completions, golds, answer_kind(dataset), engine, executor, config)
    return [Score(s.prediction, s.correct, s.reward) for s in scored]


def majority_vote(predictions: Sequence[Prediction], kind: str) -> Prediction:
    """ReFT's vote: the most common valid prediction (not None; MCQ: one character), counted by
    exact equality; ties go to the value seen first; None when nothing is valid."""
    valid = [p for p in predictions if p is not None and (kind != MCQ or len(p) == 1)]
    if not valid:
        return None
    return collections.Counter(valid).most_common(1)[0][0]  # stable: first seen wins ties


def vote_summary(samples: Sequence[Score], gold: str, kind: str) -> dict[str, Any]:
    """Voting@k and pass@k of one question's k scored samples."""
    vote = majority_vote([s.prediction for s in samples], kind)
    return {"vote": vote, "vote_correct": is_correct(vote, parse_gold(gold, kind), kind),
            "pass": any(s.correct for s in samples)}


def in_context_texts(tokenizer: Any, prompt_ids: Sequence[int], completions: Sequence[Any],
                     clean_up_spaces: bool = False) -> list[str]:
    """Completion texts as they read after their prompt. ReFT decodes prompt + completion
    together; decoding a completion alone is lossy for SentencePiece tokenizers (Llama,
    CodeLlama), whose decoder drops the leading space of a text: a P-CoT body's first
    indentation would lose a space and the program would not run. `clean_up_spaces` is
    transformers' `clean_up_tokenization_spaces` as 4.x applied it (" ." -> ".", " ," -> ",",
    " n't" -> "n't", ...; `generation.clean_up_spaces`): ReFT's evaluation decodes with it, its
    rollouts and `sampling.py` without."""
    from reft_jax.rollout.generation import clean_up_spaces as clean

    def decode(seqs: list[list[int]]) -> list[str]:
        texts = tokenizer.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [clean(t) for t in texts] if clean_up_spaces else texts

    prompt = decode([list(prompt_ids)])[0]
    fulls = decode([list(prompt_ids) + list(map(int, c)) for c in completions])
    alone = None
    out = []
    for i, full in enumerate(fulls):
        if full.startswith(prompt):
            out.append(full[len(prompt):])
        else:  # a tokenizer whose decode of the prefix changes in context: fall back
            alone = alone or decode([list(map(int, c)) for c in completions])
            out.append(alone[i])
    return out


def generate_for_prefixes(params, model_config, tokenizer, prompts: list[str], sample_config, rng, batch_size: int,
              mesh, show_progress: bool, max_prompt_len: int | None, clean_up_spaces: bool = False
              ) -> list[list[str]]:
    """Completion texts [prompt][sample], decoded in context (the seam tests replace)."""
    from reft_jax.rollout.generation import generate

    gen = generate(params, model_config, tokenizer, prompts, sample_config, rng, batch_size, mesh,
                   show_progress, max_prompt_len=max_prompt_len)
    return [in_context_texts(tokenizer, ids, comps, clean_up_spaces)
            for ids, comps in zip(gen.prompt_ids, gen.completion_ids)]


def sample_configs(eval_cfg: Any, k: int) -> tuple[Any, Any]:
    """(greedy, voting) SampleConfigs from an EvalConfig: both cap the total length as ReFT's
    eval does; voting draws k samples per question at temperature 1 with top-k 50 (HF's
    `generate` default, which ReFT's `sampling.py` ran with)."""
    from reft_jax.rollout.sampler import SampleConfig

    common = {"max_new_tokens": eval_cfg.max_new_tokens, "max_total_len": eval_cfg.max_total_len}
    greedy = SampleConfig(greedy=True, **common)
    vote = SampleConfig(temperature=eval_cfg.vote_temperature, top_k=eval_cfg.vote_top_k, n=max(k, 1), **common)
    return greedy, vote


def eval_batch_size(requested: int, mesh: Any) -> int:
    """Prompts per generation batch: rounded up to a multiple of the mesh's batch axes."""
    if mesh is None:
        return requested
    from reft_jax.parallel import batch_divisor

    div = batch_divisor(mesh)
    return -(-requested // div) * div


def evaluate(params: Any, model_config: Any, tokenizer: Any, examples: Sequence[Any], data_cfg: Any,
             eval_cfg: Any, rng: Any, mesh: Any, executor: Any = None, vote_k: int = 0,
             prefix: str = "sft", show_progress: bool = False, clean_up_spaces: bool = True) -> dict[str, Any]:
    """Greedy top-1 accuracy (and with `vote_k`, voting@k and pass@k from k samples per question).

    Greedy completions are decoded with `clean_up_spaces` (transformers'
    `clean_up_tokenization_spaces`; ReFT's evaluation: on), the voting samples without it, as
    ReFT's `sampling.py` decodes them.

    `data_cfg` gives the dataset (numeric vs multiple choice), the engine and `max_prompt_len`;
    `eval_cfg` the batch size and length caps. Returns `{"metrics": {accuracy, mean_reward,
    num_examples[, vote@k_accuracy, pass@k]}, "predictions": [one JSON-able record per example]}`.
    """
    import jax

    kind = answer_kind(data_cfg.dataset)
    prefixes = eval_prefixes(examples, data_cfg, prefix, tokenizer)
    greedy_cfg, vote_cfg = sample_configs(eval_cfg, vote_k)
    greedy_rng, vote_rng = jax.random.split(rng)
    batch = eval_batch_size(eval_cfg.batch_size, mesh)
    generated = generate_for_prefixes(params, model_config, tokenizer, prefixes, greedy_cfg, greedy_rng, batch, mesh,
                          show_progress, data_cfg.max_prompt_len, clean_up_spaces)
    texts = [scored_text(p, g[0]) for p, g in zip(prefixes, generated)]
    scores = score_completions(texts, examples, data_cfg.dataset, data_cfg.engine, executor)
    records = [{"item_id": ex.item_id, "answer_value": ex.answer_value, "completion": text,
                "prediction": s.prediction, "correct": s.correct, "reward": s.reward}
               for ex, text, s in zip(examples, texts, scores)]
    n = max(len(examples), 1)
    metrics = {"accuracy": sum(s.correct for s in scores) / n,
               "mean_reward": sum(s.reward for s in scores) / n, "num_examples": len(examples)}
    if vote_k > 0:
        samples = generate_for_prefixes(params, model_config, tokenizer, prefixes, vote_cfg, vote_rng, batch, mesh,
                            show_progress, data_cfg.max_prompt_len)
        votes = _votes(prefixes, samples, examples, data_cfg, kind, executor)
        for record, vote in zip(records, votes):
            record.update(vote)
        metrics[f"vote@{vote_k}_accuracy"] = sum(v["vote_correct"] for v in votes) / n
        metrics[f"pass@{vote_k}"] = sum(v["pass"] for v in votes) / n
    return {"metrics": metrics, "predictions": records}


def _votes(prefixes: Sequence[str], samples: Sequence[Sequence[str]], examples: Sequence[Any], data_cfg: Any,
           kind: str, executor: Any) -> list[dict[str, Any]]:
    """Each question's k samples scored (as one batch) and voted."""
    k = len(samples[0]) if samples else 0
    texts = [scored_text(p, g) for p, gs in zip(prefixes, samples) for g in gs]
    rows = [ex for ex in examples for _ in range(k)]
    scores = score_completions(texts, rows, data_cfg.dataset, data_cfg.engine, executor)
    return [vote_summary(scores[i * k:(i + 1) * k], ex.answer_value, kind) for i, ex in enumerate(examples)]


def write_predictions(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> pathlib.Path:
    """One JSON object per line (atomic: written to a temporary file, then renamed)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path
