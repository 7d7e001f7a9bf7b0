"""Synthetic multi-step arithmetic word problems with N-CoT and P-CoT annotations.

The embedded data of `reft demo`: a tiny model trained from scratch on a CPU must learn it in
minutes, so the language is templated and short, numbers are small and every answer (and every
intermediate value) is a positive integer. The N-CoT is one `a op b = c` line per step; the P-CoT
is a `def solution():` program in ReFT's self-describing style (question docstring, variables
named for what they hold, `result = ...`, `return result`).

The test split is held out by construction: every test problem needs *longer* reasoning (more
steps than any training problem) or *recombined* reasoning (two operations in an order that
never occurs in training, `held_out_pairs`). Generation is a pure function of the config and the
split: changing `num_test` never changes the training problems.

    Tom has 12 apples. Tom buys 5 more. Tom gives away 3. How many apples does Tom have now?
    N-CoT:  12 + 5 = 17 / 17 - 3 = 14            P-CoT:  apples = 12 / bought = 5 / ...
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import random

from reft_jax.data.formats import ENGINES, Example

OPERATIONS = ("add", "sub", "mul", "div")
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_PY = {"add": "+", "sub": "-", "mul": "*", "div": "//"}
NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cards", "coins", "books", "shells")
# operation -> (sentence template, variable name for the operand) choices
TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "add": (("{name} buys {n} more.", "bought"), ("{name} finds {n} more.", "found"),
            ("{name} gets {n} more.", "received")),
    "sub": (("{name} gives away {n}.", "given_away"), ("{name} loses {n}.", "lost"),
            ("{name} sells {n}.", "sold")),
    "mul": (("{name} now has {n} times as many.", "factor"),
            ("The {item} are multiplied by {n}.", "factor")),
    "div": (("{name} splits them into {n} equal piles and keeps one pile.", "piles"),
            ("{name} shares them equally with {m} friends and keeps one share.", "shares")),
}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty knobs (a config section). Ranges are inclusive."""

    seed: int = 0
    num_train: int = 2000
    num_test: int = 200
    train_steps: tuple[int, int] = (1, 2)
    test_steps: tuple[int, int] = (2, 3)
    start_range: tuple[int, int] = (2, 20)
    operand_range: tuple[int, int] = (2, 9)
    operations: tuple[str, ...] = ("add", "sub", "mul")
    held_out_pairs: tuple[tuple[str, str], ...] = (("mul", "sub"),)
    max_value: int = 200

    def validate(self) -> None:
        for name in ("train_steps", "test_steps", "start_range", "operand_range"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be 1 <= low <= high, got {(lo, hi)}")
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {self.operations}")
        for pair in self.held_out_pairs:
            if len(pair) != 2 or not set(pair) <= set(self.operations):
                raise ValueError(f"held-out pair {pair} must name two of {self.operations}")
        if self.test_steps[1] <= self.train_steps[1] and not self.held_out_pairs:
            raise ValueError("the test split needs more steps than training (test_steps) or held-out "
                             "operation pairs (held_out_pairs) to be held out")
        if self.operand_range[0] < 2 and "div" in self.operations:
            raise ValueError("division needs operand_range low >= 2")
        if self.max_value < self.start_range[1]:
            raise ValueError("max_value must be at least start_range high")


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    nl_cot: str  # one `a op b = c` line per step
    program: str  # def solution(): ... return result
    ops: tuple[str, ...]


def _pairs(ops: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(ops, ops[1:]))


def _is_held_out(ops: tuple[str, ...], cfg: SyntheticConfig) -> bool:
    return len(ops) > cfg.train_steps[1] or bool(_pairs(ops) & set(cfg.held_out_pairs))


def _operand(op: str, value: int, rng: random.Random, cfg: SyntheticConfig) -> int | None:
    """An operand keeping every value a positive integer <= max_value, or None if impossible."""
    lo, hi = cfg.operand_range
    if op == "add":
        choices = [n for n in range(lo, hi + 1) if value + n <= cfg.max_value]
    elif op == "sub":
        choices = [n for n in range(lo, hi + 1) if n < value]
    elif op == "mul":
        choices = [n for n in range(lo, hi + 1) if value * n <= cfg.max_value]
    else:
        choices = [n for n in range(max(lo, 2), hi + 1) if value % n == 0 and value // n >= 1]
    return rng.choice(choices) if choices else None


def _render(ops, operands, start, name, item, templates) -> Problem:
    sentences = [f"{name} has {start} {item}."]
    lines, code = [], [f"    {item} = {start}"]
    value = start
    for op, n, (template, var) in zip(ops, operands, templates):
        sentences.append(template.format(name=name, n=n, m=n - 1, item=item))
        new = {"add": value + n, "sub": value - n, "mul": value * n, "div": value // n}[op]
        lines.append(f"{value} {_SYMBOL[op]} {n} = {new}")
        code += [f"    {var} = {n}", f"    {item} = {item} {_PY[op]} {var}"]
        value = new
    sentences.append(f"How many {item} does {name} have now?")
    question = " ".join(sentences)
    program = "\n".join(['def solution():', f'    """{question}"""', *code,
                         f"    result = {item}", "    return result"])
    return Problem(question, value, "\n".join(lines), program, tuple(ops))


def _sample(rng: random.Random, cfg: SyntheticConfig, split: str) -> Problem | None:
    lo, hi = cfg.train_steps if split == "train" else cfg.test_steps
    ops = tuple(rng.choice(cfg.operations) for _ in range(rng.randint(lo, hi)))
    if _is_held_out(ops, cfg) != (split == "test"):
        return None
    value = start = rng.randint(*cfg.start_range)
    operands = []
    for op in ops:
        n = _operand(op, value, rng, cfg)
        if n is None:
            return None
        operands.append(n)
        value = {"add": value + n, "sub": value - n, "mul": value * n, "div": value // n}[op]
    templates = []
    for op, n in zip(ops, operands):
        options = [t for t in TEMPLATES[op] if "{m}" not in t[0] or n >= 3]  # "with 1 friends"
        templates.append(rng.choice(options))
    return _render(ops, operands, start, rng.choice(NAMES), rng.choice(ITEMS), templates)


def generate_problems(cfg: SyntheticConfig, split: str) -> list[Problem]:
    """`num_train` / `num_test` distinct problems of a split (deterministic in cfg and split)."""
    cfg.validate()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"reft-synthetic/{cfg.seed}/{split}")
    want = cfg.num_train if split == "train" else cfg.num_test
    problems, seen = [], set()
    attempts = 0
    while len(problems) < want:
        attempts += 1
        if attempts > 200 * want + 1000:
            raise ValueError(f"cannot make {want} distinct {split} problems with {cfg}; "
                             "widen the ranges or ask for fewer")
        p = _sample(rng, cfg, split)
        if p is not None and p.question not in seen:
            seen.add(p.question)
            problems.append(p)
    return problems


def generate(cfg: SyntheticConfig, split: str, engine: str) -> list[Example]:
    """ReFT-format rows: train rows carry the engine's CoT, test rows none (as ReFT's test
    files). Ids continue across splits: `synthetic_0..` train, then test."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    offset = 0 if split == "train" else cfg.num_train
    rows = []
    for i, p in enumerate(generate_problems(cfg, split)):
        cot = (p.nl_cot if engine == "nl" else p.program) if split == "train" else None
        rows.append(Example(f"synthetic_{offset + i}", p.question, str(p.answer), cot))
    return rows


def write_reft_files(cfg: SyntheticConfig, directory: str | pathlib.Path) -> list[pathlib.Path]:
    """Write synthetic_{nl,python_sdp}.json and synthetic_test_set.json in ReFT's format."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, split, engine in (("synthetic_nl.json", "train", "nl"),
                                ("synthetic_python_sdp.json", "train", "python"),
                                ("synthetic_test_set.json", "test", "nl")):
        rows = [{k: v for k, v in dataclasses.asdict(r).items() if v is not None}
                for r in generate(cfg, split, engine)]
        path = directory / name
        path.write_text(json.dumps(rows, indent=1))
        out.append(path)
    return out
