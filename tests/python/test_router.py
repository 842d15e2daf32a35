"""The router from Python: the featurizer against a plain transcription of its specification,
the bundled router on real held-out queries, bad inputs, the file format and the CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from meswitch import _core
from meswitch.cli import main
from meswitch.route import Router, default_router_dir, query_text
from meswitch.route.features import DEFAULT_FEATURIZER, feature_matrix, featurize
from meswitch.route.train import read_examples, train_router

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- reference featurizer
# A direct transcription of the comment at the top of include/meswitch/text_features.hpp.

_MASK = (1 << 64) - 1


def ref_hash64(data: bytes) -> int:
    state = 0xCBF29CE484222325
    for byte in data:
        state = ((state ^ byte) * 0x100000001B3) & _MASK
    h = state
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK
    return h ^ (h >> 33)


def ref_decode(data: bytes) -> list[int]:
    out, i = [], 0
    while i < len(data):
        lead = data[i]
        if lead < 0x80:
            out.append(lead)
            i += 1
            continue
        length = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
        chunk = data[i : i + length]
        try:
            if length and len(chunk) == length:
                out.append(ord(chunk.decode("utf-8")))  # Python's strict decoder: RFC 3629
                i += length
                continue
        except UnicodeDecodeError:
            pass
        out.append(0xFFFD)
        i += 1
    return out


def ref_normalize(data: bytes, limit: int) -> str:
    words, current = [], []
    for c in ref_decode(data[:limit]):
        if c <= 0x20 or c == 0x7F:
            if current:
                words.append("".join(current))
                current = []
            continue
        if ord("A") <= c <= ord("Z"):
            c += 32
        elif ord("0") <= c <= ord("9"):
            c = ord("0")
        current.append(chr(c))
    if current:
        words.append("".join(current))
    return " ".join(words)


def ref_features(data: bytes, hash_bits=18, word_ngrams=2, char_ngram_min=3, char_ngram_max=5,
                 max_input_bytes=16384) -> tuple[np.ndarray, np.ndarray]:
    text = ref_normalize(data, max_input_bytes)
    if not text:
        return np.zeros(0, np.uint32), np.zeros(0, np.float32)
    grams = []
    words = text.split(" ")
    for i in range(len(words)):
        for n in range(1, word_ngrams + 1):
            if i + n <= len(words):
                grams.append(b"w" + " ".join(words[i : i + n]).encode())
    padded = " " + text + " "
    for j in range(len(padded)):
        for n in range(char_ngram_min, char_ngram_max + 1):
            if j + n <= len(padded):
                grams.append(b"c" + padded[j : j + n].encode())
    counts: dict[int, int] = {}
    for gram in grams:
        bucket = ref_hash64(gram) >> (64 - hash_bits)
        counts[bucket] = counts.get(bucket, 0) + 1
    index = sorted(counts)
    values = [1 + math.log(counts[b]) for b in index]
    norm = math.sqrt(sum(v * v for v in values))
    return np.array(index, np.uint32), np.array([v / norm for v in values], np.float32)


HOSTILE = [
    b"", b" \t\n", b"Hello, World!", b"def f(x):\n    return x + 1\n", b"Tom has 12 apples and 30 pears.",
    "Ça coûte 3 €, naïve façade, 日本語のテキスト, emoji 🙂".encode(), b"a\x00b\x00\x00c", b"\xff\xfe\xc0\xafab",
    b"\xed\xa0\x80 surrogate", b"cut \xe2\x82", b"\xf4\x90\x80\x80 too big", b"x" * 40, b"A" * 3 + b"\x7f" + b"B",
]


@pytest.mark.parametrize("data", HOSTILE)
def test_featurizer_matches_the_reference(data: bytes) -> None:
    index, values = featurize(data)
    ref_index, ref_values = ref_features(data)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_allclose(values, ref_values, rtol=2e-7, atol=0)


def test_featurizer_matches_the_reference_on_random_bytes_and_parameters() -> None:
    rng = random.Random(5)
    for _ in range(30):
        data = bytes(rng.choice(b"ab \n0Z\x00\xc3\xa9\xff\xe2\x82\xac") for _ in range(rng.randrange(80)))
        params = {"hash_bits": rng.choice([8, 12, 18]), "word_ngrams": rng.randrange(0, 4),
                  "char_ngram_min": rng.randrange(1, 4), "char_ngram_max": 4, "max_input_bytes": rng.choice([7, 64])}
        index, values = featurize(data, params)
        ref_index, ref_values = ref_features(data, **params)
        np.testing.assert_array_equal(index, ref_index)
        np.testing.assert_allclose(values, ref_values, rtol=2e-7, atol=0)


def test_hash64_documented_values() -> None:
    documented = {b"": 0xEFD01F60BA992926, b"a": 0x82A2A958A9BECE5B, b"the": 0xCB3FF435B889FB31,
                  b"wthe": 0xF7B42BF7E916839D, b"cthe": 0xAFA7E16222DE8B8B}
    for data, value in documented.items():
        assert _core.router_hash64(data) == value == ref_hash64(data)


def test_str_and_bytes_give_the_same_features_and_the_batch_matches() -> None:
    texts = ["Hello there", "def f(): pass", "", "\ud800 lone surrogate"]
    matrix = feature_matrix(texts)
    for row, text in enumerate(texts):
        index, values = featurize(text)
        np.testing.assert_array_equal(matrix[row].indices, index)
        np.testing.assert_array_equal(matrix[row].data, values)
    np.testing.assert_array_equal(featurize("Héllo")[0], featurize("Héllo".encode())[0])
    # A lone surrogate is ill-formed UTF-8 and is replaced like invalid bytes.
    np.testing.assert_array_equal(featurize("\ud800x")[0], featurize(b"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbdx")[0])


# --------------------------------------------------------------------------- the bundled router


@pytest.fixture(scope="module")
def bundled() -> Router:
    return Router()


def _jsonl(path: Path, count: int) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line, _ in zip(stream, range(count))]


def test_bundled_router_routes_real_heldout_queries(bundled: Router) -> None:
    assert bundled.labels == ["chat", "code", "math"] and bundled.fallback == "chat"
    from meswitch.family import heldout_dir

    math_queries = [r["question"] for r in _jsonl(REPO / "data" / "gsm8k" / "test.jsonl", 20)]
    code_queries = [r["prompt"] for r in _jsonl(REPO / "data" / "humaneval" / "HumanEval.jsonl", 20)]
    chat_queries = [r["turns"][0]["content"] for r in _jsonl(heldout_dir() / "chat.jsonl", 20)]
    for expert, queries in [("math", math_queries), ("code", code_queries), ("chat", chat_queries)]:
        labels = [r.label for r in bundled.route_batch(queries)]
        assert labels.count(expert) >= 19, (expert, labels)


def test_bundled_router_was_trained_on_training_data_only(bundled: Router) -> None:
    assert set(bundled.training["sources"]) == {"chat", "code", "math"}
    assert bundled.training["heldout_fraction"] == 0.1
    assert bundled.metrics["heldout_split"]["accuracy"] > 0.99


def test_bad_inputs_have_defined_answers(bundled: Router) -> None:
    empty = bundled.route("")
    assert (empty.expert, empty.confidence, empty.fallback, empty.label) == ("chat", 0.0, True, None)
    assert set(empty.probabilities.values()) == {0.0}
    assert bundled.route(" \n\t\x00\x00").expert == "chat"
    huge = "How many apples does Tom have? " * 40000  # 1.2 MB: only the first 16 KiB are read
    assert bundled.route(huge).probabilities == bundled.route(huge[:16384]).probabilities
    assert bundled.route(b"\xff\xfe\xfd def f(x):\n    return x\x00").expert in {"code", "chat"}
    assert bundled.route("\ud800\udfff").fallback in {True, False}
    result = bundled.route("Tom has 3 apples and buys 4 more. How many apples does he have?")
    assert result.expert == "math" and abs(sum(result.probabilities.values()) - 1) < 1e-5
    with pytest.raises(TypeError):
        bundled.route(42)  # type: ignore[arg-type]


def test_chat_requests_are_routed_on_user_turns(bundled: Router) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant. Write Python code."},
        {"role": "user", "content": "Hi! How was your weekend?"},
        {"role": "assistant", "content": "def weekend(): return 'great'"},
        {"role": "user", "content": [{"type": "text", "text": "Did you go anywhere nice?"}, {"type": "image_url"}]},
    ]
    assert query_text(messages) == "Hi! How was your weekend?\nDid you go anywhere nice?"
    assert query_text({"messages": messages}) == query_text(messages)
    assert query_text(messages, max_input_bytes=30) == "Did you go anywhere nice?"  # most recent first
    assert query_text([{"role": "assistant", "content": "x"}]) == ""
    assert bundled.route(messages).expert == "chat"
    with pytest.raises(ValueError, match="message 0"):
        query_text([{"content": "no role"}])
    with pytest.raises(ValueError, match="messages"):
        query_text({"model": "auto"})


# --------------------------------------------------------------------------- files


EXAMPLES = {
    "chat": ["hello how are you", "what a lovely day", "i love my dog", "see you tomorrow friend",
             "how was the party", "good morning to you", "tell me about your weekend", "nice to meet you"] * 3,
    "math": [f"Tom has {a} apples and gets {b} more. How many now?" for a, b in zip(range(3, 27), range(5, 29))],
}


@pytest.fixture
def small_router(tmp_path: Path) -> Path:
    out = tmp_path / "router"
    train_router(EXAMPLES, out, fallback="chat", featurizer={**DEFAULT_FEATURIZER, "hash_bits": 12},
                 heldout_fraction=0.3)
    return out


def test_train_write_load_round_trip(small_router: Path) -> None:
    router = Router(small_router)
    assert router.labels == ["chat", "math"] and router.featurizer["hash_bits"] == 12
    assert 0 <= router.threshold <= 1
    assert router.route("Sam has 4 apples and gets 9 more. How many?").label == "math"
    assert router.route("hello friend, how is your dog").label == "chat"
    on_disk = json.loads((small_router / "router.json").read_text())
    assert on_disk["format"] == "meswitch-router" and on_disk["format_version"] == 1
    assert on_disk["training"]["examples"]["math"] > 0 and "heldout_split" in on_disk["metrics"]
    assert router.route_batch(["hello", "Tom has 3 apples"]) == [router.route("hello"), router.route("Tom has 3 apples")]
    with pytest.raises(FileExistsError, match="--force"):
        train_router(EXAMPLES, small_router, fallback="chat", featurizer={**DEFAULT_FEATURIZER, "hash_bits": 12})


def test_truncated_and_malformed_files_name_the_file(small_router: Path) -> None:
    weights = small_router / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(_core.FormatError, match="weights.safetensors"):
        Router(small_router)
    weights.write_bytes(data)
    manifest = small_router / "router.json"
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(_core.FormatError, match=r"router\.json: is not valid JSON"):
        Router(small_router)
    with pytest.raises(_core.FormatError, match="missing"):
        Router(small_router / "nothing-here")


def test_labels_must_match_the_served_experts(small_router: Path) -> None:
    assert Router(small_router, experts=["chat", "math", "code"]).labels == ["chat", "math"]
    with pytest.raises(_core.FormatError, match="not served: math"):
        Router(small_router, experts=["chat"])
    assert Router(small_router).missing_experts(["math"]) == ["chat"]


def test_read_examples_formats_and_errors(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n"two"\n{"question": "three?"}\n\n'
                     '[{"role": "user", "content": "four"}]\n{"messages": [{"role": "user", "content": "five"}]}\n')
    assert read_examples(jsonl) == ["one", "two", "three?", "four", "five"]
    text = tmp_path / "b.txt"
    text.write_text("first line\n\nsecond line\n")
    assert read_examples(text) == ["first line", "second line"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"answer": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_examples(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- command line


def test_cli_route_prints_expert_and_confidence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"]) == 0
    expert, confidence = capsys.readouterr().out.split()
    assert expert == "math" and 0 < float(confidence) <= 1
    assert main(["route", "--json", "def add(a, b):\n    return a + b"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["expert"] == "code" and set(result["probabilities"]) == {"chat", "code", "math"}


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "--router", str(tmp_path / "none"), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("meswitch route: error: ") and err.count("\n") == 1
    assert main(["route", "--experts", "chat", "hi"]) == 1
    assert "not served: code, math" in capsys.readouterr().err
    assert main(["router", "train", "--expert", "chat", "--fallback", "chat", "--out", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err.startswith("meswitch router train: error: --expert takes NAME=FILE")


def test_cli_route_says_when_it_fell_back_and_what_it_guessed(capsys: pytest.CaptureFixture[str]) -> None:
    """A fallback names the fallback expert and the best guess with its confidence, never as the
    fallback's own confidence."""
    router = Router()
    query = "def quicksort(arr):"
    routed = router.route(query)
    assert routed.fallback and routed.label == "code" and routed.expert == "chat"  # below the threshold
    assert main(["route", query]) == 0
    assert capsys.readouterr().out.strip() == (f"chat (fallback: code {routed.confidence:.3f} is below the threshold "
                                               f"{router.threshold:.3f})")
    assert main(["route", ""]) == 0
    assert capsys.readouterr().out.strip() == "chat (fallback: nothing to route on)"


def test_bundled_router_ships_in_the_package() -> None:
    directory = default_router_dir()
    assert (directory / "router.json").is_file() and (directory / "weights.safetensors").is_file()
    assert directory.parent.name == "family"
