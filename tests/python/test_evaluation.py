"""Tests of the evaluation harness and the shipped tiny expert family."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from meswitch import evaluation  # noqa: E402
from meswitch.family import EXPERTS, family_dir, heldout_dir  # noqa: E402

MODELS = ("base", *EXPERTS)


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(2)
    return evaluation.load_model(family_dir() / "base")


def _manual_scores(model, tokenizer, text: str, max_length: int | None = None) -> tuple[float, int, int]:
    """Summed NLL, scored tokens and top-1 hits of ``text`` (its first ``max_length`` tokens,
    the leading one included), computed with numpy from raw logits."""
    ids = ([tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"])[:max_length]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    nll, hits = 0.0, 0
    for position in range(len(ids) - 1):
        row = logits[position]
        log_z = row.max() + np.log(np.exp(row - row.max()).sum())
        nll -= row[ids[position + 1]] - log_z
        hits += int(np.argmax(row) == ids[position + 1])
    return nll, len(ids) - 1, hits


def test_perplexity_matches_manual_log_softmax(base):
    model, tokenizer = base
    texts = ["Tom has 3 apples. Ann gives Tom 4 more apples.", "def add(a, b):\n    return a + b\n"]
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        nll, tokens, _ = _manual_scores(model, tokenizer, text)
        total_nll += nll
        total_tokens += tokens
    expected = math.exp(total_nll / total_tokens)
    got = evaluation.perplexity(model, tokenizer, texts)
    assert got == pytest.approx(expected, rel=1e-5)
    # Batching with padding must not change the result.
    assert evaluation.perplexity(model, tokenizer, texts, batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_tokenizer_independent_units_count_the_scored_text(base):
    model, tokenizer = base
    texts = ["Tom has 3 apples. Ann gives Tom 4 more apples.", "def add(a, b):\n    return a + b\n"]
    stats = evaluation.token_statistics(model, tokenizer, texts)
    assert stats["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert stats["words"] == 10 + 7  # whitespace-separated words of the two texts
    manual_nll = sum(_manual_scores(model, tokenizer, t)[0] for t in texts)
    assert stats["nll"] == pytest.approx(manual_nll, rel=1e-5)
    # Truncation scores only the first max_length tokens, and counts only their bytes and words.
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    short = evaluation.token_statistics(model, tokenizer, texts[:1], max_length=5)
    kept = tokenizer.decode(ids[:4])
    assert short["tokens"] == 4
    assert short["bytes"] == len(kept.encode("utf-8")) and short["words"] == len(kept.split())


def test_next_token_accuracy_matches_manual(base):
    model, tokenizer = base
    text = "import os\n\n\ndef main():\n    print(os.getcwd())\n"
    _, tokens, hits = _manual_scores(model, tokenizer, text)
    assert evaluation.next_token_accuracy(model, tokenizer, [text]) == pytest.approx(hits / tokens, rel=1e-12)


@pytest.mark.parametrize(
    ("generated", "reference", "expected"),
    [
        ("Tom has 3 + 4 = 7 apples.\n#### 7", 7, True),
        ("so 1,234 in total\n#### 1,234\n#### 9", 1234, True),
        ("#### -5", -5, True),
        ("####12.0", 12, True),
        ("#### 8", 7, False),
        ("the answer is 7", 7, False),
        ("#### 7", "reasoning\n#### 7", True),
    ],
)
def test_exact_match_parsing(generated, reference, expected):
    assert evaluation.is_exact_match(generated, reference) is expected


def test_parse_final_answer():
    assert evaluation.parse_final_answer("x\n#### 42 apples") == 42.0
    assert evaluation.parse_final_answer("no marker 42") is None


def _fake_results() -> dict:
    return {
        "base": {
            "chat": {"perplexity": 50.0, "bits_per_byte": 2.0},
            "math": {"perplexity": 8.0, "exact_match_generated": 0.05, "exact_match_gsm8k": 0.0},
            "code": {"perplexity": 12.0, "next_token_accuracy": 0.4},
        },
        "math": {
            "chat": {"perplexity": 70.0, "bits_per_byte": 2.4},
            "math": {"perplexity": 4.0, "exact_match_generated": 0.3, "exact_match_gsm8k": 0.02},
            "code": {"perplexity": 20.0, "next_token_accuracy": 0.3},
        },
    }


def test_write_report(tmp_path):
    results = _fake_results()
    paths = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "img" / "r.png"
    table = evaluation.write_report(results, *paths)
    assert json.loads(paths[0].read_text()) == results
    lines = paths[1].read_text().splitlines()
    assert lines[0].startswith("| model | chat ppl")
    assert lines[1].startswith("|---|")
    assert lines[3].startswith("| math | 70.00 |") and "30.0 %" in lines[3]
    assert paths[1].read_text() == table
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_register_cli_parses_eval(tmp_path):
    parser = argparse.ArgumentParser(prog="meswitch")
    evaluation.register_cli(parser.add_subparsers(dest="command"))
    a, b = tmp_path / "a", tmp_path / "b"  # model directories must exist
    a.mkdir()
    b.mkdir()
    args = parser.parse_args(["eval", str(a), str(b), "--domains", "math", "--max-examples", "3", "--json", "o.json"])
    assert args.func is not None and args.model_dirs == [str(a), str(b)]
    assert args.domains == ["math"] and args.max_examples == 3 and str(args.json) == "o.json"


def test_evaluate_accepts_in_memory_model(base):
    model, tokenizer = base
    result = evaluation.evaluate(model=model, tokenizer=tokenizer, domains=("code", "math"), max_examples=2, max_new_tokens=8)
    assert result["code"]["n_texts"] == 2
    assert result["math"]["n_problems"] == 4  # two per source
    assert "chat" not in result
    # The scores are those of the held-out texts themselves, recomputed here from raw logits.
    for domain, key in (("code", "next_token_accuracy"), ("math", "perplexity")):
        texts = [r["text"] for r in evaluation.load_heldout(domain, max_examples=2)]
        scores = [_manual_scores(model, tokenizer, text, evaluation.DEFAULT_MAX_LENGTH) for text in texts]
        nll, tokens, hits = (sum(column) for column in zip(*scores))
        expected = hits / tokens if key == "next_token_accuracy" else math.exp(nll / tokens)
        assert result[domain][key] == pytest.approx(expected, rel=1e-5), domain


def test_heldout_files_present():
    for domain, minimum in (("chat", 100), ("math", 100), ("code", 100)):
        records = evaluation.load_heldout(domain, heldout_dir())
        assert len(records) >= minimum and all(r["text"] for r in records)
    sources = {r["source"] for r in evaluation.load_heldout("math")}
    assert sources == {"generated", "gsm8k"}


@pytest.mark.parametrize("name", MODELS)
def test_shipped_models_load_with_auto_classes(name):
    directory = family_dir() / name
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    assert model.dtype == torch.float16
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert (directory / "generation_config.json").is_file() and (directory / "special_tokens_map.json").is_file()


def test_chat_expert_extends_vocabulary():
    base_tok = transformers.AutoTokenizer.from_pretrained(family_dir() / "base")
    chat_tok = transformers.AutoTokenizer.from_pretrained(family_dir() / "chat")
    assert len(chat_tok) > len(base_tok)
    assert len(chat_tok.tokenize("<|user|>hi<|end|>")) == 3
    base_cfg = json.loads((family_dir() / "base" / "config.json").read_text())
    chat_cfg = json.loads((family_dir() / "chat" / "config.json").read_text())
    assert chat_cfg["vocab_size"] > base_cfg["vocab_size"]


def test_code_expert_is_sharded():
    directory = family_dir() / "code"
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert all((directory / shard).is_file() for shard in shards)
    assert not (directory / "model.safetensors").exists()


def test_family_size_budget():
    total = sum(p.stat().st_size for p in family_dir().rglob("*") if p.is_file())
    assert total <= 64 * 1024 * 1024


@pytest.mark.parametrize("domain", EXPERTS)
def test_each_expert_beats_the_base_on_its_own_domain(domain):
    """The shipped deltas are real specialisation, not noise (docs/results.md has the full table).

    Bits per byte compares models with different tokenizers (the chat expert's role markers).
    On the full held-out sets the gaps are 7-14 %; 5 % on 40 texts leaves room for sampling.
    """
    texts = [r["text"] for r in evaluation.load_heldout(domain, max_examples=40)]

    def bits_per_byte(name: str) -> float:
        stats = evaluation.token_statistics(*evaluation.load_model(family_dir() / name), texts)
        return stats["nll"] / math.log(2) / stats["bytes"]

    assert bits_per_byte(domain) < 0.95 * bits_per_byte("base")
