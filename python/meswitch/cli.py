"""The ``meswitch`` command line.

Exit status: 0 on success; 2 when the command line is wrong (an unknown flag, a bad
value, a path that does not exist); 1 when the inputs it names cannot be used (a
malformed file, models that do not match). Every error is one line on stderr,
``meswitch SUBCOMMAND: error: WHAT``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from meswitch import __version__
from meswitch.arguments import (
    INPUT_ERROR,
    USAGE_ERROR,
    OneLineArgumentParser,
    UsageError,
    existing_dir,
    existing_file,
    existing_path,
    float_in,
    int_in,
    positive_int,
    report_error,
    salient,
    size,
    size_or_zero,
)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """Summary of a checkpoint directory or file: model config, tensor counts, sizes, shards."""
    from meswitch.checkpoint import open_checkpoint

    path = Path(path)
    checkpoint = open_checkpoint(path)
    summary: dict[str, Any] = {"path": str(path), "shards": [Path(p).name for p in checkpoint.shard_paths]}
    config_dir = path if path.is_dir() else path.parent
    if (config_dir / "config.json").is_file():
        from meswitch.inputs import read_model_config

        config = read_model_config(config_dir)[1]
        summary["config"] = {key: config.get(key) for key in (
            "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "torch_dtype", "dtype")
            if config.get(key) is not None}
    tensors = []
    dtype_bytes: Counter[str] = Counter()
    parameters = 0
    for name in checkpoint:
        info = checkpoint.info(name)
        count = 1
        for dim in info["shape"]:
            count *= dim
        parameters += count
        dtype_bytes[info["dtype"]] += info["nbytes"]
        tensors.append({"name": name, "dtype": info["dtype"], "shape": info["shape"]})
    summary.update(tensors=tensors, parameters=parameters, bytes=sum(dtype_bytes.values()),
                   bytes_by_dtype=dict(dtype_bytes))
    return summary


def _print_summary(summary: dict[str, Any], list_tensors: bool) -> None:
    print(f"{summary['path']}")
    for key, value in summary.get("config", {}).items():
        print(f"  {key:<22} {value}")
    print(f"  {'tensors':<22} {len(summary['tensors'])}")
    print(f"  {'parameters':<22} {summary['parameters']:,}")
    print(f"  {'bytes':<22} {_human_bytes(summary['bytes'])} "
          f"({', '.join(f'{k}: {_human_bytes(v)}' for k, v in sorted(summary['bytes_by_dtype'].items()))})")
    print(f"  {'shards':<22} {len(summary['shards'])}: {', '.join(summary['shards'])}")
    if list_tensors:
        width = max((len(t["name"]) for t in summary["tensors"]), default=0)
        for tensor in summary["tensors"]:
            print(f"    {tensor['name']:<{width}}  {tensor['dtype']:<5} {tensor['shape']}")


def _run_inspect(args: argparse.Namespace) -> int:
    artifacts = [Path(p) for p in args.paths if _is_artifact(Path(p))]
    for path in artifacts:
        _inspect_artifact(path, args)
    checkpoints = [p for p in args.paths if not _is_artifact(Path(p))]
    if not checkpoints:
        return 0
    summaries = [describe_checkpoint(path) for path in checkpoints]
    if args.json:
        print(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=2))
        return 0
    for summary in summaries:
        _print_summary(summary, args.tensors)
    return 0


def _run_compress(args: argparse.Namespace) -> int:
    from meswitch.compress import CompressionSettings, compress

    if args.refine_steps and args.calib is None:
        raise UsageError("--refine-steps needs --calib (the refinement runs the model on that text)")
    fraction, channels = args.salient
    settings = CompressionSettings(bits=args.bits, group_size=args.group_size, salient=fraction,
                                   salient_channels=channels, clip_grid=args.clip_grid, min_clip=args.min_clip,
                                   avg_bits=args.avg_bits, vocab_bits=args.vocab_bits,
                                   refine_steps=args.refine_steps, refine_lr=args.refine_lr,
                                   method=args.method, damping=args.damping, act_order=args.act_order,
                                   ragged_groups=args.ragged_groups, max_shard_bytes=args.max_shard_bytes)
    report = compress(args.base, args.expert, args.out, settings=settings, calibration=args.calib,
                      name=args.name, domain=args.domain or "", progress=not args.quiet, force=args.force)
    for line in report.summary_lines():
        print(line)
    return 0


def _run_decompress(args: argparse.Namespace) -> int:
    from meswitch.artifact import decompress

    out = decompress(args.base, args.artifact, args.out, force=args.force)
    print(f"wrote {out}")
    return 0


def _is_artifact(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _inspect_artifact(path: Path, args: argparse.Namespace) -> int:
    from meswitch.artifact import load_artifact

    artifact = load_artifact(path)
    manifest = artifact.manifest
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    quant = manifest["quantization"]
    stats = manifest["statistics"]
    kinds = Counter(entry["kind"] for entry in manifest["tensors"].values())
    size = sum((path / shard["file"]).stat().st_size for shard in manifest["shards"])
    print(f"{path}  (format {manifest['format']} v{manifest['format_version']}, {manifest['created_by']})")
    print(f"  {'expert':<22} {manifest['name']}  {manifest.get('domain', '')}")
    print(f"  {'base fingerprint':<22} {manifest['base']['fingerprint'][:16]}...")
    print(f"  {'quantization':<22} bits={quant['bits']} group={quant['group_size'] or 'row'} "
          f"salient={_salient_text(quant)} clip_grid={quant['clip_grid']} avg_bits={quant['avg_bits']} "
          f"vocab_bits={quant.get('vocab_bits')} "
          f"calibration={quant['calibration']['kind']}")
    if quant.get("refine"):
        refine = quant["refine"]
        print(f"  {'learned step sizes':<22} {refine['steps']} steps on {refine['texts']} texts, KL per token "
              f"{refine['kl_before']:.4f} -> {refine['kl_after']:.4f}")
    print(f"  {'tensors':<22} " + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())))
    print(f"  {'delta parameters':<22} {stats['delta_parameters']:,}  ({stats['avg_bits']:.3f} bits each)")
    print(f"  {'stored':<22} {_human_bytes(size)} in {len(manifest['shards'])} shard(s), sha256 verified")
    if args.tensors:
        for name, entry in manifest["tensors"].items():
            if entry["kind"] == "delta":
                print(f"    {name:<48} {entry['rows']}x{entry['cols']} b={entry['bits']} k={entry['salient']} "
                      f"rel.err={entry['relative_error']:.4f}")
            else:
                print(f"    {name:<48} {entry['kind']}")
    if args.plot:
        _plot_layer_errors(manifest, args.plot)
        print(f"  plot: {args.plot}")
    return 0


def _salient_text(quant: dict[str, Any]) -> str:
    channels = quant.get("salient_channels")
    if channels is None and quant["salient"] >= 1 and "salient_channels" not in quant:
        channels = int(quant["salient"])  # manifests from before salient_channels kept counts in salient
    return f"{channels} channels" if channels is not None else f"{quant['salient'] * 100:g}%"


def _plot_layer_errors(manifest: dict[str, Any], plot_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meswitch.naming import layer_index

    series: dict[str, list[tuple[int, float]]] = {}
    for name, entry in manifest["tensors"].items():
        layer = layer_index(name)
        if entry["kind"] == "delta" and layer is not None:
            series.setdefault(name.rsplit(".", 2)[-2], []).append((layer, entry["relative_error"]))
    figure, axis = plt.subplots(figsize=(7, 4))
    for projection, points in sorted(series.items()):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=projection)
    axis.set_xlabel("layer")
    axis.set_ylabel("relative activation-weighted error")
    axis.set_title(f"{manifest['name']}: delta quantization error per layer")
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(plot_path, dpi=120)
    plt.close(figure)


def _run_demo(args: argparse.Namespace) -> int:
    from meswitch.demo import run_demo

    run_demo(Path(args.family) if args.family else None, Path(args.workdir), max_examples=args.max_examples)
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    from meswitch.store.capacity import ExpertFormat, describe, plan_capacity

    fraction, count = args.salient
    expert_format = ExpertFormat(bits=args.bits, group_size=args.group_size, salient=fraction, salient_channels=count,
                                 vocab_bits=args.vocab_bits)
    plan = plan_capacity(args.gpu_mem, expert_format, base=args.base, base_parameters=args.base_params,
                         kv_cache_bytes=args.kv_budget, reserve_bytes=args.reserve, base_dtype=args.base_dtype)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else describe(plan, expert_format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="meswitch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"meswitch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="summarise checkpoints (file, directory or sharded)")
    inspect.add_argument("paths", nargs="+", metavar="PATH", type=existing_path,
                         help="checkpoint file, index or directory, or a NAME.meswitch artifact")
    inspect.add_argument("--tensors", action="store_true", help="list every tensor")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--plot", metavar="PNG", help="artifact: plot the error per layer to this file")
    inspect.set_defaults(func=_run_inspect)

    compress = commands.add_parser("compress", help="compress an expert against its base into NAME.meswitch")
    compress.add_argument("--base", required=True, type=existing_dir, help="base model directory")
    compress.add_argument("--expert", required=True, type=existing_dir, help="fine-tuned expert directory")
    compress.add_argument("--out", required=True, help="artifact directory, e.g. math.meswitch")
    compress.add_argument("--calib", type=existing_file,
                          help="calibration text (.jsonl with 'text', or blank-line separated text)")
    compress.add_argument("--bits", type=int_in(1, 4), default=2, help="bits per low-bit code, 1-4 (default 2)")
    compress.add_argument("--group-size", type=int_in(0), default=64, help="group size, 0 = whole row (default 64)")
    compress.add_argument("--ragged-groups", action=argparse.BooleanOptionalAction, default=True,
                          help="allow a shorter last group where the group size does not divide the width "
                               "(default); --no-ragged-groups makes that an error")
    compress.add_argument("--salient", type=salient, default="1%",  # argparse parses a string default too
                          help="salient channels per matrix: a percentage of its columns ('1%%', '100%%' = all) "
                               "or a whole number of channels ('8')")
    compress.add_argument("--avg-bits", type=float_in(1, 6),
                          help="budget: average bits per delta parameter, 1-6 (planner)")
    compress.add_argument("--vocab-bits", type=int_in(1, 4),
                          help="bits for the embedding and lm_head deltas, 1-4 (default: --bits)")
    compress.add_argument("--clip-grid", type=int_in(1), default=1,
                          help="step-size search points; 1 (default) keeps the full range")
    compress.add_argument("--min-clip", type=float_in(0, 1, low_open=True), default=0.5,
                          help="smallest clip ratio searched, in (0, 1]")
    compress.add_argument("--method", choices=("gptq", "rtn"), default="gptq",
                          help="gptq (default): error-compensating quantization with the calibration Hessians of "
                               "--calib (each linear's input; the Fisher at the embedding's output), spilled beside "
                               "--out while compressing (round to nearest without --calib); rtn: round every value "
                               "to nearest")
    compress.add_argument("--damping", type=float_in(0, low_open=True), default=0.01,
                          help="GPTQ: damping added to the Hessian's diagonal, times its mean (default 0.01)")
    compress.add_argument("--act-order", action="store_true",
                          help="GPTQ: quantize the most active input channels first")
    compress.add_argument("--refine-steps", type=int_in(0), default=0,
                          help="learnable step sizes: Adam steps training the scales end to end on --calib (default 0)")
    compress.add_argument("--refine-lr", type=float_in(0, low_open=True), default=1e-2,
                          help="learning rate of the scale multipliers")
    compress.add_argument("--max-shard-bytes", type=size, default=128 << 20, metavar="SIZE",
                          help="most tensor bytes per artifact shard: bytes, or with a unit: 64MB, 64MiB, 1GiB "
                               "(default 128MiB)")
    compress.add_argument("--name", help="expert name (default: expert directory name)")
    compress.add_argument("--domain", help="domain description stored in the manifest")
    compress.add_argument("--force", action="store_true", help="replace an earlier output of this command")
    compress.add_argument("--quiet", action="store_true", help="no progress bar")
    compress.set_defaults(func=_run_compress)

    decompress = commands.add_parser("decompress", help="write base + dequantized delta as a HF model directory")
    decompress.add_argument("--base", required=True, type=existing_dir, help="base model directory")
    decompress.add_argument("--artifact", required=True, type=existing_dir, help="NAME.meswitch artifact directory")
    decompress.add_argument("--out", required=True, help="model directory to write")
    decompress.add_argument("--force", action="store_true", help="replace an earlier output of this command")
    decompress.set_defaults(func=_run_decompress)

    demo = commands.add_parser("demo", help="the main job on the bundled tiny expert family")
    demo.add_argument("--family", type=existing_dir, help="family directory (default: the bundled one)")
    demo.add_argument("--workdir", default="meswitch-demo", help="where the artifacts go (default ./meswitch-demo)")
    demo.add_argument("--max-examples", type=positive_int, default=40,
                      help="held-out examples per domain, a positive whole number (default 40)")
    demo.set_defaults(func=_run_demo)

    plan = commands.add_parser("plan", help="how many compressed experts fit in an accelerator's memory",
                               description="Count the experts that fit beside the base, the KV cache and a reserve, "
                                           "from the artifact format's byte counts.")
    base = plan.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", type=existing_path, help="base model directory or config.json (exact shapes)")
    base.add_argument("--base-params", type=float_in(1), metavar="N",
                      help="the base's parameter count, e.g. 7e9 (per-parameter estimate)")
    plan.add_argument("--gpu-mem", type=size, required=True, metavar="SIZE", help="accelerator memory, e.g. 80GB")
    plan.add_argument("--kv-budget", type=size_or_zero, default=0, metavar="SIZE", help="KV cache bytes (default 0)")
    plan.add_argument("--reserve", type=size_or_zero, default=0, metavar="SIZE",
                      help="bytes kept for activations and the runtime (default 0)")
    plan.add_argument("--base-dtype", choices=("f16", "bf16", "f32"), default="f16", help="how the base is held")
    plan.add_argument("--bits", type=int_in(1, 4), default=2, help="bits per low-bit code, 1-4 (default 2)")
    plan.add_argument("--group-size", type=int_in(0), default=64, help="group size, 0 = whole row (default 64)")
    plan.add_argument("--salient", type=salient, default="1%", help="salient channels per matrix ('1%%' or '8')")
    plan.add_argument("--vocab-bits", type=int_in(1, 4), help="bits of the embedding and lm_head deltas")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_run_plan)

    try:
        from meswitch.evaluation import register_cli as register_eval
    except ImportError:  # evaluation needs torch/transformers; the rest of the CLI does not
        register_eval = None
    if register_eval is not None:
        register_eval(commands)
    from meswitch.route.cli import register_cli as register_route

    register_route(commands)
    from meswitch.serve.server.cli import register_cli as register_serve

    register_serve(commands)
    return parser


def _is_user_error(error: BaseException) -> bool:
    """Whether ``error`` reports bad input (one line, exit 1) rather than a bug (traceback)."""
    if isinstance(error, (OSError, ValueError)):  # meswitch.FormatError is a ValueError
        return True
    core = sys.modules.get("meswitch._core")
    return core is not None and isinstance(error, core.FormatError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    # Model loading draws its own bars (transformers); compress has one of its own and the
    # others would leave lines on stderr around an error message.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as stop:  # --help, --version and usage errors
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else USAGE_ERROR)
    prog = f"{parser.prog} {args.command}"
    if unknown:  # named here, where the subcommand they were given to is known
        report_error(prog, UsageError(f"unrecognized arguments: {' '.join(unknown)}"))
        return USAGE_ERROR
    try:
        return int(args.func(args) or 0)
    except UsageError as error:
        report_error(prog, error)
        return USAGE_ERROR
    except KeyboardInterrupt:
        report_error(prog, KeyboardInterrupt("interrupted"))
        return 130
    except Exception as error:  # user-facing errors without a traceback; a bug still shows one
        if _is_user_error(error):
            report_error(prog, error)
            return INPUT_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
