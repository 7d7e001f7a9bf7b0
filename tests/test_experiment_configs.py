"""Every config under experiments/configs/ loads and validates (no typos survive), and the
generated paper configs are what their generator writes."""
import pathlib
import subprocess
import sys

import pytest

from reft_jax import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "configs"


def _config_class(path: pathlib.Path):
    from reft_jax.experiment.small import ExperimentConfig
    from reft_jax.train.ppo import PPOConfig
    from reft_jax.train.selftrain import SelfTrainConfig
    from reft_jax.train.sft import SFTConfig
    from reft_jax.train.verifier import VerifierConfig

    kinds = {"sft": SFTConfig, "reft": PPOConfig, "ppo": PPOConfig, "selftrain": SelfTrainConfig,
             "rerank": VerifierConfig, "verifier": VerifierConfig, "experiment": ExperimentConfig}
    return kinds[path.name.split("_", 1)[0]]


ALL = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_configs_for_every_paper_row():
    names = {p.stem for p in ALL}
    for ds, eng in [("gsm8k", "nl"), ("gsm8k", "python"), ("svamp", "nl"), ("svamp", "python"),
                    ("mathqa", "nl"), ("mathqa", "python"), ("mathqa-numeric", "nl")]:
        for kind in ("sft", "reft", "selftrain"):
            assert f"{kind}_{ds}_{eng}" in names
    assert {"rerank_sft_gsm8k_python", "rerank_reft_gsm8k_nl"} <= names


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(CONFIGS)) for p in ALL])
def test_config_loads_and_validates(path):
    cfg = config_lib.load_config(_config_class(path), path)
    assert config_lib.to_dict(cfg)


def test_generated_configs_are_current(tmp_path):
    script = CONFIGS / "make_paper_configs.py"
    before = {p: p.read_text() for p in (CONFIGS / "paper").glob("*.yaml")}
    subprocess.run([sys.executable, str(script)], check=True)
    after = {p: p.read_text() for p in (CONFIGS / "paper").glob("*.yaml")}
    assert before == after, "experiments/configs/paper is stale: run make_paper_configs.py and commit"
