"""The host-side generation API (`reft_jax.rollout.generation`) and the `reft sample` command."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from reft_jax import cli
from reft_jax.rollout import generation, sampler as sampling
from reft_jax.data.batches import left_pad
from reft_jax.data.tokenizer import train_tokenizer
from reft_jax.model.config import ModelConfig
from reft_jax.rollout.sampler import SampleConfig
from test_sampler import random_params

WORDS = "the quick brown fox jumps over a lazy dog while seven cats count 12 apples and 345 pears".split()


def text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


@pytest.fixture(scope="module")
def tiny():
    tokenizer = train_tokenizer([text(40, s) for s in range(50)], vocab_size=300)
    cfg = ModelConfig(num_layers=2, vocab_size=len(tokenizer))
    return cfg, random_params(cfg), tokenizer


def test_encode_prompts_keeps_the_head_and_counts_truncations(tiny):
    _, _, tok = tiny
    prompts = [text(30, 1), text(2, 2)]
    full, _ = generation.encode_prompts(tok, prompts)
    ids, truncated = generation.encode_prompts(tok, prompts, max_prompt_len=10)
    assert truncated == 1
    assert ids[0] == full[0][:10] and ids[1] == full[1]
    assert tok.bos_token_id not in full[0]  # no special tokens (ReFT)


def test_generate_decodes_only_the_completion(tiny):
    cfg, params, tok = tiny
    prompts = [text(5, 3), text(9, 4), text(2, 5)]
    config = SampleConfig(max_new_tokens=6, greedy=True)
    out = generation.generate(params, cfg, tok, prompts, config, jax.random.key(0), batch_size=4, progress=False,
                              keep_rollouts=True)
    assert out.num_tokens == sum(len(c[0]) for c in out.completion_ids)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    tokens, mask = left_pad(ids, 64, tok.pad_token_id, 4)  # the shape generate used: no new programs
    ref = sampling.sample(params, tokens, mask, jax.random.key(0), cfg, generation.with_tokenizer_ids(config, tok))
    for i in range(len(prompts)):
        n = int(ref.lengths[i])
        np.testing.assert_array_equal(out.completion_ids[i][0], np.asarray(ref.completion)[i, :n])
        assert out.texts[i] == [tok.decode(out.completion_ids[i][0].tolist(), skip_special_tokens=True)]
        assert out.logprobs[i][0].shape == (n,)
    idx, rollout = out.batches[0]
    assert sorted(idx.tolist()) == [0, 1, 2] and rollout.tokens.shape[0] == 3  # dummy row dropped


def test_many_prompts_compile_few_programs_and_batching_does_not_change_samples(tiny):
    cfg, params, tok = tiny
    prompts = [text(1 + (7 * i) % 18, i) for i in range(100)]  # 1..18 words
    lengths = [len(i) for i in generation.encode_prompts(tok, prompts)[0]]
    assert len(set(lengths)) > 20 and max(lengths) <= 64  # varied, all in the first 64-token bucket
    config = SampleConfig(max_new_tokens=5, temperature=0.9, n=2)
    before = sampling.compile_count()
    a = generation.generate_texts(params, cfg, tok, prompts, config, jax.random.key(1), batch_size=16,
                                  progress=False)
    assert sampling.compile_count() - before <= 3  # one prefill + one decode program
    assert len(a) == 100 and all(len(s) == 2 for s in a)
    # per-prompt keys: other batch-mates (the first 20 prompts alone) give the same samples
    b = generation.generate_texts(params, cfg, tok, prompts[:20], config, jax.random.key(1), batch_size=16,
                                  progress=False)
    assert b == a[:20]
    assert sampling.compile_count() - before <= 3


def _tiny_hf_dir(tmp_path, tiny):
    from reft_jax.model.io import save_hf

    cfg, params, tok = tiny
    return save_hf(tmp_path / "model", cfg, params, tok)


def test_cli_sample_jsonl_and_reft_data_file(tmp_path, tiny):
    model = _tiny_hf_dir(tmp_path, tiny)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text(3 + i, i), "item_id": f"x_{i}"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    assert cli.main(["sample", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
                     "--n", "2", "--max-new-tokens", "4", "--top-k", "20", "--no-progress"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["item_id"] for line in lines] == ["x_0", "x_1", "x_2"]
    assert all(len(line["completions"]) == 2 and "completion" not in line for line in lines)

    reft = tmp_path / "gsm8k_test.json"
    reft.write_text(json.dumps([{"item_id": "gsm8k_0", "question": "Tom has 3 apples. How many?",
                                 "answer_value": "3"}]))
    assert cli.main(["sample", "--model", str(model), "--prompts", str(reft), "--out", str(out), "--greedy",
                     "--engine", "nl", "--max-new-tokens", "3", "--no-progress"]) == 0
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["prompt"] == "Question:\nTom has 3 apples. How many?\nAnswer reasoning:\n"
    assert line["item_id"] == "gsm8k_0" and line["answer_value"] == "3" and isinstance(line["completion"], str)


def test_cli_rejects_a_prompts_file_without_prompts(tmp_path, tiny, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt here"}) + "\n")
    code = cli.main(["sample", "--model", str(tmp_path / "missing"), "--prompts", str(bad), "--out",
                     str(tmp_path / "o.jsonl")])
    assert code == 2 and "prompt" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_sample_smollm2_gguf_on_reft_gsm8k(tmp_path, data_dir):
    from reft_jax.model.io import smollm2_gguf_path

    rows = json.loads((data_dir / "reft" / "gsm8k_test_set.json").read_text())[:3]
    prompts = tmp_path / "gsm8k.json"
    prompts.write_text(json.dumps(rows))
    out = tmp_path / "out.jsonl"
    assert cli.main(["sample", "--model", str(smollm2_gguf_path()), "--prompts", str(prompts), "--out", str(out),
                     "--greedy", "--engine", "python", "--max-new-tokens", "24", "--no-progress"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["item_id"] for x in lines] == [r["item_id"] for r in rows]
    # SmolLM2's BPE merges the header's newline with the next indent: the prompt stops before it
    # (data.header_newline auto) and the completion starts the program body with it
    from reft_jax.data.prompts import rollout_prefix

    for x, r in zip(lines, rows):
        assert x["prompt"] == rollout_prefix(r["question"], "python", newline=False)
        assert x["completion"].startswith("\n") and x["completion"].strip()
