"""The continuous-batching engine on the bundled family: greedy and seeded outputs equal those of
``generate`` run alone, whatever shares the batch (ragged prompts, staggered arrivals, a KV pool so
small that requests are preempted and recomputed); sampling filters against a NumPy reference;
stop strings, EOS, max_tokens, streaming in whole characters; cancellation; experts that must wait
for room in a real store, or fail to load, end or delay only their own requests."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from meswitch.compress import CompressionSettings, compress
from meswitch.family import family_dir
from meswitch.serve import (
    Engine,
    EngineError,
    ExpertUnavailable,
    MultiExpertModel,
    PromptTooLong,
    SamplingParams,
    generate,
)
from meswitch.serve.engine.detokenizer import IncrementalDetokenizer, StopStrings
from meswitch.serve.engine.sampling import filtered_probabilities, sample
from meswitch.serve.engine.tokenizer import load_tokenizer
from meswitch.store import ExpertStore

pytest.importorskip("transformers")

GREEDY = [  # (expert, prompt): every expert and the base, ragged prompts; "def read_config" ends at once (EOS)
    ("math", "Sam has 4 apples and buys 3 more."),
    (None, "The river runs past the old mill and"),
    ("chat", "<|user|>what is your name?<|end|>\n<|assistant|>"),
    ("code", "def add(a, b):\n    return"),
    ("math", "Tara has 12 shells. Tara finds 9 more shells. How many shells does Tara have now?\n"),
    ("chat", "<|user|>hi<|end|>\n<|assistant|>"),
    (None, "Once upon a time"),
    ("code", "def read_config(path):\n"),
]
MAX_TOKENS = 20
TARA = GREEDY[4]  # greedy: 39 tokens, then EOS
GREEDY_PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch's thread pool spins against other jobs on a shared machine (a decode step: 8 ms, not 600)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root, source = tmp_path_factory.mktemp("engine"), family_dir()
    artifacts = {}
    for name in ("chat", "math", "code"):
        artifacts[name] = root / f"{name}.meswitch"
        compress(source / "base", source / name, artifacts[name], progress=False, settings=CompressionSettings(bits=2))
    return {"base": source / "base", "artifacts": artifacts, "root": root}


@pytest.fixture(scope="module")
def model(family):
    return MultiExpertModel(family["base"], family["artifacts"], kv_cache_bytes=8 << 20, block_size=16)


@pytest.fixture(scope="module")
def references(model):
    """Each GREEDY prompt's text from ``generate``, one request alone."""
    return [generate(model, expert, prompt, max_tokens=MAX_TOKENS) for expert, prompt in GREEDY]


