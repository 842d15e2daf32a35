"""Peak memory of the calibration Hessian capture on a 7B-shaped model: whole-model against streamed.

GPTQ needs every linear's input Hessian ``E[x x^T]``. Captured in one hooked forward
(``meswitch.calibration.collect_input_hessians``) every layer's accumulators are alive at
once, about 2 GB per layer of a 7B model in float64; streamed
(``stream_input_hessians``, what ``compress`` uses) the model runs one decoder layer at
a time and each finished layer's Hessians go to ``.npy`` files. Here a Llama-7B-shaped
model (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary 32000) with random
weights and ``--layers`` decoder layers is captured both ways on the bundled chat
calibration text, each in a fresh process; the streamed files are checked against the
whole capture.

Run: ``python bench/compress/bench_capture.py [--layers 2] [--tokens 2048]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, re, sys, time
import numpy as np, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from meswitch.calibration import collect_input_hessians, read_calibration_texts, stream_input_hessians
from meswitch.family import family_dir
mode, layers, tokens, spill = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
model = LlamaForCausalLM(config).float().eval()
tokenizer = AutoTokenizer.from_pretrained(family_dir() / "chat")
texts = read_calibration_texts(family_dir().parent / "calib" / "chat.jsonl")
def rss(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = rss("VmRSS")
start = time.perf_counter()
if mode == "whole":
    hessians = collect_input_hessians(model, tokenizer, texts, max_tokens=tokens)
else:
    hessians = stream_input_hessians(model, tokenizer, texts, spill, max_tokens=tokens)
seconds = time.perf_counter() - start
if mode == "whole":  # written after the clock and the peak were taken, for the comparison
    peak = rss("VmHWM")
    files = {}
    for number, h in enumerate({id(h): h for h in hessians.values()}.values()):
        np.save(f"{spill}/{number}.npy", h)
        files.update({name: f"{spill}/{number}.npy" for name, other in hessians.items() if other is h})
else:
    peak = rss("VmHWM")
    files = {name: str(hessians.path(name)) for name in hessians}
json.dump(files, open(f"{spill}.json", "w"))
print(json.dumps({"seconds": seconds, "model_rss": before, "peak_rss": peak, "hessians": len(hessians)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-shaped model")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens")
    args = parser.parse_args()
    import numpy as np

    rows = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("MESWITCH_BENCH_DIR")) as scratch:
        for mode in ("whole", "streamed"):
            spill = Path(scratch) / mode
            spill.mkdir()
            print(f"capturing ({mode}) ...", flush=True)
            result = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.layers), str(args.tokens),
                                     str(spill)], check=True, capture_output=True, text=True)
            rows[mode] = json.loads(result.stdout.strip().splitlines()[-1])
        # Same model, same texts: the streamed files hold the whole capture's values, name by name.
        whole = json.loads((Path(scratch) / "whole.json").read_text())
        streamed = json.loads((Path(scratch) / "streamed.json").read_text())
        assert set(whole) == set(streamed), set(whole) ^ set(streamed)
        worst = 0.0
        for name in whole:
            a, b = np.load(whole[name]), np.load(streamed[name])
            worst = max(worst, float(np.abs(a - b).max()) / float(np.abs(a).max()))
    print(f"\n7B-shaped model, {args.layers} decoder layers, {args.tokens} calibration tokens; "
          f"largest relative difference streamed vs whole {worst:.1e}\n")
    print("| capture | seconds | model RSS MiB | peak RSS MiB | above the model MiB |")
    print("|---|---:|---:|---:|---:|")
    for mode, row in rows.items():
        print(f"| {mode} | {row['seconds']:.1f} | {row['model_rss'] / 2**20:.0f} | {row['peak_rss'] / 2**20:.0f} | "
              f"{(row['peak_rss'] - row['model_rss']) / 2**20:.0f} |")


if __name__ == "__main__":
    main()
