"""Run machinery shared by every training phase (SFT, PPO, self-training, verifier).

A run directory holds:
  config.yaml          the resolved config of the run
  model_config.json    the architecture (ModelConfig) of the params in the checkpoints
  state_spec.json      how to rebuild the optimizer, so params can be read back from a TrainState
  tokenizer/           the tokenizer (save_pretrained layout)
  checkpoints/<step>/  Orbax TrainState + JSON meta
  metrics.jsonl, tb/, plots/
A later phase names a policy by `ModelSpec.path`: an HF directory, a GGUF file, or such a run
directory (with `step` = latest | best | warmup | epoch:K | <int>).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Iterable

import jax
from jax.sharding import Mesh

from reft_jax import config as config_lib
from reft_jax.checkpoint import Checkpointer, abstract_like, check_run_dir
from reft_jax.data.lengths import check_lengths
from reft_jax.data.sources import DataConfig
from reft_jax.metrics import MetricsWriter
from reft_jax.model import llama
from reft_jax.model.config import ModelConfig, RematSetting
from reft_jax.parallel import MeshConfig
from reft_jax.train.loop import NAN_POLICIES, GuardConfig
from reft_jax.train.state import OptimConfig, TrainState, make_optimizer


@dataclasses.dataclass
class ModelSpec:
    """Where the policy comes from."""

    path: str | None = None  # HF dir | .gguf | reft run dir; None = from scratch (`scratch`)
    step: str = "latest"  # for reft run dirs: latest | best | warmup | epoch:K | <int>
    scratch: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer_vocab_size: int = 400  # tokenizer trained on the training corpus when from scratch
    dtype: str | None = None  # compute dtype override
    param_dtype: str | None = None
    value_head_init: str = "torch_default"
    logprob_chunk: int | None = 128  # log-probs over this many positions at a time (None: all at once)
    remat: RematSetting | bool = "none"  # none | layer | dots_saveable | auto; true/false = layer/none

    def validate(self) -> None:
        if self.step not in ("latest", "best", "warmup") and not self.step.startswith("epoch:") \
                and not self.step.isdigit():
            raise config_lib.ConfigError("must be latest, best, warmup, epoch:K or a step number",
                                         key="step", value=self.step)

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value_head_init": self.value_head_init, "remat": self.remat}
        if self.dtype:
            out["dtype"] = self.dtype
        if self.param_dtype:
            out["param_dtype"] = self.param_dtype
        return out


@dataclasses.dataclass
class EvalConfig:
    """Per-epoch evaluation: greedy top-1 always, voting@k optionally."""

    every_epochs: int = 1  # 0: no epoch-end evaluation (only every_steps, and after the last epoch)
    every_steps: int = 0  # also evaluate every so many steps (0 = off; ReFT's offline self-training: 175 / 90 / 350)
    batch_size: int = 8
    max_new_tokens: int = 400
    max_total_len: int | None = 1024  # ReFT caps prompt+completion (1024 SFT, 700 RL)
    vote_k: int = 0  # 0 = no voting
    vote_temperature: float = 1.0
    vote_top_k: int = 50  # HF default, as ReFT's sampling runs
    select_on: str = "test"  # metric split for the best checkpoint: test (as the paper) | val
    timeout: float = 10.0  # seconds per program (P-CoT)
    clean_up_spaces: bool = True  # ReFT's evaluation decodes with clean_up_tokenization_spaces=True

    def validate(self) -> None:
        if self.select_on not in ("test", "val"):
            raise config_lib.ConfigError("must be test or val", key="select_on", value=self.select_on)
        if self.every_epochs < 0:
            raise config_lib.ConfigError("must be >= 0 (0 = only every_steps)", key="every_epochs",
                                         value=self.every_epochs)
        if self.every_steps < 0:
            raise config_lib.ConfigError("must be >= 0 (0 = off)", key="every_steps", value=self.every_steps)


def is_run_dir(path: str | os.PathLike) -> bool:
    p = pathlib.Path(path)
    return (p / "model_config.json").is_file() and (p / "checkpoints").is_dir()


def save_run_artifacts(run_dir: pathlib.Path, model_config: ModelConfig, tokenizer: Any,
                       optim: OptimConfig, total_steps: int, run_config: Any) -> None:
    """Everything besides checkpoints that a later phase needs to use this run's params."""
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "model_config.json").write_text(json.dumps(dataclasses.asdict(model_config), indent=2))
    (run_dir / "state_spec.json").write_text(json.dumps(
        {"optim": dataclasses.asdict(optim), "total_steps": int(total_steps)}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    config_lib.save_config(run_config, run_dir / "config.yaml")


def state_abstract(model_config: ModelConfig, optim: OptimConfig, total_steps: int, mesh: Mesh,
                   params_abstract: Any = None) -> Any:
    """ShapeDtypeStructs (with target shardings) of the TrainState a run checkpoints.
    `params_abstract` (ShapeDtypeStructs with shardings) replaces the policy's param tree for
    runs that train another tree (the verifier's backbone + head)."""
    tx = make_optimizer(optim, total_steps)
    p_abs = params_abstract
    if p_abs is None:
        p_abs = abstract_like(llama.param_shapes(model_config), llama.param_shardings(model_config, mesh))
    from reft_jax.train.sharded import state_shardings  # optimizer moments sharded like params

    shape = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.key(0)), p_abs)
    return abstract_like(shape, state_shardings(p_abs, tx, mesh))


