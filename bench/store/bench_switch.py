"""Expert switch time of the store (disk -> host) against a plain read of the same bytes.

What is timed, in one process and run:

* ``reload``: ``ExpertStore.acquire(name)`` of an expert that was loaded before and then
  evicted (the budget holds one expert, and the experts are acquired in turn, so every
  acquire evicts the other and loads this one), until the returned handle is usable, then
  its release. Its files are unchanged, so the store reads the shards and checks nothing
  again (``include/meswitch/store.hpp``).
* ``first load``: the same for an expert the store has just been given (``remove`` then
  ``add``, untimed): everything is checked and every shard and side file hashed.
* ``plain read``: the same expert's shard files read into new NumPy arrays
  (``np.fromfile``, one per file): the bytes a load must bring into memory, and nothing else.
  The ratios are against it. Beside it, ``read into``: the same files read (``os.preadv``)
  into arrays allocated once beforehand, so no page is made during the read: the floor of
  any load, which the store's reload approaches by refilling the pages of the expert it
  evicts.

Each is measured with the files in the page cache (``warm``: read just before) and, where
``posix_fadvise(DONTNEED)`` works, out of it (``cold``: the expert's files dropped before
each timed call; the share of their pages still cached is printed). Loads and plain reads
alternate, so both see the same conditions; medians of ``--repeat`` calls are compared.
The ratio is load / plain read: the goal is <= 1.2x.

Experts: the bundled tiny family's chat, math and code, compressed here (2-bit, one
2 MB shard each), and with ``--synthetic-layers N`` two experts of a synthetic
Llama-7B-shaped base of N layers (hidden 4096, MLP 14336; about 66 MB of shard per layer).

    python bench/store/bench_switch.py --repeat 30 --synthetic-layers 1 --json bench/store/results.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from meswitch import _core
from meswitch.compress import CompressionSettings, compress
from meswitch.family import family_dir
from meswitch.store import ExpertStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compress"))
from bench_compress import write_pair  # the synthetic 7B-shaped pair

_libc = ctypes.CDLL(None, use_errno=True)


def expert_files(artifact: Path) -> list[Path]:
    """Every file a load reads: shards, manifest and side files."""
    return sorted(p for p in artifact.rglob("*") if p.is_file())


def shards(artifact: Path) -> list[Path]:
    return sorted(artifact.glob("deltas-*.safetensors"))


def drop_from_cache(paths: list[Path]) -> bool:
    """Ask the kernel to drop these files' clean pages (True when it accepted)."""
    ok = True
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return ok


