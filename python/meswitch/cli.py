"""The ``meswitch`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from meswitch import __version__


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
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
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
    summaries = [describe_checkpoint(path) for path in args.paths]
    if args.json:
        print(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=2))
        return 0
    for summary in summaries:
        _print_summary(summary, args.tensors)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from meswitch.family import family_dir

    root = Path(args.family) if args.family else family_dir()
    models = sorted(p for p in root.iterdir() if (p / "config.json").is_file())
    if not models:
        print(f"error: no models under {root}", file=sys.stderr)
        return 1
    print(f"meswitch {__version__}: bundled expert family at {root}\n")
    for model in models:
        _print_summary(describe_checkpoint(model), list_tensors=False)
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meswitch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meswitch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="summarise checkpoints (file, directory or sharded)")
    inspect.add_argument("paths", nargs="+", help="checkpoint file, index or directory")
    inspect.add_argument("--tensors", action="store_true", help="list every tensor")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=_run_inspect)

    demo = commands.add_parser("demo", help="the main job on the bundled tiny expert family")
    demo.add_argument("--family", help="family directory (default: the bundled one)")
    demo.set_defaults(func=_run_demo)

    try:
        from meswitch.evaluation import register_cli as register_eval
    except ImportError:  # evaluation needs torch/transformers; the rest of the CLI does not
        register_eval = None
    if register_eval is not None:
        register_eval(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as error:  # report user-facing errors without a traceback
        from meswitch import _core

        if isinstance(error, (_core.FormatError, OSError)):
            print(f"meswitch: error: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