def load_run_params(run_dir: str | os.PathLike, selector: str, mesh: Mesh,
                    **model_overrides: Any) -> tuple[ModelConfig, Any, Any, dict]:
    """(model config, params placed on `mesh`, tokenizer, checkpoint meta) from a reft run."""
    from reft_jax.model.tokenizer_io import load_tokenizer

    run_dir = pathlib.Path(run_dir)
    saved = json.loads((run_dir / "model_config.json").read_text())
    model_config = ModelConfig(**{**saved, **model_overrides})
    stored_config = ModelConfig(**saved)
    spec = json.loads((run_dir / "state_spec.json").read_text())
    optim = OptimConfig(**spec["optim"])
    sub = "warmup" if selector == "warmup" else "checkpoints"
    with Checkpointer(run_dir / sub, keep=None) as ckpt:
        # latest / warmup fall back past damaged newer steps (with a warning), as resuming does
        abstract = state_abstract(stored_config, optim, spec["total_steps"], mesh)
        state, meta = ckpt.restore_selected(abstract, selector)
    params = state.params
    if model_config.param_dtype != stored_config.param_dtype:
        params = jax.tree.map(lambda x: x.astype(model_config.param_dtype), params)
    return model_config, params, load_tokenizer(run_dir / "tokenizer"), meta


def build_policy(spec: ModelSpec, mesh: Mesh, seed: int = 0,
                 corpus: Iterable[str] | None = None) -> tuple[ModelConfig, Any, Any]:
    """(model config, params on `mesh`, tokenizer) for a ModelSpec."""
    if spec.path is not None and not os.path.exists(spec.path):
        # Checked here, not in validate(): configs may name runs that do not exist yet.
        raise FileNotFoundError(f"model.path: no such model file or directory: {spec.path}")
    if spec.path is None:
        from reft_jax.data.tokenizer import train_tokenizer

        if corpus is None:
            raise ValueError("a from-scratch model needs a corpus to train its tokenizer on")
        tokenizer = train_tokenizer(list(corpus), spec.tokenizer_vocab_size)
        cfg = dataclasses.replace(spec.scratch, vocab_size=len(tokenizer), **spec.overrides())
        return cfg, llama.init_params_sharded(cfg, jax.random.key(seed), mesh), tokenizer
    if is_run_dir(spec.path):
        cfg, params, tok, _ = load_run_params(spec.path, spec.step, mesh, **spec.overrides())
        return cfg, params, tok
    from reft_jax.model.io import load_model

    return load_model(spec.path, mesh, seed=seed, **spec.overrides())


def saved_policy(run_dir: pathlib.Path) -> tuple[ModelConfig, Any]:
    """Model config and tokenizer of an existing run (a resumed run never rebuilds them)."""
    from reft_jax.model.tokenizer_io import load_tokenizer

    saved = json.loads((run_dir / "model_config.json").read_text())
    return ModelConfig(**saved), load_tokenizer(run_dir / "tokenizer")


def open_run(stack: contextlib.ExitStack, run_dir: pathlib.Path, keep: int | None, best_metric: str | None,
             abstract: Callable[[ModelConfig], Any]) -> tuple[Checkpointer, Any, ModelConfig | None, Any]:
    """(checkpointer, restored (state, meta) or None, model config, tokenizer) of a run directory.
    Half-written steps are removed; when a step exists, the run's own model config and tokenizer
    come back with it (a resumed run never rebuilds them), else both are None.
    `abstract(model_config)` gives the checkpointed state's ShapeDtypeStructs."""
    ckpt = stack.enter_context(Checkpointer(run_dir / "checkpoints", keep=keep, best_metric=best_metric,
                                            clean_partial=True))
    if not ckpt.all_steps():
        return ckpt, None, None, None
    model_config, tokenizer = saved_policy(run_dir)
    return ckpt, ckpt.restore(abstract(model_config)), model_config, tokenizer


