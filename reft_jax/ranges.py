"""The allowed range of every numeric config setting, in one table (`RANGES`).

`config.load_config` checks every value given in a YAML file or an override against it, for every
nested section, and names the dotted key from the root: `optim.lr=-1: must be > 0`. A trainer
config inherits the entries of the classes it extends (`SFTConfig` gets `RunConfig.keep`). Rules
that relate two fields (`warmup_epoch <= epochs`, `mini_batch_size` divides the batch) stay in
the dataclasses' own `validate()`; lengths against the model's `max_position_embeddings` are
checked at run setup (`data.lengths.check_lengths`), where the model is known.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import yaml

# The allowed range of every numeric setting, keyed by `Class.field` (the class that declares the
# field, or any subclass: a trainer config inherits RunConfig's entries). None is allowed wherever
# the field's type allows it (it means "off" / "derived"); bounds are checked on values given in
# a YAML file or an override, before the dataclass's own validate() (which keeps the rules that
# relate two fields). Forms: "> 0", ">= 1", "[0, 1]", "(0, 1]", "[0, 1)", alternatives joined by
# " or " ("-1" or "'auto'" are literal values).
RANGES: dict[str, str] = {
    # optimiser (train/state.py)
    "OptimConfig.lr": "> 0",
    "OptimConfig.warmup_ratio": "[0, 1]",
    "OptimConfig.warmup_steps": ">= 0",
    "OptimConfig.weight_decay": ">= 0",
    "OptimConfig.eps": "> 0",
    "OptimConfig.b1": "[0, 1)",
    "OptimConfig.b2": "[0, 1)",
    "OptimConfig.clip_norm": "> 0",
    "OptimConfig.grad_accum": ">= 1 or 'auto'",  # auto: the memory planner picks it
    # data (data/sources.py, data/synthetic.py)
    "DataConfig.max_train_examples": ">= 1",
    "DataConfig.max_test_examples": ">= 0",
    "DataConfig.val_fraction": "[0, 1)",
    "DataConfig.max_len": ">= 1",
    "DataConfig.max_prompt_len": ">= 1",
    "SyntheticConfig.seed": ">= 0",
    "SyntheticConfig.num_train": ">= 1",
    "SyntheticConfig.num_test": ">= 0",
    "SyntheticConfig.max_value": ">= 1",
    # mesh (parallel.py), processes (distributed.py)
    "MeshConfig.data": ">= 1 or -1",
    "MeshConfig.fsdp": ">= 1 or -1",
    "MeshConfig.tensor": ">= 1 or -1",
    "MeshConfig.device_memory_gib": "> 0",
    "DistributedConfig.num_processes": ">= 1",
    "DistributedConfig.process_id": ">= 0",
    "DistributedConfig.initialization_timeout": ">= 1",
    # the run (train/run.py, train/loop.py)
    "RunConfig.seed": ">= 0",
    "RunConfig.keep": ">= 1",
    "RunConfig.save_every_steps": ">= 0",
    "ModelSpec.tokenizer_vocab_size": ">= 1",
    "ModelSpec.logprob_chunk": ">= 1",
    "ModelConfig.vocab_size": ">= 1",
    "ModelConfig.hidden_size": ">= 1",
    "ModelConfig.intermediate_size": ">= 1",
    "ModelConfig.num_layers": ">= 1",
    "ModelConfig.num_heads": ">= 1",
    "ModelConfig.num_kv_heads": ">= 1",
    "ModelConfig.head_dim": ">= 1",
    "ModelConfig.rope_theta": "> 0",
    "ModelConfig.rms_norm_eps": "> 0",
    "ModelConfig.max_position_embeddings": ">= 1",
    "EvalConfig.every_epochs": ">= 0",  # 0: only every_steps and after the last epoch
    "EvalConfig.every_steps": ">= 0",
    "EvalConfig.batch_size": ">= 1",
    "EvalConfig.max_new_tokens": ">= 1",
    "EvalConfig.max_total_len": ">= 1",
    "EvalConfig.vote_k": ">= 0",
    "EvalConfig.vote_temperature": "> 0",
    "EvalConfig.vote_top_k": ">= 0",
    "EvalConfig.timeout": "> 0",
    "GuardConfig.window": ">= 0",
    "GuardConfig.min_grad_norm": ">= 0",
    "GuardConfig.uniform_tolerance": ">= 0",
    "GuardConfig.min_entropy": ">= 0",
    # SFT (train/sft.py)
    "SFTConfig.epochs": ">= 1",
    "SFTConfig.stop_after_epoch": ">= 1",
    "SFTConfig.batch_size": ">= 1",
    "SFTConfig.bucket": ">= 1",
    "SFTConfig.loss_group": ">= 1",
    "SFTConfig.warmup_epoch": ">= 1",
    # rollouts, shared by PPO and online self-training (rollout/engine.py RolloutConfig)
    "RolloutConfig.batch_questions": ">= 1",
    "RolloutConfig.n_samples": ">= 1",
    "RolloutConfig.temperature": "> 0",
    "RolloutConfig.top_k": ">= 0",
    "RolloutConfig.top_p": "(0, 1]",
    "RolloutConfig.max_total_len": ">= 1",
    "RolloutConfig.max_new_tokens": ">= 1",
    "RolloutConfig.prompt_bucket": ">= 1",
    "RolloutConfig.length_bucket": ">= 1",
    # PPO's objective (train/ppo_step.py PPOAlgoConfig) and run (train/ppo.py)
    "PPOAlgoConfig.kl_coef": ">= 0",
    "PPOAlgoConfig.gamma": "[0, 1]",
    "PPOAlgoConfig.lam": "[0, 1]",
    "PPOAlgoConfig.clip": "> 0",
    "PPOAlgoConfig.value_clip": "> 0",
    "PPOAlgoConfig.vf_coef": ">= 0",
    "PPOAlgoConfig.log_ratio_clamp": "> 0",
    "PPOAlgoConfig.ppo_epochs": ">= 1",
    "PPOAlgoConfig.mini_batch_size": ">= 0",
    "PPOAlgoConfig.score_microbatches": ">= 1 or 'auto'",  # auto: the memory planner picks it
    "PPOConfig.epochs": ">= 1",
    "PPOConfig.max_steps": ">= 1",
    # self-training (train/selftrain.py)
    "OfflineConfig.k": ">= 1",
    "OfflineConfig.per_question": ">= 1",
    "OfflineConfig.temperature": "> 0",
    "OfflineConfig.top_k": ">= 0",
    "OfflineConfig.max_total_len": ">= 1",
    "OfflineConfig.max_new_tokens": ">= 1",
    "OfflineConfig.sample_batch_size": ">= 1",
    "OnlineConfig.epochs": ">= 1",
    "OnlineConfig.updates_per_step": ">= 1",
    "OnlineConfig.gold_max_len": ">= 1",
    "OnlineConfig.max_steps": ">= 1",
    # verifier (train/verifier.py)
    "VerifierConfig.epochs": ">= 1",
    "VerifierConfig.batch_size": ">= 1",
    "VerifierConfig.max_len": ">= 1",
    "VerifierConfig.bucket": ">= 1",
    # sampling (rollout/sampler.py; greedy ignores temperature)
    "SampleConfig.max_new_tokens": ">= 1",
    "SampleConfig.max_total_len": ">= 1",
    "SampleConfig.temperature": "> 0",
    "SampleConfig.top_k": ">= 0",
    "SampleConfig.top_p": "(0, 1]",
    "SampleConfig.n": ">= 1",
    "SampleConfig.pad_id": ">= 0",
    "SampleConfig.budget_bucket": ">= 1",
    # rewards (reward/reward.py) and the program sandbox (reward/sandbox.py)
    "RewardConfig.correct": "> 0",
    "RewardConfig.partial": ">= 0",
    "RewardConfig.tolerance": ">= 0",
    "SandboxConfig.timeout": "> 0",
    "SandboxConfig.workers": ">= 0",
    "SandboxConfig.sympy_workers": ">= 0",
    "SandboxConfig.memory_mb": ">= 1",
    "SandboxConfig.max_output": ">= 0",
    "SandboxConfig.max_program_chars": ">= 1",
    "SandboxConfig.cache_size": ">= 0",
    "SandboxConfig.grace": ">= 0",
    # whole pipelines (experiment/demo.py, experiment/small.py)
    "DemoConfig.vote_k": ">= 0",
    "ExperimentConfig.vote_k": ">= 0",
    "ExperimentConfig.n_boot": ">= 1",
}


@dataclasses.dataclass(frozen=True)
class Range:
    """One parsed RANGES entry: a numeric interval and literal values also allowed."""

    text: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    literals: tuple = ()

    @classmethod
    def parse(cls, text: str) -> "Range":
        head, *alts = [part.strip() for part in text.split(" or ")]
        literals = tuple(yaml.safe_load(a) for a in alts)
        interval = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", head)
        if interval:
            lo, hi = float(interval[2]), float(interval[3])
            return cls(text, lo, hi, interval[1] == "(", interval[4] == ")", literals)
        bound = re.fullmatch(r"(>=|>|<=|<)\s*(\S+)", head)
        if not bound:
            raise ValueError(f"RANGES: cannot read {text!r}")
        op, x = bound[1], float(bound[2])
        if op.startswith(">"):
            return cls(text, low=x, low_open=op == ">", literals=literals)
        return cls(text, high=x, high_open=op == "<", literals=literals)

    def allows(self, value: Any) -> bool:
        if any(value == lit and type(value) is type(lit) for lit in self.literals):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return ("in " if self.text[0] in "[(" else "") + self.text


_RANGES = {key: Range.parse(text) for key, text in RANGES.items()}  # a typo fails at import


def field_range(cls: type, name: str) -> Range | None:
    """The RANGES entry of field `name` of dataclass `cls` (declared on it or a base class)."""
    for klass in cls.__mro__:
        found = _RANGES.get(f"{klass.__name__}.{name}")
        if found is not None:
            return found
    return None
