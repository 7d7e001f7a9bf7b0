"""The benchmark scripts (experiments/benchmarks): the shape table, and each script run end to
end at the tiny shape as a smoke test (no timings asserted: speed claims are the scripts' own
ratios against a baseline measured in the same run)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
sys.path.insert(0, str(BENCH))

import shapes  # noqa: E402


def test_named_shapes_have_the_published_parameter_counts():
    counts = {name: shapes.model_config(name).num_params(include_value_head=False) for name in shapes.SHAPES}
    assert counts["smollm2-135m"] == 134_515_008  # the GGUF's own count
    assert counts["llama-1b"] == 1_235_814_400  # Llama-3.2-1B
    assert counts["codellama-7b"] == 6_738_546_688  # CodeLlama-7b-hf (vocab 32016)
    llama = shapes.model_config("llama-1b")
    assert llama.rope_type == "llama3" and llama.tie_word_embeddings
    assert not shapes.model_config("codellama-7b").tie_word_embeddings
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.model_config("gpt-5")


def test_flop_counts():
    c = shapes.model_config("codellama-7b")
    # untied: the embedding lookup is no matmul, the head is
    assert shapes.matmul_params(c) == c.num_params(include_value_head=False) - c.vocab_size * c.hidden_size \
        - c.num_layers * 2 * c.hidden_size - c.hidden_size
    assert shapes.train_flops_per_token(c, 1024) == 6 * shapes.matmul_params(c)
    attn = shapes.train_flops_per_token(c, 1024, attention=True) - shapes.train_flops_per_token(c, 1024)
    assert attn == 3 * 4 * c.num_layers * c.num_heads * c.head_dim * 512


def test_torch_twin_has_the_same_shape():
    pytest.importorskip("torch")
    c = shapes.model_config("tiny")
    model = shapes.hf_model(c, "float32", "cpu")
    assert sum(p.numel() for p in model.parameters()) == c.num_params(include_value_head=False)


def _run(script: str, *args: str, tmp_path: pathlib.Path) -> tuple[str, dict]:
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, not conftest's fake eight
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)], capture_output=True,
                          text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_bench_sft_tiny(tmp_path):
    stdout, result = _run("bench_sft.py", "--shape", "tiny", "--batch", "2", "--seq", "32", "--steps", "1",
                          "--dtype", "bfloat16", "--grad-accum", "auto", tmp_path=tmp_path)
    assert "memory plan per device: sft" in stdout and "MFU" in stdout and "ratio reft-jax / torch" in stdout
    assert result["fits"] and result["grad_accum"] == 1 and result["remat"] == "none"
    assert result["reft-jax"]["mfu"] > 0 and result["ratio"] > 0


@pytest.mark.slow
def test_bench_sampler_tiny(tmp_path):
    stdout, result = _run("bench_sampler.py", "--shape", "tiny", "--batches", "2", "--dtypes", "bfloat16",
                          "--new-tokens", "4", "--prompt-len", "8", tmp_path=tmp_path)
    assert "of the roofline" in stdout and "x transformers generate" in stdout
    (row,) = result["rows"]
    assert row["shape"] == "tiny" and row["g"] > 0 and row["hf"] > 0 and row["bound"] > 0


@pytest.mark.slow
def test_bench_ppo_tiny(tmp_path):
    stdout, result = _run("bench_ppo.py", "--shape", "tiny", "--questions", "2", "--total-len", "48",
                          "--max-new-tokens", "16", "--steps", "2", "--dataset", "synthetic", "--grad-accum", "1",
                          "--score-microbatches", "1", "--run-dir", str(tmp_path / "run"), "data.max_prompt_len=32",
                          tmp_path=tmp_path)
    assert "steady state" in stdout and "memory plan: " in stdout
    assert len(result["steps"]) == 2 and result["memory_plan"]["total_gib"] > 0
    first, second = result["steps"]
    assert first["compile"] > 0 and first["seq_width"] == second["seq_width"]  # one bucket: compiled once
    assert result["compile_seconds_in_run"] >= result["compile_seconds_in_steps"] > 0


def test_sandbox_policies_reference_and_samples(tmp_path, data_dir):
    """20 reference programs (same outcome under both policies) and a sample file whose numpy /
    getattr programs only the reft policy runs."""
    sample = {"item_id": "svamp_1", "question": "q", "answer_value": "3", "completions": [
        "def solution():\n    import numpy as np\n    return int(np.sum([1, 2]))",
        "def solution():\n    return getattr(3, 'real')", "def solution():\n    return 3"]}
    (tmp_path / "samples.jsonl").write_text(json.dumps(sample) + "\n")
    stdout, result = _run("sandbox_policies.py", "--reference", "--limit", "20", "--data",
                          str(data_dir / "reft" / "svamp_python_sdp.json"), "--samples", "samples.jsonl",
                          tmp_path=tmp_path)
    ref, samples = result["reference programs svamp_python_sdp.json"], result["samples samples.jsonl"]
    assert ref["programs"] == 20 and ref["differ_status"] == ref["differ_reward"] == 0 and ref["correct"]["reft"] == 20
    assert "no program differs between the policies" in stdout
    assert samples["programs"] == 3 and samples["differ_status"] == samples["differ_reward"] == 2
    assert samples["pairs"] == {"rejected -> ok": 2} and samples["correct"] == {"strict": 1, "reft": 3}
