"""Over-long training data (`data.overlong`: drop | truncate | error) with a real BPE trained on
real SVAMP rows, and length settings against the model's `max_position_embeddings`."""
import pytest

from reft_jax.config import ConfigError, load_config
from reft_jax.data.formats import DataError
from reft_jax.data.lengths import check_lengths, fit_examples, fit_prompts
from reft_jax.data.prompts import encode_sft, special_ids
from reft_jax.data.sources import DataConfig, load_reft_json, split_source
from reft_jax.data.splits import tokenizer_corpus
from reft_jax.data.tokenizer import train_tokenizer
from reft_jax.model.config import ModelConfig
from reft_jax.rollout.engine import encode_prefixes

N = 300  # SVAMP rows used


@pytest.fixture(scope="module")
def svamp(data_dir):
    path = data_dir / "reft" / "svamp_nl.json"
    rows = load_reft_json(path)[:N]
    return path, rows, train_tokenizer(tokenizer_corpus(rows, "nl"), vocab_size=400)


@pytest.fixture(scope="module")
def encoded(svamp):
    _, rows, tok = svamp
    return [encode_sft(tok, ex, "nl", None) for ex in rows]


def _limit_and_over(encoded):
    lengths = sorted(len(e.ids) for e in encoded)
    limit = lengths[len(lengths) * 3 // 4]  # a quarter of the examples are longer
    over = [i for i, e in enumerate(encoded) if len(e.ids) > limit]
    return limit, over


def test_drop_leaves_out_every_long_example_and_reports_it(svamp, encoded):
    path, rows, tok = svamp
    limit, over = _limit_and_over(encoded)
    kept, report = fit_examples(encoded, rows, limit, "drop", str(path))
    longest = max(range(N), key=lambda i: len(encoded[i].ids))
    assert (report.count, report.total, report.kept) == (len(over), N, N - len(over))
    assert (report.longest, report.longest_id) == (len(encoded[longest].ids), rows[longest].item_id)
    assert [e.ids.tolist() for e in kept] == [e.ids.tolist() for i, e in enumerate(encoded) if i not in over]
    eos = special_ids(tok).eos
    assert all(e.ids[-1] == eos for e in kept)  # every kept target still ends with its answer and EOS
    assert report.line() == (
        f"{len(over)} of {N} training examples in {path} are longer than data.max_len={limit} tokens "
        f"(longest: {rows[longest].item_id}, {len(encoded[longest].ids)} tokens); data.overlong=drop: "
        f"dropped them ({N - len(over)} remain)")


def test_truncate_keeps_the_head_as_reft(svamp, encoded):
    path, rows, _ = svamp
    limit, over = _limit_and_over(encoded)
    kept, report = fit_examples(encoded, rows, limit, "truncate", str(path))
    assert (report.count, report.kept) == (len(over), N)
    assert all(k.ids.tolist() == e.ids[:limit].tolist() and k.n_prompt == min(e.n_prompt, limit)
               for k, e in zip(kept, encoded))
    assert "data.overlong=truncate: kept their first" in report.line()


def test_error_names_file_count_and_longest(svamp, encoded):
    path, rows, _ = svamp
    limit, over = _limit_and_over(encoded)
    longest = max(range(N), key=lambda i: len(encoded[i].ids))
    with pytest.raises(DataError) as info:
        fit_examples(encoded, rows, limit, "error", str(path))
    assert str(info.value) == (
        f"{path}: {len(over)} of {N} training examples are longer than data.max_len={limit} tokens "
        f"(longest: {rows[longest].item_id}, {len(encoded[longest].ids)} tokens); raise data.max_len or set "
        "data.overlong=drop (leave them out) or truncate (keep their head)")


def test_nothing_long_reports_nothing(svamp, encoded):
    path, rows, _ = svamp
    kept, report = fit_examples(encoded, rows, 10**6, "error", str(path))
    assert len(kept) == N and report.count == 0 and report.line() == ""


def test_all_too_long_is_an_error_even_when_dropping(svamp, encoded):
    path, rows, _ = svamp
    shortest = min(len(e.ids) for e in encoded)
    with pytest.raises(DataError, match=rf"every one of the {N} training examples is longer than "
                                        rf"data.max_len=8 tokens \(the shortest has {shortest}\)"):
        fit_examples(encoded, rows, 8, "drop", str(path))


def test_prompts_over_max_prompt_len(svamp):
    path, rows, tok = svamp
    prefixes = encode_prefixes(tok, [r.question for r in rows], "python", 10**6, pad_id=0)
    lengths = sorted(prefixes.mask.sum(-1).tolist())
    limit = lengths[len(lengths) // 2]
    truncated = encode_prefixes(tok, [r.question for r in rows], "python", limit, pad_id=0).truncated
    kept, report = fit_prompts(tok, rows, "python", limit, "drop", str(path))
    assert report.count == truncated == N - len(kept) > 0  # the same count the rollout engine sees
    assert encode_prefixes(tok, [r.question for r in kept], "python", limit, pad_id=0).truncated == 0
    assert "data.max_prompt_len" in report.line()
    same, report = fit_prompts(tok, rows, "python", limit, "truncate", str(path))
    assert same == rows and report.count == truncated
    with pytest.raises(DataError, match="longer than data.max_prompt_len"):
        fit_prompts(tok, rows, "python", limit, "error", str(path))


def test_split_source_names_the_file(data_dir):
    cfg = DataConfig(dataset="svamp", engine="nl", data_dir=str(data_dir))
    assert split_source(cfg, "train") == str(data_dir / "reft" / "svamp_nl.json")
    assert split_source(DataConfig(), "train") == "the synthetic train split"


def test_overlong_setting_is_checked():
    from reft_jax.train.sft import SFTConfig

    with pytest.raises(ConfigError, match=r"data.overlong='trunc': 'trunc' is not one of 'drop', 'truncate', "
                                          r"'error' \(did you mean 'truncate'\?\)"):
        load_config(SFTConfig, overrides=["run_dir=x", "data.overlong=trunc"])
    assert load_config(SFTConfig, overrides=["run_dir=x"]).data.overlong == "drop"


@pytest.mark.parametrize("kind, overrides, message", [
    ("sft", ["data.max_len=2048"], "data.max_len=2048: longer than the model's max_position_embeddings=512; "
                                   "lower it to at most 512"),
    ("sft", ["data.max_len=600", "eval.max_total_len=1000"],
     "data.max_len=600; eval.max_total_len=1000: longer than the model's max_position_embeddings=512; "
     "lower them to at most 512"),
    ("sft", ["eval.max_total_len=null", "eval.max_new_tokens=400"],
     "eval.max_new_tokens=400 (+ data.max_prompt_len=128, no eval.max_total_len): longer than the model's "
     "max_position_embeddings=512; lower it to at most 512"),
    ("ppo", ["max_total_len=1024"], "max_total_len=1024: longer than the model's max_position_embeddings=512; "
                                    "lower it to at most 512"),
    ("ppo", ["data.max_prompt_len=600", "max_total_len=700"],
     "max_total_len=700; data.max_prompt_len=600: longer than the model's max_position_embeddings=512; "
     "lower them to at most 512"),
    ("sft", [], None),
    ("ppo", ["data.max_len=2048"], None),  # an SFT setting: not a PPO run's business
])
def test_lengths_within_the_model(kind, overrides, message):
    from reft_jax.train.ppo import PPOConfig
    from reft_jax.train.sft import SFTConfig

    import pathlib
    configs = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs"
    cls = {"sft": SFTConfig, "ppo": PPOConfig}[kind]
    cfg = load_config(cls, configs / f"{kind}_synthetic_tiny.yaml", overrides)
    model = ModelConfig(max_position_embeddings=512)
    if message is None:
        check_lengths(cfg, model)
        return
    with pytest.raises(ConfigError) as info:
        check_lengths(cfg, model)
    assert str(info.value) == message