def streamed(handle, consumed=()):
    """The handle's events (those ``consumed`` already, then the rest, all buffered by now), checked
    against its result: nothing lost or repeated."""
    result = handle.result(timeout=60)
    events = [*consumed, *handle.events(timeout=1)]
    assert "".join(event.text for event in events) == result.text
    assert [token for event in events for token in event.token_ids] == result.token_ids
    assert [event.finish_reason for event in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == result.finish_reason
    assert all(a.time <= b.time for a, b in itertools.pairwise(events))
    return result, events


def decoding(engine, seconds=60):
    """Wait until the engine has generated a few tokens."""
    deadline = time.monotonic() + seconds
    while sum(engine.stats()["tokens_generated_total"].values()) < 3:
        assert time.monotonic() < deadline, "the engine generated nothing"
        time.sleep(0.002)


def assert_idle(engine, model):
    stats = engine.stats()
    assert stats["waiting"] == stats["running"] == 0
    assert model.cache.free_blocks == model.cache.num_blocks == stats["kv_blocks_free"]


def test_greedy_batch_with_staggered_arrivals_equals_generate_alone(model, references):
    with Engine(model) as engine:
        early = [engine.submit(expert, prompt, GREEDY_PARAMS) for expert, prompt in GREEDY[:4]]
        decoding(engine)  # the first ones are
        late = [engine.submit(expert, prompt, GREEDY_PARAMS) for expert, prompt in GREEDY[4:]]
        results = [streamed(handle) for handle in early + late]
        assert [result.text for result, _ in results] == references
        assert results[-1][0].finish_reason == "stop" and results[-1][0].usage["completion_tokens"] == 1  # EOS
        assert results[0][0].finish_reason == "length" and len(results[0][0].token_ids) == MAX_TOKENS
        last_early = max(events[-1].time for _, events in results[:4])
        assert all(events[0].time < last_early for _, events in results[4:])  # in flight together
        stats = engine.stats()
        assert stats["requests_finished_total"] == len(GREEDY) and stats["preempted_total"] == 0
        math_tokens = [result.usage["completion_tokens"] for (result, _), (expert, _) in zip(results, GREEDY)
                       if expert == "math"]
        assert stats["tokens_generated_total"]["math"] == sum(math_tokens)
        assert_idle(engine, model)


def test_preempted_requests_are_recomputed_to_the_same_output(family, model, references):
    """Six blocks of 16 tokens for four requests of up to 43 tokens: some must be preempted. A request
    outgrowing the whole pool ends with "length"; prefills longer than max_batch_tokens are chunked."""
    small = MultiExpertModel(family["base"], family["artifacts"], kv_cache_bytes=6 * model.cache.block_bytes)
    chosen = [0, 2, 3, 4]
    with Engine(small) as engine:
        handles = [engine.submit(*GREEDY[i], GREEDY_PARAMS) for i in chosen]
        results = [streamed(handle)[0] for handle in handles]
        assert [result.text for result in results] == [references[i] for i in chosen]
        assert engine.stats()["preempted_total"] > 0
        assert_idle(engine, small)
        with pytest.raises(PromptTooLong, match=r"100 tokens need 7 KV blocks.*pool has 6"):
            engine.submit(None, list(range(5, 105)))
        long = engine.submit(*GREEDY[1], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        result, _ = streamed(long)
        assert result.finish_reason == "length" and len(result.token_ids) == 6 * 16 - 10 + 1  # 96 cached, 1 more
        assert result.text == generate(model, *GREEDY[1], max_tokens=len(result.token_ids), stop_at_eos=False)
        assert_idle(engine, small)
    with Engine(model, max_batch_tokens=7) as engine:  # the 23-token prompt takes four steps
        handles = [engine.submit(*GREEDY[i], GREEDY_PARAMS) for i in (4, 1)]
        assert [streamed(handle)[0].text for handle in handles] == [references[4], references[1]]
        assert_idle(engine, model)


def test_seeded_sampling_is_reproducible_whatever_the_batch(model, references):
    prompt = GREEDY[2]
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    with Engine(model) as engine:
        alone = engine.submit(*prompt, seeded).result(timeout=60)
        others = [engine.submit(*GREEDY[i], SamplingParams(max_tokens=12, temperature=1.2, top_p=0.9, seed=i))
                  for i in (0, 1, 3)]
        crowded = engine.submit(*prompt, seeded)
        other_seed = engine.submit(*prompt, SamplingParams(max_tokens=12, temperature=0.8, seed=4))
        top_1 = engine.submit(*prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=1, seed=5))
        assert crowded.result(timeout=60).token_ids == alone.token_ids
        assert other_seed.result(timeout=60).token_ids != alone.token_ids
        assert top_1.result(timeout=60).text == references[2]  # one token left: greedy
        assert all(handle.result(timeout=60).finish_reason in ("stop", "length") for handle in others)
        assert_idle(engine, model)
    # generate samples softmax(logits / T) with a generator seeded the same way: the same draws
    assert alone.text == generate(model, *prompt, max_tokens=12, temperature=0.8, seed=3)


def reference_probabilities(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """Top-k then top-p, one token at a time in float64."""
    scaled = logits.astype(np.float64) / temperature
    keep = np.ones(scaled.size, dtype=bool)
    if 0 < top_k < scaled.size:
        keep = scaled >= np.sort(scaled)[::-1][top_k - 1]
    probabilities = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probabilities /= probabilities.sum()
    kept, mass = np.zeros(scaled.size, dtype=bool), 0.0
    for token in np.argsort(-probabilities, kind="stable"):
        if mass >= top_p or probabilities[token] == 0:
            break
        kept[token], mass = True, mass + probabilities[token]
    probabilities = np.where(kept, probabilities, 0.0)
    return probabilities / probabilities.sum()


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 5), (0.5, 0.5, 10),
                                                       (2.0, 0.95, 40), (1.0, 0.2, 0), (1.0, 1.0, 1)])
