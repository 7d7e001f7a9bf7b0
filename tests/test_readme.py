"""The README's commands run (a README that lies is a bug).

The set-up commands run in CI itself (.ci/run executes the README's test command; `reft demo`
runs shortened in tests/test_demo.py). The workflow commands run here verbatim, with only size
overrides appended so they finish in seconds, in the order the README gives them.
"""
import pathlib
import shlex

import pytest

from reft_jax import cli

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"

# Appended to each workflow command: small sizes, and run directories under tmp.
SHRINK = {
    "sft": ["data.synthetic.num_train=96", "data.max_test_examples=8", "epochs=2", "warmup_epoch=1",
            "eval.every_epochs=2", "eval.max_new_tokens=24", "batch_size=16"],
    "ppo": ["data.synthetic.num_train=96", "data.max_test_examples=8", "epochs=1", "batch_questions=16",
            "max_new_tokens=24", "eval.max_new_tokens=24", "eval.every_epochs=1"],
    "eval": ["--max-examples", "8", "--max-new-tokens", "24"],
}


def readme_commands() -> list[list[str]]:
    cmds = []
    for line in README.read_text().splitlines():
        if line.startswith("    reft "):
            cmds.append(shlex.split(line.split("#", 1)[0]))
    return cmds


def test_readme_names_the_two_setup_commands():
    text = README.read_text()
    assert "    scripts/setup.sh && .venv/bin/reft demo\n" in text
    assert "    scripts/setup.sh && .venv/bin/python -m pytest -n 2 -m \"not slow\"\n" in text


def test_readme_workflow_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run dirs (runs/...) land in tmp
    repo = README.parent
    cmds = readme_commands()
    assert [c[1] for c in cmds] == ["sft", "ppo", "eval", "report"]
    for cmd in cmds:
        args = [a.replace("experiments/", f"{repo}/experiments/") for a in cmd[1:]]
        args += SHRINK.get(args[0], [])
        assert cli.main(args) == 0, cmd
    assert (tmp_path / "runs" / "ppo_synthetic_tiny" / "metrics.jsonl").is_file()


def test_reft_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out