def config_drift(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose value differs between a checkpoint's config and this run's."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_drift(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ----------------------------------------------------------------------------------------------
# The section every trainer's config shares, and opening a run directory
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunConfig:
    """What every run has: where it lives, its seed, the policy it starts from, its data,
    optimizer, mesh and evaluation, how many checkpoints it keeps and how often it saves, and
    what it does on a non-finite or collapsed step. Each trainer's config extends it (and may
    give a field its own default); YAML files stay flat (`run_dir: ...`, `optim.lr: ...`)."""

    run_dir: str = ""
    seed: int = 42
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    keep: int = 1  # latest checkpoints kept, plus the best one
    save_every_steps: int = 0  # mid-epoch checkpoints (preemption); 0 = end of epochs only
    nan_policy: str = "stop"  # stop: one-line error, the last good checkpoint kept | skip: drop the update
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)
    # JAX's persistent compilation cache: a resumed or repeated run loads its programs instead of
    # compiling them again. "" turns it off; $REFT_COMPILE_CACHE overrides the default.
    compile_cache: str = "~/.cache/reft-jax/xla"

    def validate_run(self) -> None:
        if not self.run_dir:
            raise config_lib.ConfigError("a run directory is required", key="run_dir", value=self.run_dir)
        if self.keep < 1:
            raise config_lib.ConfigError("must be >= 1", key="keep", value=self.keep)
        if self.save_every_steps < 0:
            raise config_lib.ConfigError("must be >= 0", key="save_every_steps", value=self.save_every_steps)
        if self.nan_policy not in NAN_POLICIES:
            raise config_lib.ConfigError(f"must be one of {NAN_POLICIES}", key="nan_policy", value=self.nan_policy)


@dataclasses.dataclass
class Run:
    """An open run directory: what the loop and a trainer's hooks read; built once."""

    cfg: Any  # the trainer's config (a RunConfig)
    name: str
    run_dir: pathlib.Path
    mesh: Mesh
    ckpt: Checkpointer
    writer: MetricsWriter
    model_config: ModelConfig
    tokenizer: Any


def rl_optim() -> OptimConfig:
    """The RL phases' optimizer (PPO, online self-training; reference §8b): lr 3e-7, constant."""
    return OptimConfig(lr=3e-7, schedule="constant", warmup_ratio=0.0)


def rl_eval() -> EvalConfig:
    """The RL phases' evaluation: the rollout prefix with ReFT's 700-token cap."""
    return EvalConfig(max_new_tokens=700, max_total_len=700)


def from_warmup() -> ModelSpec:
    """The RL phases start from an SFT run directory's warm-up checkpoint (`model.path`)."""
    return ModelSpec(step="warmup")


def compute_dtype(optim: OptimConfig) -> str | None:
    """The forward's dtype override (None: the params' own float32)."""
    return None if optim.compute_dtype == "float32" else optim.compute_dtype


def open_or_start(cfg: Any, name: str, stack: contextlib.ExitStack, mesh: Mesh, total_steps: int,
                  best_name: str | None, fresh: Callable[[], tuple[ModelConfig, Any, TrainState]],
                  abstract: Callable[[ModelConfig], Any] | None = None,
                  on_fresh: Callable[[], None] | None = None) -> tuple[Run, TrainState, dict]:
    """Resume `cfg.run_dir` from its newest usable checkpoint (its own model config and
    tokenizer, a line naming any config drift), or start it: `fresh()` gives (model config,
    tokenizer, state), the run artifacts are written and `on_fresh()` runs. Returns the run,
    the state and the restored meta ({} when fresh). Metrics of steps after the restored one
    (redone by the resumed run) are dropped from metrics.jsonl and TensorBoard."""
    check_run_dir(cfg.run_dir)  # one line naming run_dir if it is a file, read-only, virtual, ...
    run_dir = pathlib.Path(cfg.run_dir)
    use_compile_cache(cfg.compile_cache)
    if abstract is None:
        abstract = lambda mc: state_abstract(mc, cfg.optim, total_steps, mesh)  # noqa: E731
    ckpt, restored, model_config, tokenizer = open_run(stack, run_dir, cfg.keep, best_name, abstract)
    if restored is None:
        model_config, tokenizer, state = fresh()
        check_lengths(cfg, model_config)
        save_run_artifacts(run_dir, model_config, tokenizer, cfg.optim, total_steps, cfg)
        if on_fresh is not None:
            on_fresh()
        meta: dict = {}
    else:
        state, meta = restored
        check_lengths(cfg, model_config)
        drift = config_drift(meta.get("config", {}), config_lib.to_dict(cfg))
        print(f"[{name}] resuming {run_dir} at step {meta['step']} (epoch {meta['epoch'] + 1}, batch "
              f"{meta.get('batch', 0)})" + ("; config changed: " + "; ".join(drift) if drift else ""), flush=True)
    # fresh: the rows of an attempt stopped before its first checkpoint are all redone
    writer = stack.enter_context(MetricsWriter(run_dir, resume_step=meta["step"] if meta else -1))
    return Run(cfg, name, run_dir, mesh, ckpt, writer, model_config, tokenizer), state, meta


