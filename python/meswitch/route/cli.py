"""Command line: ``meswitch route``, ``meswitch router train``, ``meswitch router eval``."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _one_line_errors(prog: str, func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """User errors end in one line on stderr, ``meswitch route: error: ...``, and exit status 1."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, OSError) as error:  # meswitch.FormatError is a ValueError
            message = " ".join(str(error).split()) or type(error).__name__
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 1

    return run


def _expert_files(pairs: list[str]) -> dict[str, str]:
    files: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--expert takes NAME=FILE, not {pair!r}")
        if name in files:
            raise ValueError(f"--expert {name} is given twice")
        files[name] = path
    return files


def _run_route(args: argparse.Namespace) -> int:
    from meswitch.route.router import Router

    experts = None if args.experts is None else [e for e in args.experts.split(",") if e]
    router = Router(args.router, experts=experts)
    if args.messages is not None:
        source = sys.stdin.read() if args.messages == "-" else Path(args.messages).read_text(encoding="utf-8")
        try:
            query: Any = json.loads(source)
        except json.JSONDecodeError as error:
            raise ValueError(f"{args.messages}: not valid JSON ({error.msg})") from None
    elif not args.text or args.text == ["-"]:
        query = sys.stdin.buffer.read()
    else:
        query = " ".join(args.text)
    result = router.route(query)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(describe(result, router.threshold))
    return 0


def describe(result: Any, threshold: float) -> str:
    """One line: ``EXPERT CONFIDENCE`` when the router placed the query; when it fell back,
    the fallback and why, with its best guess (``chat (fallback: code 0.782 is below the
    threshold 0.799)``), so a fallback never reads as confidence in the fallback."""
    if not result.fallback:
        return f"{result.expert} {result.confidence:.3f}"
    if result.label is None:
        return f"{result.expert} (fallback: nothing to route on)"
    return (f"{result.expert} (fallback: {result.label} {result.confidence:.3f} is below the threshold "
            f"{threshold:.3f})")


def _run_train(args: argparse.Namespace) -> int:
    from meswitch.route.features import DEFAULT_FEATURIZER
    from meswitch.route.train import read_examples, train_router

    files = _expert_files(args.expert)
    if len(files) < 2:
        raise ValueError("give at least two experts: --expert NAME=FILE --expert NAME=FILE")
    examples = {name: read_examples(path) for name, path in files.items()}
    featurizer = {**DEFAULT_FEATURIZER, "hash_bits": args.hash_bits}
    summary = train_router(examples, args.out, fallback=args.fallback, featurizer=featurizer,
                           heldout_fraction=args.heldout_fraction, keep=args.keep, regularization=args.C,
                           force=args.force, sources=files)
    split = summary["metrics"]["heldout_split"]
    print(f"wrote {args.out}: labels {', '.join(summary['labels'])}; held-out split accuracy "
          f"{split['accuracy']:.2%} on {split['examples']} examples; threshold {summary['threshold']:.3f} "
          f"(fallback '{args.fallback}', {split['fallback_rate']:.1%} of the split)")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from meswitch.family import family_dir
    from meswitch.family.train import REPO_ROOT
    from meswitch.route import evaluate
    from meswitch.route.router import Router

    router = Router(args.router)
    sets = evaluate.heldout_sets(args.data_root or REPO_ROOT)
    results: dict[str, Any] = {"router": evaluate.evaluate_router(router, sets), "router_path": str(router.path)}
    if args.fasttext or args.probe:
        files = _expert_files(args.train) if args.train else None
        if files is None:
            raise ValueError("--fasttext and --probe train on the router's training files: give --train NAME=FILE ...")
        train = evaluate.training_split(files, router.training.get("heldout_fraction", 0.1))
        if args.fasttext:
            results["fasttext"] = evaluate.evaluate_fasttext(train, sets, router.labels)
        if args.probe:
            results["probe"] = evaluate.evaluate_probe(args.base or family_dir() / "base", train, sets)
    table = evaluate.markdown(results)
    print(table, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        evaluate.plot_confusions(results["router"], args.plot, f"router {router.path.parent.name}/{router.path.name}: held-out sets")
    return 0


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Add ``route`` and ``router {train,eval}`` to the ``meswitch`` subcommands."""
    route = commands.add_parser("route", help="which expert should answer this text (prints EXPERT CONFIDENCE, "
                                "or the fallback and the best guess below the threshold)",
                                description="Route a query with a router (default: the bundled one).")
    route.add_argument("text", nargs="*", help="the query; none or '-' reads it from stdin")
    route.add_argument("--router", type=Path, default=None, help="router directory (default: bundled)")
    route.add_argument("--json", action="store_true", help="print expert, confidence and probabilities as JSON")
    route.add_argument("--messages", metavar="FILE",
                       help="route a chat request: a JSON message list or request body ('-': stdin), on its user turns")
    route.add_argument("--experts", metavar="A,B,...", help="the served experts; refuse a router that needs others")
    route.set_defaults(func=_one_line_errors("meswitch route", _run_route))

    router = commands.add_parser("router", help="train and evaluate routers")
    sub = router.add_subparsers(dest="router_command", required=True)
    train = sub.add_parser("train", help="train a router on example files per expert",
                           description="Train a router: hashed n-grams + class-balanced logistic regression.")
    train.add_argument("--expert", action="append", required=True, metavar="NAME=FILE",
                       help="examples of one expert: .jsonl (text/question/prompt/messages) or text, one per line")
    train.add_argument("--out", type=Path, required=True, help="router directory to write")
    train.add_argument("--fallback", required=True, metavar="EXPERT",
                       help="the expert that takes what the router cannot place (below its threshold): "
                            "usually the general chat expert; 'base' only if the base model should answer them")
    train.add_argument("--hash-bits", type=int, default=18, help="2^B feature buckets (default 18)")
    train.add_argument("--heldout-fraction", type=float, default=0.1, help="held-out split (default 0.1)")
    train.add_argument("--keep", type=float, default=0.99,
                       help="share of correct held-out routes kept above the threshold (default 0.99)")
    train.add_argument("-C", type=float, default=10.0, help="inverse L2 regularisation (default 10)")
    train.add_argument("--force", action="store_true", help="replace an existing router at --out")
    train.set_defaults(func=_one_line_errors("meswitch router train", _run_train))

    evaluate = sub.add_parser("eval", help="held-out accuracy on GSM8K, HumanEval, chitchat and instructions",
                              description="Evaluate a router on the held-out query sets (meswitch.route.evaluate).")
    evaluate.add_argument("--router", type=Path, default=None, help="router directory (default: bundled)")
    evaluate.add_argument("--data-root", type=Path, default=None, help="repository holding data/ (default: this one)")
    evaluate.add_argument("--train", action="append", metavar="NAME=FILE", help="the router's training files")
    evaluate.add_argument("--fasttext", action="store_true", help="also train and evaluate the fasttext package")
    evaluate.add_argument("--probe", action="store_true", help="also fit and evaluate the hidden-state probe")
    evaluate.add_argument("--base", type=Path, default=None, help="base model for --probe (default: tiny base)")
    evaluate.add_argument("--json", type=Path, help="write all results as JSON")
    evaluate.add_argument("--plot", type=Path, help="write the confusion matrices as a PNG")
    evaluate.set_defaults(func=_one_line_errors("meswitch router eval", _run_eval))


__all__ = ["register_cli"]
