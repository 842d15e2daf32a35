"""The tiny family's domain training data as router training files, and the bundled router.

Only what the experts were trained on is used, never their held-out data nor the evaluation
sets: the chitchat dialogues outside the held-out hash bucket (each user turn one example),
the GSM8K training questions and generated problems from the training stream (questions only,
as users ask them), and the standard-library files outside the held-out bucket cut into
20-line snippets. See ``python/meswitch/family/README.md`` for the splits.

``python -m meswitch.route.family_data --out DIR`` writes ``DIR/{chat,math,code}.jsonl``;
``--router`` also trains the bundled router from them.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

SNIPPET_LINES = 20
MAX_PER_EXPERT = 12000
#: The bundled router's fallback: the general chat expert answers what it cannot place.
FALLBACK = "chat"


def _sample(texts: list[str], limit: int, seed: int) -> list[str]:
    texts = list(dict.fromkeys(t for t in texts if t.strip()))
    random.Random(seed).shuffle(texts)
    return texts[:limit]


def chat_examples(limit: int = MAX_PER_EXPERT) -> list[str]:
    """User turns of the chat expert's training dialogues."""
    import chitchat_dataset

    from meswitch.family.train import stable_hash

    dataset = chitchat_dataset.Dataset()
    turns = []
    for key in sorted(dataset.keys()):
        if stable_hash(key) % 10 == 0:  # the family's held-out dialogues
            continue
        for index, group in enumerate(dataset[key]["messages"]):
            content = "\n".join(m["text"].strip() for m in group if m["text"].strip())
            if content and index % 2 == 0:  # the opener plays the user
                turns.append(content)
    return _sample(turns, limit, 1)


def math_examples(repo_root: Path, limit: int = MAX_PER_EXPERT) -> list[str]:
    """GSM8K training questions and generated problems of the math expert's training stream."""
    from meswitch.family.train import generate_problem

    rng = random.Random(0 * 1000 + 1)  # the training stream of family.train.load_math (seed 0)
    generated = [str(generate_problem(rng)["question"]) for _ in range(20000)]
    with open(repo_root / "data" / "gsm8k" / "train.jsonl", encoding="utf-8") as stream:
        gsm8k = [json.loads(line)["question"] for line in stream]
    return gsm8k + _sample(generated, max(0, limit - len(gsm8k)), 2)


_DOCSTRING = re.compile(r'(?:"""|\'\'\')(.*?)(?:"""|\'\'\')', re.DOTALL)


def code_examples(limit: int = MAX_PER_EXPERT) -> list[str]:
    """20-line snippets of the code expert's training chunks (standard-library files), and their docstrings.

    The docstrings are the part of the code data written in prose about code ("Return a list
    of ..."), the closest the training data comes to a request for code.
    """
    from meswitch.family.train import load_code

    chunks, _ = load_code()
    snippets, docstrings = [], []
    for chunk in chunks:
        lines = chunk.splitlines(keepends=True)
        snippets += ["".join(lines[i : i + SNIPPET_LINES]) for i in range(0, len(lines), SNIPPET_LINES)]
        for match in _DOCSTRING.finditer(chunk):
            paragraph = match.group(1).strip().split("\n\n")[0]
            if len(paragraph) >= 20 and any(c.isalpha() for c in paragraph):
                docstrings.append(" ".join(paragraph.split()))
    docstrings = _sample(docstrings, limit // 3, 4)
    return _sample(snippets, limit - len(docstrings), 3) + docstrings


def write_family_data(out: Path, repo_root: Path) -> dict[str, Path]:
    """Write ``out/{chat,math,code}.jsonl`` (``{"text": ...}`` per line) and return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"chat": chat_examples(), "math": math_examples(repo_root), "code": code_examples()}
    paths = {}
    for name, texts in data.items():
        paths[name] = out / f"{name}.jsonl"
        with open(paths[name], "w", encoding="utf-8") as stream:
            stream.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Write the family's router training data; with ``--router DIR``, train the bundled router too."""
    from meswitch.family.train import REPO_ROOT
    from meswitch.route.train import read_examples, train_router

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for chat/math/code.jsonl")
    parser.add_argument("--router", type=Path, help="also train a router here (the bundled one: "
                        "python/meswitch/family/router)")
    args = parser.parse_args(argv)
    paths = write_family_data(args.out, REPO_ROOT)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.router:
        summary = train_router({n: read_examples(p) for n, p in paths.items()}, args.router, force=True,
                               fallback=FALLBACK,
                               sources={n: f"meswitch.route.family_data ({p.name})" for n, p in paths.items()})
        print(json.dumps(summary["metrics"]["heldout_split"]["accuracy"]), "held-out split accuracy;",
              f"threshold {summary['threshold']:.3f}")


if __name__ == "__main__":
    main()