def test_sampling_filters_match_a_reference(temperature, top_p, top_k):
    logits = torch.randn(64, generator=torch.Generator().manual_seed(11)) * 3
    ours = filtered_probabilities(logits, temperature, top_p, top_k).numpy()
    expected = reference_probabilities(logits.numpy(), temperature, top_p, top_k)
    np.testing.assert_allclose(ours, expected, atol=1e-6)  # float32 softmax vs float64
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=1)
    generator = params.generator()
    draws = np.bincount([sample(logits, params, generator) for _ in range(3000)], minlength=64) / 3000
    assert set(np.flatnonzero(draws)) <= set(np.flatnonzero(expected))
    assert np.abs(draws - expected).max() < 0.04  # 3000 draws: a few standard deviations of p(1-p)/n


def test_stop_strings_eos_and_max_tokens(model, references):
    expert, prompt = GREEDY[0]
    full = references[0]
    stop = full[len(full) // 2:len(full) // 2 + 4]
    with Engine(model) as engine:
        handles = {
            "stop": engine.submit(expert, prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                 stop=("never seen", stop))),
            "missed": engine.submit(expert, prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                   stop="never seen")),
            "eos": engine.submit(*TARA, SamplingParams(max_tokens=60, temperature=0)),
            "ignore_eos": engine.submit(*TARA, SamplingParams(max_tokens=45, temperature=0, ignore_eos=True)),
            "short": engine.submit(*TARA, SamplingParams(max_tokens=5, temperature=0)),
        }
        results = {name: streamed(handle)[0] for name, handle in handles.items()}
        assert_idle(engine, model)
    assert results["stop"].finish_reason == "stop" and results["stop"].text == full[:full.index(stop)]
    assert results["missed"].finish_reason == "length" and results["missed"].text == full
    eos = results["eos"]
    assert eos.finish_reason == "stop" and eos.text == generate(model, *TARA, max_tokens=60)
    assert eos.usage["completion_tokens"] == len(eos.token_ids) + 1 == 40  # the EOS is counted, not returned
    ignored = results["ignore_eos"]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 45 and ignored.token_ids[39] == 0
    assert ignored.token_ids[:39] == eos.token_ids
    assert results["short"].finish_reason == "length" and results["short"].token_ids == eos.token_ids[:5]
    assert results["short"].usage == {"prompt_tokens": 23, "completion_tokens": 5, "total_tokens": 28}


