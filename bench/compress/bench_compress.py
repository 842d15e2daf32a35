"""Compression throughput and peak memory on a synthetic multi-GB checkpoint.

Builds a Llama-7B-shaped base and expert (hidden 4096, MLP 14336, f16, sharded)
of about ``--gib`` GiB each, then compresses the expert in fresh processes, one per
mode: weight-only and activation-aware round to nearest (synthetic per-channel
statistics, so the scoring cost is included without running a 7B model here), and
GPTQ with synthetic calibration Hessians (correlated channels; one float32 ``.npy``
per distinct layer input, opened memory-mapped as ``meswitch.calibration.HessianFiles``,
the way ``compress`` reads the Hessians it streams to disk). Reports MB of f16 delta
processed per second on one core (``MESWITCH_NUM_THREADS=1``; round to nearest is
single-threaded anyway) and peak RSS against the streaming bound ``2 x largest
tensor + 256 MB``, plus ``2 x the largest Hessian`` for GPTQ (the mapped Hessian and
the factor the quantizer makes of it).

Run: ``python bench/compress/bench_compress.py [--gib 2] [--modes weight-only activation-aware gptq]``
(GPTQ takes minutes per layer on one core: ``--gib 0.4`` is one layer.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HIDDEN, MLP, KV = 4096, 14336, 1024
LAYER_SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN),
                "self_attn.v_proj": (KV, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
                "mlp.gate_proj": (MLP, HIDDEN), "mlp.up_proj": (MLP, HIDDEN), "mlp.down_proj": (HIDDEN, MLP)}


def write_pair(root: Path, gib: float) -> tuple[Path, Path, int]:
    """Base and expert (= base + small delta) with one safetensors shard per layer."""
    from meswitch.checkpoint import save_file

    layer_bytes = sum(r * c for r, c in LAYER_SHAPES.values()) * 2
    layers = max(1, int(gib * 2**30 // layer_bytes))
    rng = np.random.default_rng(0)
    for name in ("base", "expert"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps({
            "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": layers}))
    weight_map = {}
    for layer in range(layers):
        base, expert = {}, {}
        for suffix, shape in LAYER_SHAPES.items():
            key = f"model.layers.{layer}.{suffix}.weight"
            w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
            base[key] = w
            expert[key] = (w + (rng.standard_normal(shape, dtype=np.float32) * 1e-3).astype(np.float16))
            weight_map[key] = f"model-{layer:05d}.safetensors"
        for name, tensors in (("base", base), ("expert", expert)):
            save_file(tensors, root / name / f"model-{layer:05d}.safetensors")
        print(f"  wrote layer {layer + 1}/{layers}", flush=True)
    for name in ("base", "expert"):
        (root / name / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root / "base", root / "expert", layers


DISTINCT_INPUTS = {"self_attn.q_proj": "attention", "self_attn.k_proj": "attention", "self_attn.v_proj": "attention",
                   "self_attn.o_proj": "o_proj", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "down"}


def write_hessians(directory: Path, layers: int) -> dict[str, str]:
    """Synthetic calibration Hessians E[x x^T], one ``.npy`` per distinct input of each layer.

    Inputs are heavy-tailed per channel plus a shared rank-16 part, so channels correlate
    as real activations do; 4096 tokens (the damping makes the rank-deficient wide ones
    positive definite, as in real use)."""
    rng = np.random.default_rng(2)
    directory.mkdir()
    files = {}
    for layer in range(layers):
        for suffix, kind in DISTINCT_INPUTS.items():
            file = f"{layer:03d}-{kind}.npy"
            if not (directory / file).exists():
                cols = LAYER_SHAPES[suffix][1]
                x = rng.standard_normal((4096, cols), dtype=np.float32) * rng.gamma(0.5, 2.0, cols).astype(np.float32)
                x += rng.standard_normal((4096, 16), dtype=np.float32) @ rng.standard_normal((16, cols), dtype=np.float32)
                np.save(directory / file, (x.T @ x) / np.float32(x.shape[0]))
            files[f"model.layers.{layer}.{suffix}.weight"] = file
        print(f"  wrote the Hessians of layer {layer + 1}/{layers}", flush=True)
    (directory / "files.json").write_text(json.dumps(files))
    return files


CHILD = r"""
import json, re, sys, time
from pathlib import Path
import numpy as np
from meswitch.calibration import HessianFiles
from meswitch.compress import compress, CompressionSettings
base, expert, out, mode = sys.argv[1:5]
stats = None
if mode == "gptq":
    hessians = Path(sys.argv[6])
    stats = HessianFiles(hessians, json.loads((hessians / "files.json").read_text()))
