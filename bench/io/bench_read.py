"""Read a 1 GiB safetensors checkpoint into memory: meswitch vs the `safetensors` package.

Both run in the same process on the same file, with the file in the page cache
(one warm-up pass each), best of ``--repeat`` runs. "Into memory" means every
tensor is available as a NumPy array whose bytes are all resident:

* safetensors ``load_file``: reads and copies every tensor (the baseline);
* meswitch ``copy``: maps the file and copies each tensor into its own array;
* meswitch ``zero-copy``: maps the file and faults every page of every view in
  (the arrays share the page cache, nothing is copied).

Run: ``python bench/io/bench_read.py [--gib 1] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import safetensors.numpy

import meswitch

PAGE = 4096


def make_checkpoint(path: Path, gib: float) -> None:
    """A Llama-like mix of large f16 matrices and small f32 vectors totalling `gib` GiB."""
    rng = np.random.default_rng(0)
    target = int(gib * 2**30)
    tensors: dict[str, np.ndarray] = {}
    layer, written = 0, 0
    while written < target:
        rows = min(4096, max(1, (target - written) // (4096 * 2)))
        tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = (
            rng.standard_normal((rows, 4096), dtype=np.float32).astype(np.float16))
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = np.ones(4096, dtype=np.float32)
        written += rows * 4096 * 2 + 4096 * 4
        layer += 1
    safetensors.numpy.save_file(tensors, str(path))


def touch_pages(array: np.ndarray) -> int:
    """Fault in every page of an array (reads one byte per page)."""
    flat = array.reshape(-1).view(np.uint8)
    return int(flat[::PAGE].sum()) if flat.size else 0


def read_safetensors(path: Path) -> int:
    tensors = safetensors.numpy.load_file(str(path))
    return sum(t.nbytes for t in tensors.values())


def read_meswitch_copy(path: Path) -> int:
    checkpoint = meswitch.open_checkpoint(path)
    tensors = {name: np.array(checkpoint[name]) for name in checkpoint}
    return sum(t.nbytes for t in tensors.values())


def read_meswitch_zero_copy(path: Path) -> int:
    checkpoint = meswitch.open_checkpoint(path)
    tensors = {name: checkpoint[name] for name in checkpoint}
    for tensor in tensors.values():
        touch_pages(tensor)
    return sum(t.nbytes for t in tensors.values())


def best_time(function: Callable[[Path], int], path: Path, repeat: int) -> tuple[float, int]:
    function(path)  # warm-up: page cache and allocator
    times, nbytes = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        nbytes = function(path)
        times.append(time.perf_counter() - start)
    return min(times), nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--file", type=Path, help="use this checkpoint instead of a generated one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=os.environ.get("MESWITCH_BENCH_DIR")) as scratch:
        path = args.file or Path(scratch) / "bench.safetensors"
        if args.file is None:
            print(f"writing a {args.gib:g} GiB checkpoint to {path} ...", flush=True)
            make_checkpoint(path, args.gib)
        size = path.stat().st_size
        baseline, nbytes = best_time(read_safetensors, path, args.repeat)
        rows = [("safetensors load_file (baseline)", baseline, nbytes)]
        for label, function in (("meswitch copy", read_meswitch_copy),
                                ("meswitch zero-copy", read_meswitch_zero_copy)):
            seconds, got = best_time(function, path, args.repeat)
            assert got == nbytes, (label, got, nbytes)
            rows.append((label, seconds, got))

    print(f"\nfile: {size / 2**30:.3f} GiB, best of {args.repeat} warm runs\n")
    print(f"| reader | seconds | GiB/s | speed vs safetensors |")
    print(f"|---|---:|---:|---:|")
    for label, seconds, got in rows:
        print(f"| {label} | {seconds:.4f} | {got / 2**30 / seconds:.2f} | {baseline / seconds:.2f}x |")


if __name__ == "__main__":
    main()