def test_text_streams_in_whole_characters_and_holds_back_stop_prefixes(family):
    tokenizer = load_tokenizer(str(family["artifacts"]["chat"] / "expert"))
    text = "café au lait, 日本語 😀 ok"
    tokens = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(token) for token in tokens] + [detokenizer.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    assert len(tokens) > len(text.encode()) / 2 and pieces.count("") >= 5  # multi-byte characters span tokens
    split = next(i for i, token in enumerate(tokens) if "\ufffd" in tokenizer.decode([token]))
    partial = IncrementalDetokenizer(tokenizer)
    assert [partial.push(token) for token in tokens[:split + 1]][-1] == ""
    assert partial.flush().endswith("\ufffd")  # the output ended inside a character

    stops = StopStrings(["world", "xyz"])
    assert stops.feed("hello wor") == ("hello ", False)  # "wor" could begin "world"
    assert stops.feed("d, x") == ("word, ", False)
    assert stops.feed("y") == ("", False) and stops.flush() == "xy"
    stops = StopStrings(["world"])
    assert stops.feed("a wo") == ("a ", False) and stops.feed("rld b") == ("", True)


def test_special_tokens_are_matched_by_stop_strings_but_never_shown():
    stops = StopStrings(["<|end|>"])
    assert stops.feed("Bye") == ("Bye", False)
    assert stops.feed("<|end|>", shown=False) == ("", True)
    stops = StopStrings(["Bye<|end|>", "zz"])
    assert stops.feed("ok Bye") == ("ok ", False)  # "Bye" could begin "Bye<|end|>"
    assert stops.feed("<|pad|>", shown=False) == ("Bye", False)  # no stop string: released, the token unshown
    assert stops.feed("Bye") == ("", False) and stops.feed("<|end|>", shown=False) == ("", True)
    stops = StopStrings(["<|end|>!"])
    assert stops.feed("a") == ("a", False) and stops.feed("<|end|>", shown=False) == ("", False)
    assert stops.flush() == ""  # held back but never shown


def test_a_tokenizer_used_by_many_threads_gives_the_ids_it_gives_alone(family):
    """Every call holds the tokenizer's lock. One thread truncating (through ``locked()``, as the
    rule says) while others encode: without the lock in ``encode`` its setting leaks into theirs."""
    from transformers import AutoTokenizer

    directory = family["artifacts"]["chat"] / "expert"
    shared = load_tokenizer(directory)
    assert load_tokenizer(str(directory)) is shared  # loaded once per directory
    texts = [f"line {i}: " + "the river runs past the old mill and on to the sea " * (40 + 7 * i) for i in range(12)]
    alone = [shared.encode(text) for text in texts]
    independent = AutoTokenizer.from_pretrained(directory)
    assert alone == [independent(text)["input_ids"] for text in texts]

    def truncating(index: int) -> list[int]:
        with shared.locked() as tokenizer:
            return tokenizer(texts[index], truncation=True, max_length=8)["input_ids"]

    def work(job: int) -> tuple[str, list[int] | str]:
        index = job % len(texts)
        if job % 4 == 0:
            return "truncated", truncating(index)
        if job % 4 == 1:
            return "decoded", shared.decode(alone[index])
        return "encoded", shared.encode(texts[index])

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(480)))
    for job, (kind, value) in enumerate(results):
        index = job % len(texts)
        if kind == "encoded":
            assert value == alone[index], f"job {job}: {len(value)} ids, alone {len(alone[index])}"
        elif kind == "decoded":
            assert value == independent.decode(alone[index], skip_special_tokens=True)
        else:
            assert value == alone[index][:8]

    hi = [{"role": "user", "content": "hi"}]
    calls = {"encode": (lambda: shared.encode("hello"), independent("hello")["input_ids"], shared.lock),
             "render_chat": (lambda: shared.render_chat(hi),
                             independent.apply_chat_template(hi, tokenize=False, add_generation_prompt=True),
                             shared.lock),
             "__call__": (lambda: shared("hello")["input_ids"], independent("hello")["input_ids"], shared.lock),
             "forwarded method": (lambda: shared.convert_ids_to_tokens([5, 4098]),
                                  independent.convert_ids_to_tokens([5, 4098]), shared.lock),
             "decode": (lambda: shared.decode([5, 4098, 6]), independent.decode([5, 4098, 6], skip_special_tokens=True),
                        shared.decode_lock)}
    with ThreadPoolExecutor(max_workers=1) as pool:
        for name, (call, expected, lock) in calls.items():  # each waits for its lock
            with lock:
                pending = pool.submit(call)
                time.sleep(0.1)
                assert not pending.done(), f"{name} did not wait for its lock"
            assert pending.result(timeout=10) == expected, name
        with shared.lock:  # an encode in progress: decoding (the engine thread's) goes on
            assert pool.submit(shared.decode, [5, 6]).result(timeout=10) == independent.decode([5, 6])


def test_tokenizers_are_read_once_each_and_one_at_a_time(family, tmp_path, monkeypatch):
    """Threads asking at once for directories not read yet: each directory is read once (every asker
    gets that tokenizer) and no two reads overlap (transformers' lazy imports are not thread-safe)."""
    import threading

    import transformers

    real_read = transformers.AutoTokenizer.from_pretrained
    guard, reading, most, reads = threading.Lock(), [0], [0], []

    def counted_read(directory, *args, **kwargs):
        with guard:
            reading[0] += 1
            most[0] = max(most[0], reading[0])
            reads.append(str(directory))
        try:
            time.sleep(0.05)  # a slow disk: overlapping reads would overlap here
            return real_read(directory, *args, **kwargs)
        finally:
            with guard:
                reading[0] -= 1

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counted_read)
    directories = [tmp_path / f"copy{i}" for i in range(4)]
    for directory in directories:
        shutil.copytree(family["artifacts"]["chat"] / "expert", directory)
    askers = directories * 4
    start = threading.Barrier(len(askers))

    def ask(directory):
        start.wait()
        return load_tokenizer(directory)

    with ThreadPoolExecutor(max_workers=len(askers)) as pool:
        got = list(pool.map(ask, askers))
    assert sorted(reads) == sorted(map(str, directories)) and most[0] == 1
    for directory, tokenizer in zip(askers, got):
        assert tokenizer is load_tokenizer(directory) and tokenizer.directory == directory


