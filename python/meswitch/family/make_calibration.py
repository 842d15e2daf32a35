"""Write small calibration sets for compression, drawn from the *training* splits only.

Run as ``PYTHONPATH=python python -m meswitch.family.make_calibration``; writes
``calib/{chat,math,code}.jsonl`` next to this file (64 texts each, every n-th
training text, so the held-out evaluation data never leaks into calibration).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meswitch.family import train

PACKAGE_DIR = Path(__file__).resolve().parent


def evenly_spaced(texts: list[str], count: int) -> list[str]:
    step = max(1, len(texts) // count)
    return texts[::step][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR / "calib")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the seed the family was trained with")
    args = parser.parse_args()
    chat, _ = train.load_chat()
    math, _ = train.load_math(train.REPO_ROOT / "data" / "gsm8k", args.seed)
    code, _ = train.load_code()
    args.out.mkdir(parents=True, exist_ok=True)
    for domain, texts in (("chat", chat), ("math", math), ("code", code)):
        records = [{"text": text} for text in evenly_spaced(texts, args.count)]
        train.write_jsonl(args.out / f"{domain}.jsonl", records)
        print(f"{domain}: {len(records)} texts -> {args.out / f'{domain}.jsonl'}")


if __name__ == "__main__":
    main()