def plan_memory(run: Run, phase: str, *, batch: int, seq_len: int, **plan_kwargs: Any) -> None:
    """Print the per-device memory plan before anything compiles, resolve the `auto` settings
    (`optim.grad_accum`, `score_microbatches`, `model.remat`) to the smallest values that fit,
    and refuse a plan that cannot fit with one line naming the settings that would
    (`memory.MemoryPlanError`, a config error). The device memory is `mesh.device_memory_gib`
    or what the accelerator reports; on CPU without it the plan is printed, not checked.
    `run.cfg` and `run.model_config` are updated in place with the resolved values."""
    from reft_jax import memory

    cfg, mc = run.cfg, run.model_config
    device = memory.device_memory_bytes(cfg.mesh)
    accum = cfg.optim.grad_accum
    micro = getattr(cfg, "score_microbatches", 1)
    kwargs = {"optim": cfg.optim, "logprob_chunk": cfg.model.logprob_chunk, **plan_kwargs}
    if "auto" in (accum, micro, mc.remat):
        choice = memory.resolve_auto(phase, mc, run.mesh, batch=batch, seq_len=seq_len, grad_accum=accum,
                                     remat=mc.remat, score_microbatches=micro, device_bytes=device, **kwargs)
        cfg.optim.grad_accum = choice.grad_accum
        if micro == "auto":
            cfg.score_microbatches = choice.score_microbatches
        run.model_config = mc = dataclasses.replace(mc, remat=choice.remat)
        print(f"[{run.name}] auto: optim.grad_accum={choice.grad_accum}, model.remat={choice.remat}"
              + (f", score_microbatches={choice.score_microbatches}" if micro == "auto" else ""), flush=True)
        plan = choice.plan
    else:
        plan = memory.plan_run(phase, mc, run.mesh, batch=batch, seq_len=seq_len, score_microbatches=micro,
                               device_bytes=device, **kwargs)
    print(f"[{run.name}] memory plan per device\n" + memory.format_plan(plan, device), flush=True)
    memory.check(plan, device)


def use_compile_cache(directory: str) -> str | None:
    """Turn on JAX's persistent compilation cache in `directory` ($REFT_COMPILE_CACHE wins;
    "" = off). Programs that took over a second to compile are kept; a resumed run reuses them."""
    directory = os.environ.get("REFT_COMPILE_CACHE", directory)
    if not directory:
        return None
    path = str(pathlib.Path(directory).expanduser())
    if jax.config.jax_compilation_cache_dir != path:
        pathlib.Path(path).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
    return path


def fit_questions(run: Run, splits: Any) -> Any:
    """The splits with the training questions whose rollout prefix is longer than
    `data.max_prompt_len` handled by `data.overlong` (dropped by default; `truncate` keeps the
    head, as ReFT does), reported in one line. The RL phases' schedule is sized before this
    (it needs no tokenizer), so a drop leaves the LR schedule slightly longer than the run."""
    from reft_jax.data.lengths import fit_prompts
    from reft_jax.data.sources import split_source

    data = run.cfg.data
    train, report = fit_prompts(run.tokenizer, splits.train, data.engine, data.max_prompt_len, data.overlong,
                                split_source(data, "train"), data.header_newline)
    if report.line():
        print(f"[{run.name}] {report.line()}", flush=True)
    if len(train) < run.cfg.batch_questions:
        raise config_lib.ConfigError(f"only {len(train)} training questions fit data.max_prompt_len="
                                     f"{data.max_prompt_len}", key="batch_questions", value=run.cfg.batch_questions)
    return dataclasses.replace(splits, train=train)