def test_stop_tokens_are_eos_the_generation_configs_and_the_templates_end_of_turn(family, tmp_path):
    from transformers import AutoTokenizer

    chat = family["artifacts"]["chat"] / "expert"
    independent = AutoTokenizer.from_pretrained(chat)
    end_of_turn = independent.convert_tokens_to_ids("<|end|>")
    assert end_of_turn != independent.unk_token_id and end_of_turn != independent.eos_token_id
    assert load_tokenizer(chat).stop_token_ids == {independent.eos_token_id, end_of_turn}
    assert load_tokenizer(family["base"]).stop_token_ids == {independent.eos_token_id}  # no chat template

    listed = tmp_path / "listed"
    shutil.copytree(chat, listed)
    (listed / "chat_template.jinja").unlink()
    (listed / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7, 4097]}))
    tokenizer = load_tokenizer(listed)
    assert not tokenizer.has_chat_template and tokenizer.stop_token_ids == {0, 7, 4097}

    broken = tmp_path / "broken"
    shutil.copytree(listed, broken)
    (broken / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|end|>"}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be a token id or a list"):
        load_tokenizer(broken)


def test_a_chat_turn_ends_at_its_end_of_turn_token(family, model):
    from transformers import AutoTokenizer

    end_of_turn = AutoTokenizer.from_pretrained(family["artifacts"]["chat"] / "expert").convert_tokens_to_ids("<|end|>")
    prompt = "<|user|>do you like hiking in the mountains?<|end|>\n<|assistant|>"
    with Engine(model) as engine:
        turn, on, stopped = (engine.submit("chat", prompt, SamplingParams(max_tokens=120, temperature=0, **extra))
                             for extra in ({}, {"ignore_eos": True}, {"ignore_eos": True, "stop": "<|end|>"}))
        turn, on, stopped = turn.result(timeout=60), on.result(timeout=60), stopped.result(timeout=60)
        assert_idle(engine, model)
    assert on.finish_reason == "length" and end_of_turn in on.token_ids  # the expert does end its turn ...
    cut = on.token_ids.index(end_of_turn)
    assert on.text.startswith(turn.text) and len(on.text) > len(turn.text)  # ... and goes on past it, if let
    assert turn.finish_reason == "stop" and turn.token_ids == on.token_ids[:cut] and turn.text.strip()
    assert turn.usage["completion_tokens"] == cut + 1  # the end of turn is counted, not returned
    # a stop string naming the special token ends at it as well; the token's text is never shown
    assert stopped.finish_reason == "stop" and stopped.text == turn.text
    assert stopped.token_ids == on.token_ids[:cut + 1]


def test_cancel_and_close_free_everything(model):
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    with Engine(model, max_running=1) as engine:
        running = engine.submit(None, "Once upon a time", long)
        queued = engine.submit("math", "What is 7 plus 5?\n", long)
        next(running.events(timeout=30))
        assert engine.stats()["kv_blocks_free"] < model.cache.num_blocks and engine.stats()["waiting"] == 1
        queued.cancel()
        running.cancel()
        running.cancel()  # idempotent
        assert running.result(timeout=30).finish_reason == "cancelled"
        assert 0 < running.result().usage["completion_tokens"] < 400
        assert queued.result(timeout=30).finish_reason == "cancelled" and queued.result().token_ids == []
        assert_idle(engine, model)
        aborted = engine.submit("chat", "<|user|>hi<|end|>\n<|assistant|>", long)
        next(aborted.events(timeout=30))
        engine.close()
        assert aborted.result(timeout=1).finish_reason == "abort"
        assert not engine._thread.is_alive()
        with pytest.raises(EngineError, match="closed"):
            engine.submit(None, "more")
    assert model.cache.free_blocks == model.cache.num_blocks


def expert_sizes(family) -> dict[str, int]:
    probe = ExpertStore(family["base"], host_budget=1 << 30)
    for artifact in family["artifacts"].values():
        probe.add(artifact)
    return {expert["name"]: expert["bytes"] for expert in probe.memory_report()["experts"]}


