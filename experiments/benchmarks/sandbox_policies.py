"""How many P-CoT programs the sandbox policy changes: every program runs under `policy: reft`
(the default: what the official ReFT executor runs) and under `policy: strict` (the narrower
first screen), same timeout, and is scored as in training (`reward.score_completions`: status,
extracted answer, reward against the gold answer). Issue 16.

Programs come from a `reft sample` JSONL (`--samples`, P-CoT: the text after the CoT trigger of
prompt + completion, as `reft eval` / `reft rerank` score it) and/or the SVAMP P-CoT reference
programs (`--reference`: `answer_cot` of svamp_python_sdp.json, the only reference programs in
the shared data). Prints, per source: programs, how many differ in status / extracted answer /
reward, the (strict -> reft) status pairs of the differing ones with counts, and up to
`--examples` differing programs.

    .venv/bin/python experiments/benchmarks/sandbox_policies.py --reference [--limit N]
    .venv/bin/python experiments/benchmarks/sandbox_policies.py --samples samples.jsonl [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pathlib
import sys
import time

from reft_jax.data.formats import answer_kind
from reft_jax.reward.reward import score_completions
from reft_jax.reward.sandbox import ProgramExecutor

POLICIES = ("strict", "reft")


def reference_programs(path: pathlib.Path, limit: int) -> list[tuple[str, str, str]]:
    """(item_id, program, gold) of the SVAMP reference programs."""
    rows = json.loads(path.read_text())
    rows = rows[:limit] if limit else rows
    return [(r["item_id"], r["answer_cot"], str(r["answer_value"])) for r in rows]


def sample_programs(path: pathlib.Path, dataset: str | None, limit: int) -> list[tuple[str, str, str]]:
    """(item_id, scored text, gold) of every completion in a `reft sample` file (gold answers
    missing from the file are looked up in `dataset`'s test and train splits)."""
    from reft_jax.data.sources import load_dataset
    from reft_jax.eval.evaluate import Score
    from reft_jax.eval.inference import read_sample_file

    def examples():
        if dataset is None:
            return []
        return [ex for split in ("test", "train") for ex in load_dataset(dataset, split, "python")]

    # we score every text ourselves, twice: the file's own labels (if any) are ignored
    sets = read_sample_file(path, examples, score=lambda texts, rows: [Score(None, False, 0.0)] * len(texts))
    sets = sets[:limit] if limit else sets
    return [(s.item_id, text, s.answer_value) for s in sets for text in s.completions]


def run_policy(policy: str, items: list[tuple[str, str, str]], timeout: float) -> tuple[list, float]:
    """Scored outcomes of every program under one policy (one executor, one batch per answer
    kind) and the wall seconds it took."""
    by_kind: dict[str, list[int]] = collections.defaultdict(list)
    for i, (item_id, _, _) in enumerate(items):
        by_kind[answer_kind(item_id)].append(i)
    out: list = [None] * len(items)
    t0 = time.perf_counter()
    with ProgramExecutor(policy=policy, timeout=timeout) as ex:
        for kind, idx in by_kind.items():
            scored = score_completions([items[i][1] for i in idx], [items[i][2] for i in idx], kind, "python", ex)
            for i, s in zip(idx, scored):
                out[i] = s
    return out, time.perf_counter() - t0


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _snippet(program: str, lines: int = 8, width: int = 100) -> str:
    body = program.strip("\n").splitlines()
    shown = [ln[:width] for ln in body[:lines]]
    if len(body) > lines:
        shown.append(f"... ({len(body) - lines} more lines)")
    return "\n".join("      | " + ln for ln in shown)


def compare(name: str, items: list[tuple[str, str, str]], timeout: float, n_examples: int) -> dict:
    results, walls = {}, {}
    for policy in POLICIES:
        results[policy], walls[policy] = run_policy(policy, items, timeout)
    strict, reft = results["strict"], results["reft"]
    status = [i for i, (a, b) in enumerate(zip(strict, reft)) if a.status != b.status]
    answer = [i for i, (a, b) in enumerate(zip(strict, reft)) if not _same(a.prediction, b.prediction)]
    reward = [i for i, (a, b) in enumerate(zip(strict, reft)) if a.reward != b.reward]
    correct = [i for i, (a, b) in enumerate(zip(strict, reft)) if a.correct != b.correct]
    differ = sorted(set(status) | set(answer) | set(reward))
    pairs = collections.Counter(f"{strict[i].status} -> {reft[i].status}" for i in differ)
    unique = len({p for _, p, _ in items})

    print(f"\n== {name}: {len(items)} programs ({unique} distinct), timeout {timeout:g} s; "
          f"wall strict {walls['strict']:.1f} s, reft {walls['reft']:.1f} s")
    for policy in POLICIES:
        counts = collections.Counter(s.status for s in results[policy])
        ok = sum(s.correct for s in results[policy])
        print(f"  {policy:6s}: " + ", ".join(f"{k} {counts[k]}" for k in ("ok", "error", "timeout", "rejected"))
              + f"; correct {ok}, mean reward {sum(s.reward for s in results[policy]) / max(1, len(items)):.4f}")
    print(f"  differ in status: {len(status)} of {len(items)}; in extracted answer: {len(answer)}; "
          f"in reward: {len(reward)}; in correctness: {len(correct)}")
    if pairs:
        print("  differing programs, strict status -> reft status:")
        for pair, count in pairs.most_common():
            print(f"    {pair:22s} {count}")
    else:
        print("  no program differs between the policies")
    for i in differ[:n_examples]:
        a, b = strict[i], reft[i]
        print(f"  - {items[i][0]} (gold {items[i][2]}): strict {a.status} {a.prediction!r} reward {a.reward:g}"
              f" [{a.detail[:80]}] -> reft {b.status} {b.prediction!r} reward {b.reward:g} [{b.detail[:80]}]")
        print(_snippet(items[i][1]))
    return {"programs": len(items), "distinct": unique, "wall_s": walls,
            "status": {p: dict(collections.Counter(s.status for s in results[p])) for p in POLICIES},
            "correct": {p: sum(s.correct for s in results[p]) for p in POLICIES},
            "differ_status": len(status), "differ_answer": len(answer), "differ_reward": len(reward),
            "differ_correct": len(correct), "pairs": dict(pairs),
            "examples": [{"item_id": items[i][0], "program": items[i][1],
                          **{p: {"status": results[p][i].status, "prediction": results[p][i].prediction,
                                 "reward": results[p][i].reward, "detail": results[p][i].detail}
                             for p in POLICIES}} for i in differ[:n_examples]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", action="append", default=[], help="a `reft sample` JSONL (P-CoT); repeatable")
    ap.add_argument("--reference", action="store_true", help="the SVAMP P-CoT reference programs")
    ap.add_argument("--data", default=None, help="svamp_python_sdp.json (default: $REFT_DATA_DIR/reft/...)")
    ap.add_argument("--dataset", default=None, help="look up gold answers a sample file lacks (e.g. svamp)")
    ap.add_argument("--limit", type=int, default=0, help="the first N reference programs / sample lines (0: all)")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-program timeout, both policies (official: 10 s)")
    ap.add_argument("--examples", type=int, default=5, help="differing programs shown per source")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    if not args.samples and not args.reference:
        ap.error("give --samples FILE and/or --reference")

    sources = []
    if args.reference:
        path = pathlib.Path(args.data or pathlib.Path(os.environ.get("REFT_DATA_DIR", "../shared/data"))
                            / "reft" / "svamp_python_sdp.json")
        sources.append((f"reference programs {path.name}", reference_programs(path, args.limit)))
    for s in args.samples:
        sources.append((f"samples {s}", sample_programs(pathlib.Path(s), args.dataset, args.limit)))
    print(f"policies strict vs reft; {len(os.sched_getaffinity(0))} cores, load average "
          f"{os.getloadavg()[0]:.1f}; timeouts can flip under load (rerun a timeout pair before trusting it)")
    report = {name: compare(name, items, args.timeout, args.examples) for name, items in sources}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
