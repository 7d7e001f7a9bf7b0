"""`reft sample`'s choices that need no trained model: the engine, the step, the source."""
import argparse
import json

from reft_jax import cli
from reft_jax.commands import sample


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sample.add_arguments(parser)
    return parser.parse_args(list(argv))


def _reft_file(tmp_path):
    path = tmp_path / "gsm8k_test.json"
    path.write_text(json.dumps([{"item_id": "gsm8k_0", "question": "Tom has 3 apples. How many?",
                                 "answer_value": "3"}]))
    return path


def test_questions_need_an_engine_when_the_model_records_none(tmp_path, capsys):
    # an HF directory or GGUF has no data.engine: N-CoT must never silently get the program header
    code = cli.main(["sample", "--model", str(tmp_path / "model.gguf"), "--prompts", str(_reft_file(tmp_path)),
                     "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "--engine" in err
    code = cli.main(["sample", "--model", str(tmp_path / "model.gguf"), "--dataset", "svamp",
                     "--out", str(tmp_path / "o.jsonl")])
    assert code == 2 and "--engine" in capsys.readouterr().err


def test_engine_comes_from_a_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  dataset: synthetic\n  engine: nl\n  header_newline: auto\n")
    args = parse("--model", str(run), "--dataset", "synthetic", "--out", "o")
    data = sample.run_data_section(run)
    assert sample.resolve_engine(args, data) == "nl"
    args.engine = "python"  # an explicit engine wins, with a note
    assert sample.resolve_engine(args, data) == "python" and "trained with engine nl" in capsys.readouterr().err
    rows = sample.question_rows(sample.dataset_examples(args, "nl", data)[:2], "nl", True, "test")
    assert all(r["prompt"].endswith("\nAnswer reasoning:\n") for r in rows)  # N-CoT: no program header
    assert all(r["item_id"].startswith("synthetic_") and r["answer_value"] for r in rows)


def test_step_needs_a_run_directory_and_verifiers_are_refused(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Question:\nx\nAnswer reasoning:\n"}) + "\n")
    hf = tmp_path / "hf"
    hf.mkdir()
    code = cli.main(["sample", "--model", str(hf), "--step", "warmup", "--prompts", str(prompts),
                     "--out", str(tmp_path / "o.jsonl")])
    assert code == 2 and "--step warmup" in capsys.readouterr().err
    ver = tmp_path / "verifier"
    ver.mkdir()
    (ver / "verifier.json").write_text("{}")
    code = cli.main(["sample", "--model", str(ver), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])
    assert code == 2 and "verifier" in capsys.readouterr().err


def test_defaults_are_reft_sampling_py():
    args = parse("--model", "m", "--prompts", "p", "--out", "o")
    cfg = sample.sample_config_from_args(args)
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_total_len, cfg.greedy) == (1.0, 50, 1.0, 1024, False)
    assert args.max_prompt_len == 1024 and args.step == "latest"