def test_an_expert_waits_for_room_while_others_run(family, model):
    """Room for one expert: chat loads once math's last request ends; the base runs meanwhile."""
    store = ExpertStore(family["base"], host_budget=max(expert_sizes(family).values()))
    for name in ("math", "chat"):
        store.add(family["artifacts"][name])
    stored = MultiExpertModel(family["base"], store, kv_cache_bytes=4 << 20)
    math_prompt, chat_prompt = GREEDY[0][1], GREEDY[5][1]
    with Engine(stored) as engine:
        first = engine.submit("math", math_prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        consumed = [next(first.events(timeout=60))]  # math is resident and held
        chat = engine.submit("chat", chat_prompt, GREEDY_PARAMS)
        base = engine.submit(None, "Once upon a time", GREEDY_PARAMS)
        math_result, math_events = streamed(first, consumed)
        (chat_result, chat_events), (_, base_events) = streamed(chat), streamed(base)
        assert_idle(engine, stored)
    assert math_result.text == generate(model, "math", math_prompt, max_tokens=30, stop_at_eos=False)
    assert chat_result.text == generate(model, "chat", chat_prompt, max_tokens=MAX_TOKENS)
    assert chat_events[0].time > math_events[-1].time  # chat waited for math's hold to end
    assert base_events[0].time < math_events[-1].time  # the base did not
    report = store.memory_report()
    assert report["evictions"] >= 1 and all(expert["holders"] == 0 for expert in report["experts"])


def test_the_store_counts_every_request_claim_and_every_running_hold(family):
    """Claims from submit to the end (a cancel ends its claim at once), one hold per running
    request; the store refuses to remove a claimed expert and counts nothing once all ended."""
    store = ExpertStore(family["base"], host_budget=1 << 30)
    store.add(family["artifacts"]["math"])
    stored = MultiExpertModel(family["base"], store, kv_cache_bytes=4 << 20)

    def math() -> dict:
        return next(expert for expert in store.memory_report()["experts"] if expert["name"] == "math")

    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    engine = Engine(stored)  # not started: the requests wait
    first, second = (engine.submit("math", GREEDY[0][1], long) for _ in range(2))
    assert math()["claims"] == 2 and math()["holders"] == 0 and store.tier("math") == "disk"
    with pytest.raises(RuntimeError, match="2 request\\(s\\) use it"):
        store.remove("math", drain=5.0)  # refused at once: requests may run for minutes
    second.cancel()
    assert math()["claims"] == 1  # before the loop has seen the cancel
    with engine:
        next(first.events(timeout=60))  # running: holds math
        assert math()["claims"] == 1 and math()["holders"] >= 1
        third = engine.submit("math", GREEDY[0][1], long)
        next(third.events(timeout=60))
        report = math()
        assert report["claims"] == 2 and report["holders"] >= 2  # one hold per running request
        first.cancel()
        third.cancel()
        assert first.result(timeout=30).finish_reason == third.result(timeout=30).finish_reason == "cancelled"
        assert_idle(engine, stored)
        assert math()["claims"] == 0 and math()["holders"] == 0
        store.remove("math", drain=5.0)
        with pytest.raises(ExpertUnavailable):
            engine.submit("math", GREEDY[0][1], long)
    assert second.result(timeout=1).finish_reason == "cancelled"


def test_a_failing_expert_ends_only_its_own_requests(family, model):
    broken = family["root"] / "broken.meswitch"
    shutil.copytree(family["artifacts"]["code"], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "name": "broken"}))
    store = ExpertStore(family["base"], host_budget=1 << 30)
    store.add(family["artifacts"]["math"])
    store.add(broken)  # checksums are verified when loading
    shard = max(broken.glob("deltas-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    stored = MultiExpertModel(family["base"], store, kv_cache_bytes=4 << 20)
    engine = Engine(stored)  # requests queue before the loop starts
    bad = [engine.submit("broken", "def add(a, b):\n    return", GREEDY_PARAMS) for _ in range(2)]
    good = engine.submit(*GREEDY[0], GREEDY_PARAMS)
    out_of_vocab = engine.submit("math", [5, 4500, 7])  # math not loaded yet: checked at admission
    with engine:
        for handle in bad:
            result, _ = streamed(handle)
            assert result.finish_reason == "error" and result.token_ids == []
            assert re.search(f"expert 'broken' failed to load: .*{shard.name}.*does not match the manifest",
                             result.error)
        assert good.result(timeout=60).text == generate(model, *GREEDY[0], max_tokens=MAX_TOKENS)
        assert out_of_vocab.result(timeout=60).finish_reason == "error"
        assert "token id 4500 is outside the vocabulary of 'math' (4096 tokens)" in out_of_vocab.result().error
        with pytest.raises(ValueError, match="token id 4500"):  # math's vocabulary is known now
            engine.submit("math", [5, 4500, 7])
        assert_idle(engine, stored)

    small = ExpertStore(family["base"], host_budget=4096)
    small.add(family["artifacts"]["math"])
    with Engine(MultiExpertModel(family["base"], small, kv_cache_bytes=1 << 20)) as engine:
        result = engine.submit("math", "Sam has", GREEDY_PARAMS).result(timeout=60)
        base = engine.submit(None, "Sam has", GREEDY_PARAMS).result(timeout=60)
    assert result.finish_reason == "error" and "more than the host tier's whole budget of 4096 bytes" in result.error
    assert base.finish_reason != "error" and base.text == generate(model, None, "Sam has", max_tokens=MAX_TOKENS)


class FaultyModel(MultiExpertModel):
    """The multi-expert model, failing any forward that holds ``POISON``: after the cache is reserved
    (the embedding comes after), so the failed forward leaves every sequence's cache half written."""

    POISON = 4095

    def _embed(self, tokens, groups):
        if bool((tokens == self.POISON).any()):
            raise RuntimeError("the poisoned token")
        return super()._embed(tokens, groups)


def test_a_failing_forward_ends_only_the_sequence_that_causes_it(family, references):
    faulty = FaultyModel(family["base"], family["artifacts"], kv_cache_bytes=4 << 20)
    with Engine(faulty) as engine:
        good = [engine.submit(*GREEDY[i], GREEDY_PARAMS) for i in (0, 1, 2)]
        decoding(engine)  # when the poison comes
        poisoned = engine.submit(None, [5, 6, FaultyModel.POISON, 7], GREEDY_PARAMS)
        assert poisoned.result(timeout=60).finish_reason == "error"
        assert poisoned.result().error == "the poisoned token"
        assert [handle.result(timeout=60).text for handle in good] == references[:3]
        assert_idle(engine, faulty)


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("max_tokens", 2.0), ("temperature", -0.5),
                                          ("temperature", math.nan), ("top_p", 0), ("top_p", 1.5), ("top_k", -1),
                                          ("seed", "7"), ("stop", ("a", "b", "c", "d", "e")), ("stop", ("",)),
                                          ("ignore_eos", "yes")])
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**{field: value})