if mode == "activation-aware":
    rng = np.random.default_rng(1)
    stats = {}
    for layer in range(int(sys.argv[5])):
        for suffix, cols in (("self_attn.q_proj", 4096), ("self_attn.k_proj", 4096), ("self_attn.v_proj", 4096),
                             ("self_attn.o_proj", 4096), ("mlp.gate_proj", 4096), ("mlp.up_proj", 4096),
                             ("mlp.down_proj", 14336)):
            stats[f"model.layers.{layer}.{suffix}.weight"] = rng.gamma(0.5, 2.0, cols).astype(np.float32)
def peak_rss():
    # VmHWM is this process's own high-water mark (ru_maxrss would carry the parent's over exec).
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
start = time.perf_counter()
method = "gptq" if mode == "gptq" else "rtn"
report = compress(base, expert, out, settings=CompressionSettings(bits=2, salient=0.01, method=method),
                  calibration=stats, progress=False)
seconds = time.perf_counter() - start
import resource
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "delta_parameters": report.delta_parameters,
                  "peak_rss_bytes": peak_rss(),
                  "artifact_bytes": report.artifact_bytes}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0, help="size of each synthetic checkpoint")
    parser.add_argument("--modes", nargs="+", choices=("weight-only", "activation-aware", "gptq"),
                        default=["weight-only", "activation-aware", "gptq"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("MESWITCH_BENCH_DIR")) as scratch:
        root = Path(scratch)
        print(f"writing a {args.gib:g} GiB base and expert ...", flush=True)
        base, expert, layers = write_pair(root, args.gib)
        largest = MLP * HIDDEN * 2
        bound = 2 * largest + 256 * 2**20
        largest_hessian = MLP * MLP * 4
        hessians = root / "hessians"
        if "gptq" in args.modes:
            print("writing synthetic calibration Hessians ...", flush=True)
            write_hessians(hessians, layers)
        # The baseline a compressor cannot beat: the interpreter with numpy and torch-free meswitch imported.
        idle = int(subprocess.run([sys.executable, "-c", (
            "import re, numpy, meswitch.compress;"
            "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024)")],
            check=True, capture_output=True, text=True).stdout)
        rows = []
        environment = {**os.environ, "MESWITCH_NUM_THREADS": "1"}
        for mode in args.modes:
            print(f"compressing ({mode}) ...", flush=True)
            result = subprocess.run([sys.executable, "-c", CHILD, str(base), str(expert), str(root / f"{mode}.meswitch"),
                                     mode, str(layers), str(hessians)], check=True, capture_output=True, text=True,
                                    env=environment)
            rows.append((mode, json.loads(result.stdout.strip().splitlines()[-1])))
    print(f"\ncheckpoint: {layers} layers of a 7B-shaped model, {rows[0][1]['delta_parameters'] * 2 / 2**30:.2f} GiB "
          f"of f16 delta; largest tensor {largest / 2**20:.0f} MiB; bound 2 x largest + 256 MB = {bound / 2**20:.0f} MiB; "
          f"interpreter + imports alone: {idle / 2**20:.0f} MiB; GPTQ bound + 2 x largest Hessian "
          f"({largest_hessian / 2**20:.0f} MiB) = {(bound + 2 * largest_hessian) / 2**20:.0f} MiB\n")
    # CPU seconds of the compressing process (one thread): the per-core rate even when other
    # processes share the machine, which the wall-clock rate is not.
    print("| mode | seconds | CPU seconds | delta MB/s per CPU second | peak RSS MiB | bound MiB | peak RSS / bound |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, row in rows:
        rate = row["delta_parameters"] * 2 / 1e6 / row["cpu_seconds"]
        limit = bound + (2 * largest_hessian if mode == "gptq" else 0)
        print(f"| {mode} | {row['seconds']:.1f} | {row['cpu_seconds']:.1f} | {rate:.2f} | "
              f"{row['peak_rss_bytes'] / 2**20:.0f} | {limit / 2**20:.0f} | {row['peak_rss_bytes'] / limit:.2f} |")


if __name__ == "__main__":
    main()
