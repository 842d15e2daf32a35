"""The expert store through Python, on compressed experts of the bundled tiny family."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import meswitch
import numpy as np
import pytest
from meswitch import ops
from meswitch.artifact import ExpertArtifact
from meswitch.compress import CompressionSettings, compress
from meswitch.serve.server.metrics import ServerMetrics
from meswitch.store import ExpertStore
from prometheus_client.parser import text_string_to_metric_families

FAMILY = Path(meswitch.__file__).parent / "family" / "tiny"
BASE = FAMILY / "base"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """math and code compressed once, plus copies of math renamed (same bytes, other names)."""
    root = tmp_path_factory.mktemp("store")
    out = {}
    for name in ("math", "code"):
        out[name] = root / f"{name}.meswitch"
        compress(BASE, FAMILY / name, out[name], settings=CompressionSettings(bits=2, group_size=32, salient=0.01),
                 progress=False)
    for copy in ("math2", "math3"):
        out[copy] = renamed(out["math"], root / f"{copy}.meswitch", copy)
    return out


def renamed(artifact: Path, target: Path, name: str) -> Path:
    """A copy of ``artifact`` under another expert name (the manifest is not checksummed)."""
    shutil.copytree(artifact, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["name"] = name
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def host(report: dict) -> dict:
    return report["tiers"]["host"]


def tier_of(report: dict, name: str) -> str:
    return next(expert["tier"] for expert in report["experts"] if expert["name"] == name)


def assert_accounting(report: dict) -> None:
    used = sum(expert["bytes"] for expert in report["experts"] if expert["tier"] != "disk")
    assert host(report)["used_bytes"] == used <= host(report)["budget_bytes"]


def a_delta_weight(artifact: ExpertArtifact) -> str:
    return next(name for name, entry in artifact.tensors.items() if entry["kind"] == "delta")


def test_acquire_gives_the_artifact_the_kernels_take(artifacts):
    store = ExpertStore(BASE, host_budget="1GB")
    assert store.add(artifacts["math"]) == "math"
    assert store.names() == ["math"] and "math" in store and len(store) == 1
    reference = ExpertArtifact(artifacts["math"])
    weight = a_delta_weight(reference)
    cols = reference.tensors[weight]["cols"]
    x = np.random.default_rng(0).standard_normal((3, cols)).astype(np.float32)
    with store.acquire("math") as artifact:
        assert artifact.name == "math" and artifact.path == artifacts["math"]
        got = ops.multi_delta_matmul(x, [(artifact, weight)], [0, 3])
        assert tier_of(store.memory_report(), "math") == "host"
        assert store.memory_report()["experts"][0]["holders"] == 1
    np.testing.assert_array_equal(got, ops.delta_matmul(x, (reference, weight)))
    report = store.memory_report()
    assert report["experts"][0]["holders"] == 0
    assert (report["hits"], report["misses"], report["loads"]) == (0, 1, 1)
    assert report["load_seconds"] > 0
    with store.acquire("math"):
        pass
    assert store.memory_report()["hits"] == 1


def test_budget_evicts_the_least_recently_used_and_reports_every_field(artifacts):
    probe = ExpertStore(BASE, host_budget=1 << 30)
    for name in ("math", "code", "math2"):
        probe.add(artifacts[name])
    sizes = {expert["name"]: expert["bytes"] for expert in probe.memory_report()["experts"]}
    budget = sizes["math"] + sizes["code"] + sizes["math2"] - 1  # all three never fit
    store = ExpertStore(BASE, host_budget=budget)
    for name in ("math", "code", "math2"):
        store.add(artifacts[name])
    for name in ("math", "code", "math", "math2"):  # code is the least recently used at the end
        with store.acquire(name):
            assert_accounting(store.memory_report())
    report = store.memory_report()
    assert set(report) == {"tiers", "experts", "hits", "misses", "evictions", "loads", "verified_loads",
                           "load_failures", "prefetches_skipped", "recycled_buffers", "load_seconds"}
    assert set(report["tiers"]) == {"disk", "host"}
    assert set(host(report)) == {"used_bytes", "budget_bytes", "entries", "loading"}
    assert set(report["experts"][0]) == {"name", "directory", "tier", "bytes", "holders", "claims", "pinned", "loads",
                                         "load_seconds", "waited_acquires", "wait_seconds"}
    assert tier_of(report, "code") == "disk" and tier_of(report, "math") == tier_of(report, "math2") == "host"
    assert report["evictions"] == 1 and report["hits"] == 1 and report["misses"] == 3
    assert host(report)["budget_bytes"] == budget and host(report)["entries"] == 2
    assert report["tiers"]["disk"]["used_bytes"] == sum(sizes.values())
    assert_accounting(report)

    # Everything resident held or pinned: the next load is refused, never over budget.
    store.pin("math")
    with store.acquire("math2"), pytest.raises(RuntimeError, match=r"cannot load expert 'code'.*math \(\d+ bytes, pinned\)"):
        store.acquire("code")
    assert_accounting(store.memory_report())
    store.unpin("math")
    with store.acquire("code"):
        pass
    assert tier_of(store.memory_report(), "math") == "disk"  # unpinned and least recently used


def test_hot_add_and_remove_and_the_held_rule(artifacts):
    store = ExpertStore(BASE, host_budget="64MB")
    store.add(artifacts["math"])
    held = store.acquire("math")
    store.add(artifacts["code"])  # while math is held
    with pytest.raises(RuntimeError, match="cannot remove expert 'math': 1 handle"):
        store.remove("math")
    with pytest.raises(RuntimeError, match="already has an expert named 'math'"):
        store.add(artifacts["math"])
    held.release()
    held.release()  # idempotent
    store.remove("math")
    assert store.names() == ["code"] and host(store.memory_report())["used_bytes"] == 0
    with pytest.raises(RuntimeError, match="no expert named 'math'.*it has: code"):
        store.acquire("math")
    store.add(artifacts["math"])
    with store.acquire("math") as artifact:
        assert artifact.manifest["name"] == "math"


def test_prefetch_loads_in_the_background_and_threads_share_the_store(artifacts):
    store = ExpertStore(BASE, host_budget="64MB")
    for name in ("math", "code", "math2", "math3"):
        store.add(artifacts[name])
    store.prefetch("code")
    store.wait("code")
    assert tier_of(store.memory_report(), "code") == "host"

    errors = []

    def churn(names: list[str]) -> None:
        try:
            for name in names * 5:
                with store.acquire(name) as artifact:
                    assert artifact.name == name
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=churn, args=(names,))
               for names in (["math", "code"], ["math2", "math3"], ["code", "math3"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert_accounting(store.memory_report())


def test_a_bad_artifact_or_a_wrong_base_is_one_clear_error(artifacts, tmp_path):
    with pytest.raises(meswitch.FormatError, match=r"different base model.*tensor '[^']+' differs"):
        ExpertStore(FAMILY / "chat", host_budget="1GB").add(artifacts["math"])
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ExpertStore(BASE).add(tmp_path)

    broken = renamed(artifacts["code"], tmp_path / "broken.meswitch", "broken")
    shard = max(broken.glob("deltas-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    store = ExpertStore(BASE, host_budget="64MB")
    store.add(broken)  # checksums are verified when loading
    store.prefetch("broken")
    with pytest.raises(meswitch.FormatError, match=f"{shard.name}.*does not match the manifest"):
        store.acquire("broken")
    with pytest.raises(meswitch.FormatError, match="does not match the manifest"):
        store.acquire("broken")  # loads again, fails again
    report = store.memory_report()
    assert report["load_failures"] == 2 and host(report)["used_bytes"] == 0

    store.add(artifacts["math"])
    small = ExpertStore(BASE, host_budget=4096)
    small.add(artifacts["math"])
    with pytest.raises(RuntimeError, match=r"expert 'math' needs \d+ bytes of host memory, more than .* 4096 bytes"):
        small.acquire("math")
    with pytest.raises(ValueError, match="not a size"):
        ExpertStore(BASE, host_budget="8 lightyears")
    with pytest.raises(ValueError, match="positive"):
        ExpertStore(BASE, host_budget=0)


def test_the_multi_expert_model_takes_its_experts_from_the_store(artifacts):
    """Held for each forward and let go after; the logits are those of the same artifacts given directly."""
    from meswitch.serve import MultiExpertModel, SequenceInput

    store = ExpertStore(BASE, host_budget=64 << 20)
    for name in ("math", "code"):
        store.add(artifacts[name])
    direct = MultiExpertModel(BASE, {name: artifacts[name] for name in ("math", "code")}, kv_cache_bytes=4 << 20)
    stored = MultiExpertModel(BASE, store, kv_cache_bytes=4 << 20)
    batch = [SequenceInput("a", "math", [1, 17, 300, 42]), SequenceInput("b", "code", [1, 5, 9]),
             SequenceInput("c", None, [1, 2])]
    for expected, got in zip(direct.forward(batch), stored.forward(batch)):
        np.testing.assert_array_equal(expected.numpy(), got.numpy())
    report = store.memory_report()
    assert all(expert["holders"] == 0 for expert in report["experts"])
    assert report["misses"] == 2 and report["hits"] == 0  # one hold per expert per forward: the lease
    decode = [SequenceInput("a", "math", [7]), SequenceInput("b", "code", [8])]
    stored.forward(decode)
    report = store.memory_report()
    assert report["hits"] == 2 and report["misses"] == 2  # a second forward: one hit per expert, nothing else
    assert all(expert["holders"] == 0 for expert in report["experts"])


def test_a_reload_parses_nothing_again_and_a_changed_shard_is_verified_again(artifacts, tmp_path):
    """Evicted and loaded again: the same record and manifest, recycled pages; files changed meanwhile: checked anew."""
    mine = renamed(artifacts["math"], tmp_path / "mine.meswitch", "mine")
    sizes = ExpertStore(BASE, host_budget="1GB")
    sizes.add(mine)
    sizes.add(artifacts["code"])
    budget = max(expert["bytes"] for expert in sizes.memory_report()["experts"])
    store = ExpertStore(BASE, host_budget=budget)  # one at a time
    store.add(mine)
    store.add(artifacts["code"])
    weight = a_delta_weight(ExpertArtifact(mine))
    cols = ExpertArtifact(mine).tensors[weight]["cols"]
    x = np.random.default_rng(1).standard_normal((2, cols)).astype(np.float32)
    with store.acquire("mine") as artifact:
        first_manifest, first_serial = artifact.manifest, artifact.record_serial
        expected = ops.delta_matmul(x, (artifact, weight))
    del artifact  # a Python reference would keep its pages from being recycled
    with store.acquire("code"):
        assert store.tier("mine") == "disk"
    with store.acquire("mine") as artifact:
        assert artifact.manifest is first_manifest and artifact.record_serial == first_serial
        np.testing.assert_array_equal(ops.delta_matmul(x, (artifact, weight)), expected)
    report = store.memory_report()
    assert (report["loads"], report["verified_loads"]) == (3, 2)
    assert report["recycled_buffers"] == 2  # code into mine's pages, mine into code's

    # Evicted, then one byte of a shard altered in place: the reload hashes and refuses it.
    with store.acquire("code"):
        pass
    shard = max(mine.glob("deltas-*.safetensors"))
    original = shard.read_bytes()
    altered = bytearray(original)
    altered[-3] ^= 0x10
    shard.write_bytes(bytes(altered))
    with pytest.raises(meswitch.FormatError, match=f"{shard.name}.*does not match the manifest"):
        store.acquire("mine")
    shard.write_bytes(original)  # repaired: verified again, a new record
    with store.acquire("mine") as artifact:
        assert artifact.record_serial != first_serial
        np.testing.assert_array_equal(ops.delta_matmul(x, (artifact, weight)), expected)
    report = store.memory_report()
    assert (report["verified_loads"], report["load_failures"]) == (3, 1)
    assert_accounting(report)


def test_tier_is_where_one_expert_is(artifacts):
    store = ExpertStore(BASE, host_budget="64MB")
    store.add(artifacts["math"])
    assert store.tier("math") == "disk"
    with store.acquire("math"):
        assert store.tier("math") == "host" == tier_of(store.memory_report(), "math")
    store.remove("math")
    with pytest.raises(RuntimeError, match="no expert named 'math'"):
        store.tier("math")


def test_the_model_switching_experts_through_a_small_store_keeps_none_alive(artifacts):
    """One expert fits: each forward evicts the other, whose pages the next load refills (the
    model keeps no reference to an evicted expert), and the logits stay those of direct artifacts."""
    from meswitch.serve import MultiExpertModel, SequenceInput

    sizes = ExpertStore(BASE, host_budget="1GB")
    for name in ("math", "code"):
        sizes.add(artifacts[name])
    store = ExpertStore(BASE, host_budget=max(e["bytes"] for e in sizes.memory_report()["experts"]))
    for name in ("math", "code"):
        store.add(artifacts[name])
    direct = MultiExpertModel(BASE, {name: artifacts[name] for name in ("math", "code")}, kv_cache_bytes=4 << 20)
    stored = MultiExpertModel(BASE, store, kv_cache_bytes=4 << 20)
    for step, expert in enumerate(("math", "code", "math", "code")):
        batch = [SequenceInput(step, expert, [1, 17, 300 + step])]
        np.testing.assert_array_equal(direct.forward(batch)[0].numpy(), stored.forward(batch)[0].numpy())
        assert store.tier(expert) == "host" and store.tier({"math": "code", "code": "math"}[expert]) == "disk"
    report = store.memory_report()
    assert (report["loads"], report["verified_loads"]) == (4, 2)  # later loads read the bytes only
    assert report["recycled_buffers"] == 3  # every load after the first refilled the evicted one's pages


def test_metrics_export_each_experts_residency_loads_and_waits(artifacts):
    """/metrics' per-expert series, read from a real store: exact counts after a known sequence."""
    probe = ExpertStore(BASE, host_budget=1 << 30)
    probe.add(artifacts["math"])
    size = probe.memory_report()["experts"][0]["bytes"]
    store = ExpertStore(BASE, host_budget=size + size // 2)  # room for one of the two
    for name in ("math", "math2"):
        store.add(artifacts[name])
    engine_stats = {"waiting": 0, "running": 0, "preempted_total": 0, "kv_blocks_total": 1, "kv_blocks_free": 1}
    metrics = ServerMetrics(lambda: engine_stats, store.memory_report)

    def samples() -> dict[tuple, float]:
        text = metrics.exposition().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples
                if s.name.startswith("meswitch_expert_")}

    before = samples()
    assert before[("meswitch_expert_resident", (("expert", "math"), ("tier", "host")))] == 0
    with store.acquire("math"):  # loads math
        during = samples()
        assert during[("meswitch_expert_holders", (("expert", "math"),))] == 1
    with store.acquire("math"):  # a hit: no wait
        pass
    with store.acquire("math2"):  # evicts math
        pass
    after = samples()
    assert during[("meswitch_expert_resident", (("expert", "math"), ("tier", "host")))] == 1
    assert after[("meswitch_expert_resident", (("expert", "math"), ("tier", "host")))] == 0
    assert after[("meswitch_expert_resident", (("expert", "math2"), ("tier", "host")))] == 1
    assert after[("meswitch_expert_holders", (("expert", "math"),))] == 0
    assert after[("meswitch_expert_loads_total", (("expert", "math"),))] == 1
    assert after[("meswitch_expert_loads_total", (("expert", "math2"),))] == 1
    assert after[("meswitch_expert_lease_waits_total", (("expert", "math"),))] == 1
    assert after[("meswitch_expert_lease_wait_seconds_total", (("expert", "math"),))] >= \
        after[("meswitch_expert_load_seconds_total", (("expert", "math"),))] > 0