def test_bad_requests_are_refused_at_submit(family, model, tmp_path):
    with Engine(model) as engine:
        with pytest.raises(PromptTooLong, match=r"500 tokens plus max_tokens 16 exceed the model's 512 positions"):
            engine.submit(None, list(range(5, 505)), SamplingParams(max_tokens=16))
        with pytest.raises(ExpertUnavailable, match="unknown expert 'poetry'; known experts: chat, code, math") as e:
            engine.submit("poetry", "a rose")
        assert isinstance(e.value, KeyError)
        with pytest.raises(ValueError, match="prompt: empty"):
            engine.submit(None, [])
        with pytest.raises(ValueError, match="token id 4096 is outside the vocabulary of the base"):
            engine.submit(None, [5, 4096])
        with pytest.raises(TypeError, match="must be a SamplingParams"):
            engine.submit(None, "hi", {"max_tokens": 3})
        assert engine.stats()["waiting"] == 0 and engine.stats()["prompt_tokens_total"] == {}
    with pytest.raises(ValueError, match="max_running: must be an integer >= 1"):
        Engine(model, max_running=0)
    (tmp_path / "expert").mkdir()
    engine = Engine(MultiExpertModel(family["base"], {"ghost": tmp_path}, kv_cache_bytes=1 << 20))
    with pytest.raises(EngineError, match=f"'ghost': no tokenizer can be read from {tmp_path / 'expert'}"):
        engine.submit("ghost", [5, 6])
    engine.close()


def test_events_from_asyncio(model, references):
    async def consume(handle):
        return [event async for event in handle.aevents()]

    async def main(engine):
        handles = [engine.submit(expert, prompt, GREEDY_PARAMS) for expert, prompt in GREEDY[:3]]
        return handles, await asyncio.gather(*(consume(handle) for handle in handles))

    with Engine(model) as engine:
        handles, streams = asyncio.run(main(engine))
        for handle, events, expected in zip(handles, streams, references):
            assert "".join(event.text for event in events) == handle.result(timeout=1).text == expected
            assert events[-1].finish_reason == "length" and events[-1].completion_tokens == MAX_TOKENS
        assert_idle(engine, model)