def cached_fraction(paths: list[Path]) -> float:
    """Share of these files' pages in the page cache (mincore)."""
    page = os.sysconf("SC_PAGE_SIZE")
    cached = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        with open(path, "rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as mapping:
            pages = (size + page - 1) // page
            vector = (ctypes.c_ubyte * pages)()
            address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
            if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            cached += sum(v & 1 for v in vector)
            total += pages
    return cached / max(total, 1)


def plain_read(artifact: Path) -> None:
    for path in shards(artifact):
        np.fromfile(path, dtype=np.uint8)


def read_into(artifact: Path, buffers: list[np.ndarray]) -> None:
    for path, buffer in zip(shards(artifact), buffers):
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < buffer.size:
                done += os.preadv(fd, [memoryview(buffer)[done:]], done)
        finally:
            os.close(fd)


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(store: ExpertStore, directories: dict[str, Path], repeat: int, cold: bool) -> dict:
    """Medians of reload, first load and plain read of the experts in turn, warm or cold."""
    names = list(directories)
    times = {"reload": [], "first_load": [], "plain_read": [], "read_into": []}
    # One set of buffers for every expert, as a reader reusing its memory would have.
    sizes = [max(p.stat().st_size for p in group) for group in zip(*(shards(d) for d in directories.values()))]
    shared = [np.ones(size, dtype=np.uint8) for size in sizes]
    buffers = {name: [b[:p.stat().st_size] for b, p in zip(shared, shards(d))] for name, d in directories.items()}
    c_load_seconds = {"reload": [], "first_load": []}
    residue = []

    def prepare(name: str) -> None:
        files = expert_files(directories[name])
        if cold:
            drop_from_cache(files)
            residue.append(cached_fraction(files))
        else:
            plain_read(directories[name])
            for path in files:
                path.read_bytes()

    def acquire(name: str, kind: str) -> None:
        before = store.memory_report()["load_seconds"]
        prepare(name)
        seconds = timed(lambda: store.acquire(name).release())
        times[kind].append(seconds)
        c_load_seconds[kind].append(store.memory_report()["load_seconds"] - before)

    for name in names:  # every expert loaded once: later acquires are reloads
        store.acquire(name).release()
    for i in range(repeat):
        name = names[i % len(names)]
        acquire(name, "reload")
        prepare(name)
        times["plain_read"].append(timed(lambda name=name: plain_read(directories[name])))
        prepare(name)
        times["read_into"].append(timed(lambda name=name: read_into(directories[name], buffers[name])))
        store.remove(name)
        store.add(directories[name])
        acquire(name, "first_load")
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    result = {f"{kind}_s": value for kind, value in medians.items()}
    result.update({f"{kind}_core_s": statistics.median(values) for kind, values in c_load_seconds.items()})
    result["reload_ratio"] = medians["reload"] / medians["plain_read"]
    result["first_load_ratio"] = medians["first_load"] / medians["plain_read"]
    if cold:
        result["cached_fraction_after_drop"] = max(residue)
    return result


def compressed(base: Path, experts: dict[str, Path], root: Path) -> dict[str, Path]:
    out = {}
    for name, expert in experts.items():
        out[name] = root / f"{name}.meswitch"
        compress(base, expert, out[name], progress=False, settings=CompressionSettings(bits=2))
    return out


def synthetic_experts(root: Path, layers: int) -> tuple[Path, dict[str, Path]]:
    """Two experts of one synthetic 7B-shaped base (the second: the first's delta reversed)."""
    import shutil

    from meswitch.checkpoint import open_checkpoint, save_file

    gib = layers * 0.38  # write_pair's layer is about 0.38 GiB of f16
    base, first, _ = write_pair(root / "pair", gib)
    second = root / "pair" / "expert2"
    second.mkdir()
    shutil.copy(first / "config.json", second / "config.json")
    shutil.copy(first / "model.safetensors.index.json", second / "model.safetensors.index.json")
    base_checkpoint, first_checkpoint = open_checkpoint(base), open_checkpoint(first)
    weight_map = json.loads((first / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(weight_map.values())):
        tensors = {}
        for name in (n for n, file in weight_map.items() if file == shard):
            b = base_checkpoint.get_array(name, widen=True)
            tensors[name] = (2 * b - first_checkpoint.get_array(name, widen=True)).astype(np.float16)
        save_file(tensors, second / shard)
    return base, {"a": first, "b": second}


def run_family(label: str, base: Path, directories: dict[str, Path], repeat: int) -> dict:
    probe = ExpertStore(base, host_budget=1 << 40)
    for directory in directories.values():
        probe.add(directory)
    budget = max(expert["bytes"] for expert in probe.memory_report()["experts"])
    del probe
    store = ExpertStore(base, host_budget=budget)  # one expert at a time: every acquire is a switch
    directories = {store.add(directory): directory for directory in directories.values()}
    shard_bytes = sum(p.stat().st_size for p in shards(next(iter(directories.values()))))
    result = {"experts": list(directories), "shard_bytes": shard_bytes, "host_budget": budget,
              "warm": measure(store, directories, repeat, cold=False)}
    if drop_from_cache(expert_files(next(iter(directories.values())))):
        result["cold"] = measure(store, directories, max(4, repeat // 3), cold=True)
    report = store.memory_report()
    result["recycled_buffers"], result["loads"] = report["recycled_buffers"], report["loads"]
    print(f"\n{label}: {len(directories)} experts of {shard_bytes / 2**20:.1f} MiB of shards each, "
          f"host budget {budget / 2**20:.1f} MiB (one at a time)")
    print(f"  {'cache':5} {'plain read':>11} {'read into':>10} {'reload':>10} {'ratio':>6} {'first load':>11} "
          f"{'ratio':>6}   (store's own load time: reload / first)")
    for state in ("warm", "cold"):
        if state not in result:
            continue
        r = result[state]
        extra = f"   {r['cached_fraction_after_drop']:.0%} of pages still cached after the drop" if state == "cold" else ""
        print(f"  {state:5} {r['plain_read_s'] * 1e3:8.3f} ms {r['read_into_s'] * 1e3:7.3f} ms "
              f"{r['reload_s'] * 1e3:7.3f} ms {r['reload_ratio']:5.2f}x "
              f"{r['first_load_s'] * 1e3:8.3f} ms {r['first_load_ratio']:5.2f}x   "
              f"({r['reload_core_s'] * 1e3:.3f} / {r['first_load_core_s'] * 1e3:.3f} ms){extra}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per measurement (cold: a third)")
    parser.add_argument("--synthetic-layers", type=int, default=0,
                        help="also two experts of a synthetic 7B-shaped base of this many layers (0: none)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    results = {"machine": platform.processor() or platform.machine(), "sha256_kernel": _core.sha256_kernel(),
               "repeat": args.repeat}
    with tempfile.TemporaryDirectory(dir=os.environ.get("MESWITCH_BENCH_DIR")) as scratch:
        root = Path(scratch)
        family = family_dir()
        tiny = compressed(family / "base", {n: family / n for n in ("chat", "math", "code")}, root)
        print(f"sha256 kernel: {results['sha256_kernel']}; medians of {args.repeat} calls (cold: "
              f"{max(4, args.repeat // 3)})")
        results["tiny"] = run_family("tiny family", family / "base", tiny, args.repeat)
        if args.synthetic_layers > 0:
            base, experts = synthetic_experts(root, args.synthetic_layers)
            synthetic = compressed(base, experts, root)
            results["synthetic"] = run_family(f"synthetic 7B-shaped, {args.synthetic_layers} layer(s)", base,
                                              synthetic, args.repeat)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
