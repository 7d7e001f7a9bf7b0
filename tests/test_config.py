"""Config machinery: YAML + dotted overrides into typed dataclasses, strict errors naming the key."""
from __future__ import annotations

import dataclasses
import pathlib
import textwrap
from typing import Literal, Optional

import pytest

from reft_jax.config import (
    ConfigError,
    describe_derived,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


@dataclasses.dataclass
class Optim:
    lr: float = 1e-5
    warmup_ratio: float = 0.1
    schedule: Literal["linear_warmup_decay", "constant"] = "linear_warmup_decay"
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError("must be positive", key="lr", value=self.lr)


@dataclasses.dataclass
class Mesh:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def validate(self):
        if self.tensor < 1:
            raise ValueError(f"tensor must be >= 1, got {self.tensor}")


@dataclasses.dataclass
class Model:
    path: str
    rope_scaling: Optional[dict] = None
    layers: int | None = None


@dataclasses.dataclass
class Root:
    model: Model
    optim: Optim = dataclasses.field(default_factory=Optim)
    mesh: Mesh = dataclasses.field(default_factory=Mesh)
    tags: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    bf16: bool = False
    run_dir: pathlib.Path = pathlib.Path("runs/x")


def write(tmp_path: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def expect_error(*fragments: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(Root, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- good paths -------------------------------------------------------------------------------


def test_yaml_and_overrides_build_nested_dataclasses(tmp_path):
    cfg_path = write(tmp_path, "c.yaml", """
        model: {path: m, rope_scaling: {type: linear, factor: 2.0}}
        optim: {lr: 3e-7, schedule: constant}
        tags: [a]
    """)
    cfg = load_config(Root, cfg_path, [
        "mesh.fsdp=4", "optim.warmup_ratio=0", "model.rope_scaling=null", "tags=[x, y]",
        "optim.betas=[0.8, 0.9]", "seed=7", "bf16=true", "run_dir=/tmp/r",
    ])
    assert isinstance(cfg.model, Model) and cfg.model.path == "m" and cfg.model.rope_scaling is None
    assert cfg.optim.lr == 3e-7 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.warmup_ratio == 0.0 and isinstance(cfg.optim.warmup_ratio, float)  # int -> float
    assert cfg.optim.schedule == "constant" and cfg.optim.betas == (0.8, 0.9)
    assert cfg.mesh == Mesh(fsdp=4) and cfg.tags == ["x", "y"] and cfg.seed == 7 and cfg.bf16 is True
    assert cfg.run_dir == pathlib.Path("/tmp/r")


def test_override_sets_key_absent_from_yaml_and_overrides_win(tmp_path):
    cfg = load_config(Root, None, ["model.path=p", "model.path=q", "optim.lr=1e-3"])
    assert cfg.model.path == "q" and cfg.optim.lr == 1e-3 and cfg.mesh == Mesh()


def test_base_inheritance_relative_and_later_keys_win(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "base.yaml", """
        model: {path: base, layers: 2}
        optim: {lr: 1.0e-4, schedule: constant}
        seed: 1
    """)
    child = write(tmp_path, "sub/child.yaml", """
        base: ../base.yaml
        optim: {lr: 2.0e-4}
        seed: 2
    """)
    cfg = load_config(Root, child, ["seed=3"])
    assert cfg.model == Model(path="base", layers=2)  # inherited
    assert cfg.optim.lr == 2e-4 and cfg.optim.schedule == "constant"  # deep merge
    assert cfg.seed == 3


def test_base_cycle_is_an_error(tmp_path):
    a = write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(Root, a)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Root, None, ["model.path=m", "model.rope_scaling={type: linear, factor: 4.0}",
                                   "optim.lr=3e-7", "tags=[a, b]"])
    d = to_dict(cfg)
    assert d["optim"]["betas"] == [0.9, 0.999] and d["run_dir"] == "runs/x"  # plain YAML types
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(Root, tmp_path / "out" / "config.yaml")
    assert again == cfg
    assert from_dict(Root, d) == cfg


def test_describe_derived_aligns_and_formats():
    text = describe_derived({"global batch": (512, "16 questions x 32 samples"),
                             "steps per epoch": 12345, "learning rate": 3e-7})
    lines = text.splitlines()
    assert len(lines) == 3
    assert "global batch    = 512  (16 questions x 32 samples)" in lines[0]
    assert "12,345" in lines[1] and "3e-07" in lines[2]
    # the '=' signs line up
    assert len({line.index("=") for line in lines}) == 1


# --- errors name the dotted key ---------------------------------------------------------------


def test_unknown_key_with_suggestion():
    expect_error("optim.lrr", "did you mean", "optim.lr", overrides=["model.path=m", "optim.lrr=1"])


def test_unknown_top_level_key_in_yaml(tmp_path):
    path = write(tmp_path, "c.yaml", "model: {path: m}\nseeed: 1\n")
    expect_error("seeed", "seed", yaml_path=path)


def test_wrong_type_names_key_and_value():
    expect_error("optim.lr", "float", "'abc'", overrides=["model.path=m", "optim.lr=abc"])
    expect_error("mesh.fsdp", "int", "1.5", overrides=["model.path=m", "mesh.fsdp=1.5"])
    expect_error("bf16", "bool", overrides=["model.path=m", "bf16=1"])  # ints are not bools


def test_bool_is_not_an_int():
    expect_error("seed", "int", "True", overrides=["model.path=m", "seed=true"])


def test_literal_choices_with_suggestion():
    expect_error("optim.schedule", "'constnat'", "did you mean", "'constant'",
                 overrides=["model.path=m", "optim.schedule=constnat"])


def test_optional_and_list_element_types():
    expect_error("model.layers", "'x'", overrides=["model.path=m", "model.layers=x"])
    expect_error("tags[1]", "str", overrides=["model.path=m", "tags=[a, 2]"])
    expect_error("optim.betas", "2", overrides=["model.path=m", "optim.betas=[0.9]"])
    expect_error("model.rope_scaling", "dict", overrides=["model.path=m", "model.rope_scaling=3"])


def test_missing_required_key():
    expect_error("model.path", "missing", overrides=[])


def test_nested_dataclass_must_be_a_mapping():
    expect_error("optim", "mapping", overrides=["model.path=m", "optim=3"])


def test_override_into_a_scalar_and_malformed_override():
    expect_error("optim.lr.x", overrides=["model.path=m", "optim.lr=1", "optim.lr.x=2"])
    expect_error("optim.lr", "key=value", overrides=["model.path=m", "optim.lr"])


def test_post_init_validation_names_the_key():
    expect_error("optim.lr", "-1", "must be positive", overrides=["model.path=m", "optim.lr=-1"])


def test_validate_method_names_the_dataclass_path():
    expect_error("mesh", "tensor must be >= 1", overrides=["model.path=m", "mesh.tensor=0"])


def test_all_problems_reported_at_once():
    message = expect_error("optim.lr", "seed", overrides=["model.path=m", "optim.lr=x", "seed=y"])
    assert message.count("\n") >= 1


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "c.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Root, path)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(Root, tmp_path / "nope.yaml")



@dataclasses.dataclass
class _Inner:
    a: int = 1
    b: int = 2


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(a=10, b=20))


def test_partial_section_keeps_parent_default_for_that_section():
    """A parent whose field default differs from the section class's defaults keeps it when
    YAML or overrides give only part of the section."""
    cfg = load_config(_Outer, overrides=["inner.b=3"])
    assert (cfg.inner.a, cfg.inner.b) == (10, 3)
    assert load_config(_Outer).inner == _Inner(10, 20)


# --- the range table (reft_jax/ranges.py) on the real configs ------------------------------------

REPO_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "configs"


def _trainer_configs():
    from reft_jax.experiment.demo import DemoConfig
    from reft_jax.experiment.small import ExperimentConfig
    from reft_jax.rollout.sampler import SampleConfig
    from reft_jax.train.ppo import PPOConfig
    from reft_jax.train.selftrain import SelfTrainConfig
    from reft_jax.train.sft import SFTConfig
    from reft_jax.train.verifier import VerifierConfig

    return {"sft": SFTConfig, "ppo": PPOConfig, "selftrain": SelfTrainConfig, "verifier": VerifierConfig,
            "demo": DemoConfig, "experiment": ExperimentConfig, "sample": SampleConfig}


RANGE_CASES = [
    ("sft", "optim.lr=-1", "optim.lr=-1: must be > 0"),  # trained by gradient ascent before
    ("sft", "optim.lr=0", "optim.lr=0: must be > 0"),
    ("sft", "data.val_fraction=1.5", "data.val_fraction=1.5: must be in [0, 1)"),
    ("sft", "optim.warmup_ratio=-0.1", "optim.warmup_ratio=-0.1: must be in [0, 1]"),
    ("sft", "optim.clip_norm=0", "optim.clip_norm=0: must be > 0"),
    ("sft", "optim.b2=1", "optim.b2=1: must be in [0, 1)"),
    ("sft", "optim.grad_accum=0", "optim.grad_accum=0: must be >= 1 or 'auto'"),
    ("sft", "batch_size=0", "batch_size=0: must be >= 1"),
    ("sft", "data.max_len=0", "data.max_len=0: must be >= 1"),
    ("sft", "mesh.fsdp=0", "mesh.fsdp=0: must be >= 1 or -1"),
    ("sft", "guard.window=-1", "guard.window=-1: must be >= 0"),
    ("sft", "eval.vote_temperature=0", "eval.vote_temperature=0: must be > 0"),
    ("sft", "model.scratch.max_position_embeddings=0", "model.scratch.max_position_embeddings=0: must be >= 1"),
    ("ppo", "temperature=0", "temperature=0: must be > 0"),
    ("ppo", "top_p=0", "top_p=0: must be in (0, 1]"),
    ("ppo", "top_p=1.5", "top_p=1.5: must be in (0, 1]"),
    ("ppo", "kl_coef=-0.01", "kl_coef=-0.01: must be >= 0"),
    ("ppo", "lam=1.1", "lam=1.1: must be in [0, 1]"),
    ("ppo", "score_microbatches=0", "score_microbatches=0: must be >= 1 or 'auto'"),
    ("ppo", "sandbox.timeout=0", "sandbox.timeout=0: must be > 0"),
    ("ppo", "reward.partial=-1", "reward.partial=-1: must be >= 0"),
    ("ppo", "value_clip=null", None),  # None: no value clipping
    ("ppo", "optim.clip_norm=null", None),
    ("selftrain", "online.optim.lr=-1e-5", "online.optim.lr=-1e-05: must be > 0"),
    ("selftrain", "offline.temperature=0", "offline.temperature=0: must be > 0"),
    ("verifier", "max_len=0", "max_len=0: must be >= 1"),
]


@pytest.mark.parametrize("kind, override, message", RANGE_CASES, ids=[c[1] for c in RANGE_CASES])
def test_ranges_on_the_real_configs(kind, override, message):
    cls = _trainer_configs()[kind]
    path = REPO_CONFIGS / f"{kind}_synthetic_tiny.yaml"
    if message is None:
        load_config(cls, path, [override])
        return
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, [override])
    assert str(info.value) == f"invalid config: {message}"


def _numeric(tp) -> bool:
    import typing

    args = typing.get_args(tp) or (tp,)
    return any(a in (int, float) for a in args)


def _reachable(cls, seen):
    import typing

    if cls in seen:
        return
    seen.add(cls)
    for tp in typing.get_type_hints(cls).values():
        for arm in typing.get_args(tp) or (tp,):
            if dataclasses.is_dataclass(arm):
                _reachable(arm, seen)


def test_every_numeric_setting_has_a_range():
    """A new int / float field without a RANGES entry fails here (seeds included: >= 0)."""
    import typing

    from reft_jax.ranges import field_range

    classes: set = set()
    for cls in _trainer_configs().values():
        _reachable(cls, classes)
    missing = [f"{cls.__name__}.{name}" for cls in classes for name, tp in typing.get_type_hints(cls).items()
               if _numeric(tp) and typing.get_origin(tp) not in (list, tuple) and name not in ("eos_ids",)
               and field_range(cls, name) is None]
    assert not missing, f"numeric settings without a RANGES entry: {sorted(missing)}"


def test_every_range_names_a_real_field():
    import typing

    from reft_jax.ranges import RANGES

    classes: set = set()
    for cls in _trainer_configs().values():
        _reachable(cls, classes)
    from reft_jax.distributed import DistributedConfig
    from reft_jax.data.synthetic import SyntheticConfig

    classes |= {DistributedConfig, SyntheticConfig}
    fields = {f"{k.__name__}.{name}" for cls in classes for k in cls.__mro__ if dataclasses.is_dataclass(k)
              for name in typing.get_type_hints(k)}
    assert not sorted(set(RANGES) - fields)


def test_defaults_are_within_their_ranges():
    from reft_jax.config import check_ranges

    for cls in _trainer_configs().values():
        check_ranges(cls())


def test_check_ranges_on_a_config_built_in_code():
    from reft_jax.config import check_ranges
    from reft_jax.train.state import OptimConfig

    with pytest.raises(ConfigError, match=r"^optim.lr=-1.0: must be > 0$"):
        check_ranges(OptimConfig(lr=-1.0), "optim")


def test_synthetic_knobs_name_their_key():
    from reft_jax.data.sources import DataConfig, load_config_dataset

    with pytest.raises(ConfigError, match=r"^invalid config: data.synthetic.num_train=0: must be >= 1$"):
        load_config_dataset(DataConfig(synthetic={"num_train": 0}), "train")