def test_a_batch_lease_holds_all_of_a_batch_or_none(artifacts):
    probe = ExpertStore(BASE, host_budget=1 << 30)
    probe.add(artifacts["math"])
    size = probe.memory_report()["experts"][0]["bytes"]
    store = ExpertStore(BASE, host_budget=2 * size + size // 2)  # room for two
    for name in ("math", "math2", "math3"):
        store.add(artifacts[name])

    def holders() -> dict[str, int]:
        return {e["name"]: e["holders"] for e in store.memory_report()["experts"]}

    with store.acquire_batch(["math2", "math", "math2"]) as lease:
        assert lease.names() == ["math", "math2"]
        assert holders() == {"math": 1, "math2": 1, "math3": 0}
        weight = a_delta_weight(lease["math"])
        x = np.random.default_rng(0).standard_normal((3, lease["math"].tensors[weight]["shape"][1])).astype(np.float32)
        out = ops.multi_delta_matmul(x, [(lease["math"], weight)], [0, 3])
        with store.acquire("math") as artifact:  # the same bytes as a single acquire sees
            assert np.array_equal(out, ops.multi_delta_matmul(x, [(artifact, weight)], [0, 3]))
        with pytest.raises(KeyError, match="holds no expert named 'code'"):
            lease["code"]
        with pytest.raises(meswitch.TierFull, match="cannot load expert 'math3'"):
            store.acquire_batch(["math3"])  # both resident ones held: no room now, may fit later
    assert holders() == {"math": 0, "math2": 0, "math3": 0}
    with store.acquire("math"), pytest.raises(meswitch.TierFull, match="cannot load expert 'math3'"):
        store.acquire_batch(["math2", "math3"])  # math2 fits beside math, math3 then cannot
    assert holders() == {"math": 0, "math2": 0, "math3": 0}  # the failed batch let math2 go


def test_remove_drains_a_held_expert(artifacts):
    store = ExpertStore(BASE, host_budget=1 << 30)
    for name in ("math", "code"):
        store.add(artifacts[name])
    held = store.acquire("math")
    with pytest.raises(RuntimeError, match=r"1 handle\(s\) hold it .*after waiting 50 ms"):
        store.remove("math", drain=0.05)
    with store.acquire("math"):  # served again after the refusal
        pass
    with pytest.raises(RuntimeError, match="hold it"):
        store.remove("math")  # no time to wait: refused at once

    removed = threading.Event()
    remover = threading.Thread(target=lambda: (store.remove("math", drain=30), removed.set()))
    remover.start()
    refusal = None
    for _ in range(2000):  # until the removal is draining
        try:
            store.acquire("math").release()
        except RuntimeError as error:
            refusal = str(error)
            break
        threading.Event().wait(0.005)
    assert refusal is not None and "is being removed" in refusal
    with store.acquire("code"):  # other experts are served meanwhile
        pass
    assert not removed.is_set()
    held.release()
    remover.join(timeout=30)
    assert removed.is_set() and store.names() == ["code"]
    with pytest.raises(ValueError, match="drain must be >= 0"):
        store.remove("code", drain=-1)


def test_a_lease_hands_out_each_experts_tensors_and_the_embedding_lookup_rule(artifacts, tmp_path):
    """What a lease hands out (``_core.ExpertTensors``) against the stored tensors read with the
    ``safetensors`` package and NumPy: whole tensors, extra rows (the chat expert's expanded
    vocabulary), rows, and an embedding lookup = base row + dequantized delta row (float32,
    to 1e-6 relative), or the expert's own extra row; an id past its rows is refused."""
    import torch
    from safetensors.numpy import load_file

    chat = tmp_path / "chat.meswitch"
    compress(BASE, FAMILY / "chat", chat, settings=CompressionSettings(bits=2, group_size=32, salient=0.01),
             progress=False)
    base_table = next(t for f in sorted(BASE.glob("*.safetensors")) for n, t in load_file(f).items()
                      if n == "model.embed_tokens.weight").astype(np.float32)
    store = ExpertStore(BASE, host_budget="1GB")
    for path in (artifacts["math"], chat):
        store.add(path)
    with store.acquire_batch(["math", "chat"]) as lease:
        for name in ("math", "chat"):
            tensors, artifact = lease.tensors(name), lease[name]
            assert tensors.name == name
            kinds = {kind: sorted(w for w, e in artifact.tensors.items() if e["kind"] == kind) for kind in ("full", "delta")}
            assert sorted(tensors.whole_names()) == kinds["full"] and kinds["full"]
            assert sorted(tensors.delta_names()) == kinds["delta"]
            for weight in kinds["full"]:
                np.testing.assert_array_equal(tensors.whole(weight),
                                              np.asarray(artifact.stored(f"{weight}.full"), dtype=np.float32))
            embedding = "model.embed_tokens.weight"
            extra = tensors.extra_rows(embedding)
            vocab = base_table.shape[0] + (0 if extra is None else extra.shape[0])
            assert tensors.rows(embedding, base_table.shape[0]) == vocab
            ids = np.array([0, 5, base_table.shape[0] - 1, *range(base_table.shape[0], vocab), 5], dtype=np.int64)
            own = ids < base_table.shape[0]
            if extra is not None:
                np.testing.assert_array_equal(extra, np.asarray(artifact.stored(f"{embedding}.extra_rows"),
                                                                dtype=np.float32))
            bf16 = torch.from_numpy(base_table).to(torch.bfloat16)  # a 16-bit table is widened
            for table, values in ((base_table, base_table), (bf16, bf16.float().numpy())):
                expected = np.empty((len(ids), base_table.shape[1]), dtype=np.float32)
                expected[own] = values[ids[own]] + ops.delta_rows((artifact, embedding), ids[own])
                if extra is not None:
                    expected[~own] = extra[ids[~own] - base_table.shape[0]]
                np.testing.assert_allclose(tensors.lookup(embedding, table, ids), expected, rtol=1e-6, atol=1e-7)
            gathered = base_table[np.minimum(ids, base_table.shape[0] - 1)]
            np.testing.assert_array_equal(
                tensors.lookup_gathered(embedding, base_table.shape[0], gathered, ids),
                tensors.lookup(embedding, base_table, ids))
            with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary of {name} "
                                                 f"\\({vocab} tokens\\)"):
                tensors.lookup(embedding, base_table, np.array([1, vocab], dtype=np.int64))
        assert lease.tensors("chat").extra_rows("model.embed_tokens.weight").shape[0] == 3
        with pytest.raises(KeyError, match="holds no expert named 'code'"):
            lease.tensors("code")
