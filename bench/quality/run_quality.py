"""Quality of compressed experts on the bundled tiny family: the table and ablations of docs/results.md.

Run: ``python bench/quality/run_quality.py`` (about 45 minutes on 2 cores; with
``--no-ablation`` about 35).

For each expert (chat, math, code) it evaluates on the expert's own held-out
domain: the FP16 expert, the base alone, meswitch 2-bit + 1 % salient channels
(activation-aware, calibration from the training split; GPTQ codes, the default) alone,
with round-to-nearest codes instead, with the clipping search, with learned step sizes
(300 steps) and with 4-bit vocabulary matrices, meswitch at ``--avg-bits 2.3`` (the
output-aware budget planner), meswitch 1-bit + 1 % salient (alone and with learned step
sizes), and the baselines: RTN
2-bit (no salient channels, no step-size search, same groups), GPTQ 2-bit without
salient channels (the DeltaZip-style choice) and BitDelta 1-bit (sign x one scale per
matrix), plain and with its scales distilled on the calibration text, on the logits' squared
error as its paper does and on the KL divergence (the stronger of the two here).
Then the ablations (salient fraction 0-5 % at 2 bits, bits 1-4 at 1 % salient), the size
table (base + 3 compressed experts vs 4 separate FP16 models) and the targets. Writes
``docs/data/quality.json``, the ``<!-- quality -->`` section of docs/results.md
and ``docs/img/ablation_*.png``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

from meswitch.artifact import load_compressed_model, model_from_weights
from meswitch.checkpoint import open_checkpoint
from meswitch.naming import is_delta_role, tensor_role
from meswitch.baselines import bitdelta_distilled_weights, bitdelta_storage_bits, bitdelta_weights
from meswitch.calibration import read_calibration_texts
from meswitch.compress import CompressionSettings, compress
from meswitch.evaluation import evaluate, load_model
from meswitch.family import EXPERTS, family_dir

CALIBRATION_DIR = family_dir().parent / "calib"
#: The metric each domain is judged on, and whether higher is better.
PRIMARY = {"chat": ("perplexity", False), "math": ("perplexity", False), "code": ("perplexity", False)}
EXTRA = {"math": ("exact_match_generated", True), "code": ("next_token_accuracy", True)}


def tiny_family_settings(**kwargs) -> CompressionSettings:
    """Compression settings for the tiny family, whose 688-wide MLP needs a ragged last group of 64."""
    return CompressionSettings(ragged_groups=True, **kwargs)


SALIENT_FRACTIONS = (0.0, 0.005, 0.01, 0.02, 0.05)
BITS = (1, 2, 3, 4)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def log_row(domain: str, rows: list[dict[str, Any]]) -> None:
    """The row just measured: its primary metric, gap to the FP16 expert (the first row) and bits."""
    metric, _ = PRIMARY[domain]
    row = rows[-1]
    gap = (row[metric] - rows[0][metric]) / rows[0][metric]
    log(f"{domain}: {row['method']}: {metric} {row[metric]:.4f} ({gap:+.2%} vs FP16), {row['avg_bits']:.2f} bits")


def metrics_of(result: dict[str, Any], domain: str) -> dict[str, float]:
    entry = result[domain]
    out = {"perplexity": entry["perplexity"], "bits_per_byte": entry["bits_per_byte"]}
    if domain in EXTRA:
        out[EXTRA[domain][0]] = entry[EXTRA[domain][0]]
    return out


def score(model, tokenizer, domain: str, max_examples: int | None) -> dict[str, float]:
    # Generated answers are one line ("... = 24 ...\n#### 24"): 64 new tokens hold them.
    result = evaluate(model=model, tokenizer=tokenizer, domains=[domain], max_examples=max_examples,
                      max_new_tokens=64)
    return metrics_of(result, domain)


def evaluate_artifact(base: Path, artifact: Path, domain: str, max_examples: int | None) -> dict[str, float]:
    model, tokenizer = load_compressed_model(base, artifact)
    return score(model, tokenizer, domain, max_examples)


def run_method(label: str, base: Path, expert: Path, domain: str, workdir: Path, settings: CompressionSettings,
               calibration: Path | None, max_examples: int | None) -> dict[str, Any]:
    out = workdir / f"{domain}-{re.sub('[^a-z0-9]+', '_', label.lower())}.meswitch"
    report = compress(base, expert, out, settings=settings, calibration=calibration, progress=False)
    row = {"method": label, "avg_bits": report.avg_bits, "bytes": report.artifact_bytes,
           "compress_seconds": report.seconds}
    row.update(evaluate_artifact(base, out, domain, max_examples))
    shutil.rmtree(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", type=Path, default=family_dir())
    parser.add_argument("--experts", nargs="+", choices=EXPERTS, default=list(EXPERTS),
                        help="experts to evaluate (default: all); the others keep their rows from --json")
    parser.add_argument("--max-examples", type=int, default=None, help="limit held-out examples (quick runs)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablations (keeps the previous ones)")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "data" / "quality.json")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--plots", type=Path, default=REPO / "docs" / "img")
    args = parser.parse_args()

    base = args.family / "base"
    results: dict[str, Any] = {"experts": {}, "ablation": {}, "sizes": {}}
    workdir = Path(tempfile.mkdtemp(prefix="meswitch-quality-"))
    try:
        for domain in args.experts:
            expert = args.family / domain
            calibration = CALIBRATION_DIR / f"{domain}.jsonl"
            rows = []
            log(f"{domain}: FP16 expert and base")
            model, tokenizer = load_model(expert)
            rows.append({"method": "FP16 expert", "avg_bits": 16.0, "bytes": None,
                         **score(model, tokenizer, domain, args.max_examples)})
            model, tokenizer = load_model(base)
            rows.append({"method": "base alone", "avg_bits": 0.0, "bytes": 0,
                         **score(model, tokenizer, domain, args.max_examples)})
            methods = [
                ("meswitch 2-bit + 1% salient", tiny_family_settings(bits=2, salient=0.01), calibration),
                ("meswitch 2-bit + 1% salient, RTN codes", tiny_family_settings(bits=2, salient=0.01, method="rtn"),
                 calibration),
                ("meswitch 2-bit + 1% salient + clip search", tiny_family_settings(bits=2, salient=0.01, clip_grid=20),
                 calibration),
                ("meswitch 2-bit + 1% salient + learned step sizes",
                 tiny_family_settings(bits=2, salient=0.01, refine_steps=300), calibration),
                ("meswitch 2-bit + 1% salient, 4-bit vocabulary",
                 tiny_family_settings(bits=2, salient=0.01, vocab_bits=4), calibration),
                ("meswitch --avg-bits 2.3", tiny_family_settings(avg_bits=2.3), calibration),
                ("meswitch 1-bit + 1% salient, whole-row groups",
                 tiny_family_settings(bits=1, group_size=0, salient=0.01), calibration),
                ("meswitch 1-bit + 1% salient, whole-row groups + learned step sizes",
                 tiny_family_settings(bits=1, group_size=0, salient=0.01, refine_steps=300), calibration),
                ("RTN 2-bit", tiny_family_settings(bits=2, salient=0, clip_grid=1, method="rtn"), None),
                ("GPTQ 2-bit, no salient", tiny_family_settings(bits=2, salient=0), calibration),
            ]
            for label, settings, calib in methods:
                log(f"{domain}: {label}")
                rows.append(run_method(label, base, expert, domain, workdir, settings, calib, args.max_examples))
                log_row(domain, rows)
            params = bits = 0
            base_ckpt = open_checkpoint(base)
            for name in base_ckpt:
                shape = base_ckpt.info(name)["shape"]
                if is_delta_role(tensor_role(name)) and len(shape) == 2:
                    params += shape[0] * shape[1]
                    bits += bitdelta_storage_bits(shape[0], shape[1])
            for label, make in (
                    ("BitDelta 1-bit", lambda expert=expert: dict(bitdelta_weights(base, expert))),
                    ("BitDelta 1-bit, distilled scales (logit MSE, as its paper)",
                     lambda expert=expert, calibration=calibration: bitdelta_distilled_weights(
                         base, expert, read_calibration_texts(calibration), objective="logit_mse")),
                    ("BitDelta 1-bit, distilled scales (KL)",
                     lambda expert=expert, calibration=calibration: bitdelta_distilled_weights(
                         base, expert, read_calibration_texts(calibration), objective="kl"))):
                log(f"{domain}: {label}")
                started = time.perf_counter()
                weights = make()
                seconds = time.perf_counter() - started
                model, tokenizer = model_from_weights(expert, weights)
                rows.append({"method": label, "avg_bits": bits / params, "bytes": bits // 8,
                             "compress_seconds": seconds, **score(model, tokenizer, domain, args.max_examples)})
                log_row(domain, rows)
            results["experts"][domain] = rows

            if not args.no_ablation:
                ablation: dict[str, list[dict[str, Any]]] = {"salient": [], "bits": []}
                for fraction in SALIENT_FRACTIONS:
                    log(f"{domain}: ablation salient {fraction:.1%}")
                    ablation["salient"].append({"salient": fraction, **run_method(
                        f"salient {fraction}", base, expert, domain, workdir,
                        tiny_family_settings(bits=2, salient=fraction), calibration, args.max_examples)})
                for bit_width in BITS:
                    log(f"{domain}: ablation {bit_width} bits")
                    ablation["bits"].append({"bits": bit_width, **run_method(
                        f"bits {bit_width}", base, expert, domain, workdir,
                        tiny_family_settings(bits=bit_width, salient=0.01), calibration, args.max_examples)})
                results["ablation"][domain] = ablation

        results["sizes"] = size_table(args.family, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    if args.no_ablation:  # keep the ablations of the previous full run
        results["ablation"] = previous.get("ablation", {})
    # Experts left out of this run keep their previous rows and ablations, in family order.
    for key in ("experts", "ablation"):
        merged = {**previous.get(key, {}), **results[key]}
        results[key] = {domain: merged[domain] for domain in EXPERTS if domain in merged}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    write_markdown(results, args.markdown)
    if results["ablation"] and not args.no_ablation:
        plot_ablations(results["ablation"], args.plots)
    log(f"wrote {args.json}, {args.markdown}, {args.plots}")


def size_table(family: Path, workdir: Path) -> dict[str, Any]:
    """Bytes of base + 3 compressed experts (2-bit + 1 % salient) vs 4 separate FP16 models."""
    base = family / "base"

    def model_bytes(directory: Path) -> int:
        return sum(p.stat().st_size for p in directory.glob("*.safetensors"))

    sizes: dict[str, Any] = {"base": model_bytes(base), "experts_fp16": {}, "experts_meswitch": {}}
    for domain in EXPERTS:
        out = workdir / f"{domain}-size.meswitch"
        compress(base, family / domain, out, settings=tiny_family_settings(bits=2, salient=0.01),
                 calibration=CALIBRATION_DIR / f"{domain}.jsonl", progress=False)
        sizes["experts_fp16"][domain] = model_bytes(family / domain)
        sizes["experts_meswitch"][domain] = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    sizes["separate_fp16_total"] = sizes["base"] + sum(sizes["experts_fp16"].values())
    sizes["meswitch_total"] = sizes["base"] + sum(sizes["experts_meswitch"].values())
    sizes["ratio"] = sizes["separate_fp16_total"] / sizes["meswitch_total"]
    return sizes


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = ["<!-- quality:begin (generated by bench/quality/run_quality.py; do not edit by hand) -->",
             "## Compressed experts: quality against FP16, RTN and BitDelta", "",
             "Command: `python bench/quality/run_quality.py`. Each expert is judged on its own held-out",
             "domain on perplexity (the gap column), plus bits per byte (tokenizer independent: the",
             "base lacks the chat expert's special tokens, so compare the base on bits per byte),",
             "math exact match on held-out generated problems and code next-token accuracy.",
             "`avg bits` counts everything stored per delta parameter (codes, scales, zeros, salient",
             "values and indices); `gap` is the primary metric's relative distance to the FP16 expert.", ""]
    for domain, rows in results["experts"].items():
        metric, _ = PRIMARY[domain]
        extra = EXTRA.get(domain)
        reference = rows[0][metric]
        header = f"| {domain} expert | avg bits | delta bytes | {metric} | gap vs FP16 | bits/byte |"
        divider = "|---|---:|---:|---:|---:|---:|"
        if extra:
            header += f" {extra[0]} |"
            divider += "---:|"
        lines += [f"### {domain}", "", header, divider]
        for row in rows:
            gap = (row[metric] - reference) / reference
            line = (f"| {row['method']} | {_fmt(row['avg_bits'], '.2f')} | {_fmt(row['bytes'], ',')} | "
                    f"{row[metric]:.4f} | {gap:+.2%} | {row['bits_per_byte']:.4f} |")
            if extra:
                line += f" {row[extra[0]]:.1%} |"
            lines.append(line)
        lines.append("")
    sizes = results.get("sizes")
    if sizes:
        lines += ["### Size: base + 3 experts", "",
                  "| storage | bytes | vs 4 separate FP16 models |", "|---|---:|---:|",
                  f"| 4 separate FP16 models (base, chat, math, code) | {sizes['separate_fp16_total']:,} | 1.00x |",
                  f"| base FP16 + 3 meswitch experts (2-bit + 1 % salient) | {sizes['meswitch_total']:,} | "
                  f"{sizes['ratio']:.2f}x smaller |", ""]
    if results["ablation"]:
        lines += ["### Ablations", "", "![salient](img/ablation_salient.png) ![bits](img/ablation_bits.png)", ""]
    lines += target_lines(results["experts"])
    lines.append("<!-- quality:end -->")
    block = "\n".join(lines)
    text = path.read_text() if path.exists() else "# Results\n"
    pattern = re.compile(r"<!-- quality:begin.*?<!-- quality:end -->", re.S)
    text = pattern.sub(block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


#: The targets: (label, meswitch rows, comparison rows, how they are judged). Of several
#: meswitch rows the best one counts, among those at no more bits than the comparison's
#: fewest ("equal bits"); of several comparison rows the best one counts (the strongest
#: baseline).
MESWITCH_AT_RTN_BITS = ("meswitch --avg-bits 2.3", "GPTQ 2-bit, no salient")
MESWITCH_1_BIT = ("meswitch 1-bit + 1% salient, whole-row groups",
                  "meswitch 1-bit + 1% salient, whole-row groups + learned step sizes")
DISTILLED_BITDELTA = ("BitDelta 1-bit, distilled scales (logit MSE, as its paper)",
                      "BitDelta 1-bit, distilled scales (KL)")
TARGETS = (
    ("2 bits + 1 % salient within 1 % of FP16", ("meswitch 2-bit + 1% salient",), (), "gap"),
    ("--avg-bits 2.3 within 1 % of FP16", ("meswitch --avg-bits 2.3",), (), "gap"),
    ("gap at most half of RTN 2-bit's, at no more bits", MESWITCH_AT_RTN_BITS, ("RTN 2-bit",), "half"),
    ("1 bit ahead of distilled BitDelta (the better of its two objectives)", MESWITCH_1_BIT, DISTILLED_BITDELTA,
     "ahead"),
)


def target_lines(experts: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The targets per expert, met or missed by how much, from the table's own numbers."""
    lines = ["### Targets", "", "| target | " + " | ".join(experts) + " |", "|---|" + "---|" * len(experts)]
    for label, ours, others, rule in TARGETS:
        cells = []
        for domain, rows in experts.items():
            metric, _ = PRIMARY[domain]
            reference = rows[0][metric]
            gaps = {row["method"]: (row[metric] - reference) / reference for row in rows}
            bits = {row["method"]: row["avg_bits"] for row in rows}
            other = min((name for name in others if name in gaps), key=gaps.get, default=None)
            limit = bits[other] if rule == "half" and other else float("inf")
            mine = min((name for name in ours if name in gaps and bits[name] <= limit + 1e-9), key=gaps.get,
                       default=None)
            if mine is None or (others and other is None):
                cells.append("-")
                continue
            gap = gaps[mine]
            if rule == "gap":
                cells.append(f"{'met' if gap <= 0.01 else 'missed'}: {gap:+.2%}")
                continue
            met = gap <= 0.5 * gaps[other] if rule == "half" else gap < gaps[other]
            cells.append(f"{'met' if met else 'missed'}: {gap:+.2%} ({mine}, {bits[mine]:.2f} bits) vs "
                         f"{gaps[other]:+.2%} ({other}, {bits[other]:.2f} bits)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_ablations(ablation: dict[str, Any], directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    for key, xlabel in (("salient", "salient channels (fraction of input channels)"), ("bits", "bits per code")):
        figure, axes = plt.subplots(1, len(ablation), figsize=(4 * len(ablation), 3.4))
        axes = [axes] if len(ablation) == 1 else axes
        for axis, (domain, data) in zip(axes, ablation.items()):
            metric, _ = PRIMARY[domain]
            xs = [row[key] * 100 if key == "salient" else row[key] for row in data[key]]
            axis.plot(xs, [row[metric] for row in data[key]], marker="o")
            axis.set_title(f"{domain} expert")
            axis.set_xlabel(xlabel.replace("fraction", "%") if key == "salient" else xlabel)
            axis.set_ylabel(metric)
        figure.tight_layout()
        figure.savefig(directory / f"ablation_{key}.png", dpi=110)
        plt.close(figure)


if __name__ == "__main__":
    main()
