"""Train the tiny expert family: one base model and three full fine-tunes.

Run as::

    PYTHONPATH=python python -m meswitch.family.train --out python/meswitch/family/tiny

The script

1. builds three text domains (chat, math, code) and sets their held-out splits apart,
2. trains a byte-level BPE tokenizer on a sample of all three,
3. pretrains a small Llama base model on a mixture of the domains,
4. fine-tunes every parameter of a copy of the base on each domain separately,
5. saves every model in float16 safetensors with its tokenizer.

Split rules (held-out data is written to ``--heldout`` and never trained on):

* chat: a chitchat dialogue is held out when ``sha256(dialogue_id) % 10 == 0``;
  the first 200 of those, ordered by hash, are written out.
* math: generated problems use an independent random stream and any question that
  also occurs in the training stream is dropped; GSM8K *test* problems are only ever
  evaluated, GSM8K *train* problems are only ever trained on.
* code: a standard-library file is held out when ``sha256(relative_path) % 10 == 0``;
  snippets of at most 40 lines (at most 3 per file) are cut from those files.

Every random choice is driven by ``--seed``, so two runs on the same machine and
library versions produce the same data, tokenizer and (up to floating-point
non-determinism of the BLAS library) the same weights.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[3]
PACKAGE_DIR = Path(__file__).resolve().parent

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DOMAINS = ("chat", "math", "code")


def stable_hash(key: str) -> int:
    """Return a platform-independent integer hash of ``key``.

    Python's built-in ``hash`` is salted per process, so it cannot define splits.
    """
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


# --------------------------------------------------------------------------- chat


def render_dialogue(turns: Sequence[dict[str, str]]) -> str:
    """Render a dialogue as the chat expert sees it.

    Parameters
    ----------
    turns
        ``[{"role": "user" | "assistant", "content": str}, ...]``.

    Returns
    -------
    str
        One ``<|role|>content<|end|>`` line per turn.
    """
    return "".join(f"<|{t['role']}|>{t['content']}<|end|>\n" for t in turns)


def load_chat(max_heldout: int = 200) -> tuple[list[str], list[dict]]:
    """Load chitchat dialogues and split them into training texts and held-out records."""
    import chitchat_dataset

    dataset = chitchat_dataset.Dataset()
    train: list[str] = []
    heldout: list[tuple[int, dict]] = []
    for key in sorted(dataset.keys()):
        turns = []
        for index, group in enumerate(dataset[key]["messages"]):
            content = "\n".join(m["text"].strip() for m in group if m["text"].strip())
            if content:
                # The dialogue opener plays the user; speakers alternate by turn group.
                turns.append({"role": "user" if index % 2 == 0 else "assistant", "content": content})
        if len(turns) < 2:
            continue
        h = stable_hash(key)
        if h % 10 == 0:
            heldout.append((h, {"id": key, "turns": turns, "text": render_dialogue(turns)}))
        else:
            train.append(render_dialogue(turns))
    heldout.sort(key=lambda item: item[0])
    return train, [record for _, record in heldout[:max_heldout]]


# --------------------------------------------------------------------------- math

_NAMES = (
    "Ava", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Umar",
)
_ITEMS = (
    "apples", "books", "marbles", "stickers", "pencils", "cookies", "cards", "shells",
    "coins", "stamps", "eggs", "flowers", "toys", "balloons", "candies", "rocks",
)


def generate_problem(rng: random.Random) -> dict[str, str | int]:
    """Generate one arithmetic word problem with an exact integer answer.

    The answer spells out the computation and ends with ``#### <number>`` like GSM8K.
    """
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        c = a + b
        q = f"{name} has {a} {item}. {other} gives {name} {b} more {item}. How many {item} does {name} have now?"
        a_text = f"{name} has {a} + {b} = {c} {item} now."
    elif kind == 1:
        a = rng.randint(2, 40)
        b = rng.randint(1, a - 1)
        c = a - b
        q = f"{name} has {a} {item}. {name} gives {b} {item} to {other}. How many {item} does {name} have left?"
        a_text = f"{name} has {a} - {b} = {c} {item} left."
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = a * b
        q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?"
        a_text = f"{name} buys {a} * {b} = {c} {item}."
    else:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        s = a + b
        d = rng.randint(1, s - 1)
        c = s - d
        q = (
            f"{name} has {a} {item} and finds {b} more. Then {name} gives {d} {item} to {other}. "
            f"How many {item} does {name} have now?"
        )
        a_text = f"{name} has {a} + {b} = {s} {item}. After giving {d} away, {s} - {d} = {c} {item} are left."
    return {"question": q, "answer": f"{a_text}\n#### {c}", "final": c}


def clean_gsm8k_answer(answer: str) -> str:
    """Drop GSM8K calculator annotations (``<<48/2=24>>``), which carry no extra information."""
    return re.sub(r"<<[^>]*>>", "", answer)


def math_text(question: str, answer: str) -> str:
    """Render a math problem; the prompt at evaluation time is ``question + "\\n"``."""
    return f"{question}\n{answer}"


def load_math(
    gsm8k_dir: Path, seed: int, n_generated: int = 20000, n_heldout_generated: int = 150, n_heldout_gsm8k: int = 50
) -> tuple[list[str], list[dict]]:
    """Build math training texts and held-out problems."""
    rng = random.Random(seed * 1000 + 1)
    generated = [generate_problem(rng) for _ in range(n_generated)]
    seen = {p["question"] for p in generated}
    train = [math_text(str(p["question"]), str(p["answer"])) for p in generated]
    with open(gsm8k_dir / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            train.append(math_text(row["question"], clean_gsm8k_answer(row["answer"])))

    heldout: list[dict] = []
    rng_heldout = random.Random(seed * 1000 + 2)
    while len(heldout) < n_heldout_generated:
        p = generate_problem(rng_heldout)
        if p["question"] in seen:
            continue
        seen.add(str(p["question"]))
        heldout.append({"source": "generated", "question": p["question"], "answer": p["answer"], "final": p["final"]})
    with open(gsm8k_dir / "test.jsonl", encoding="utf-8") as f:
        for line, _ in zip(f, range(n_heldout_gsm8k)):
            row = json.loads(line)
            answer = clean_gsm8k_answer(row["answer"])
            final = int(answer.rsplit("####", 1)[1].strip().replace(",", ""))
            heldout.append({"source": "gsm8k", "question": row["question"], "answer": answer, "final": final})
    for record in heldout:
        record["text"] = math_text(record["question"], record["answer"])
    return train, heldout


# --------------------------------------------------------------------------- code


def stdlib_files() -> list[tuple[str, Path]]:
    """Return ``(relative_path, path)`` for the interpreter's pure-Python stdlib, ordered by path hash."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        files.append((rel, path))
    files.sort(key=lambda item: (stable_hash(item[0]), item[0]))
    return files


def _read_source(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def load_code(
    max_train_chars: int = 6_000_000, chunk_lines: int = 60, n_heldout: int = 150
) -> tuple[list[str], list[dict]]:
    """Cut stdlib files into training chunks and held-out snippets."""
    train: list[str] = []
    heldout: list[dict] = []
    train_chars = 0
    for rel, path in stdlib_files():
        text = _read_source(path)
        if text is None or len(text) > 400_000:
            continue
        lines = text.splitlines(keepends=True)
        if stable_hash(rel) % 10 == 0:
            for start in range(0, len(lines), 40):
                snippet = "".join(lines[start : start + 40])
                if len(heldout) >= n_heldout or start >= 120:
                    break
                if snippet.strip():
                    heldout.append({"path": rel, "first_line": start + 1, "text": snippet})
        elif train_chars < max_train_chars:
            for start in range(0, len(lines), chunk_lines):
                chunk = "".join(lines[start : start + chunk_lines])
                if chunk.strip():
                    train.append(chunk)
                    train_chars += len(chunk)
    return train, heldout


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer that splits numbers into single digits.

    Single-digit tokens keep arithmetic learnable: with merged digit groups the same
    number is tokenized differently depending on its neighbours.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, model_max_length=512
    )


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Save the tokenizer in Hugging Face format, including ``special_tokens_map.json``."""
    tokenizer.save_pretrained(directory)
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}
    extra = [t for t in tokenizer.all_special_tokens if t not in (EOS, PAD)]
    if extra:
        special["additional_special_tokens"] = extra
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Hyper-parameters of one training phase."""

    steps: int
    lr: float
    warmup: int
    batch_size: int
    seq_len: int
    weight_decay: float = 0.1


@dataclass(frozen=True)
class ExpertRecipe:
    """How one expert is fine-tuned from the base: every parameter, on its own domain only."""

    steps: int
    lr: float
    seq_len: int
    batch_size: int


# Every recipe sees 4096 tokens per step. Chat dialogues are long (a held-out dialogue
# averages about 360 tokens), so the chat expert trains on 512-token blocks: the base's
# 128-token blocks leave the later positions of a conversation untrained, and chitchat
# English is otherwise close to what the base already saw in pretraining.
EXPERT_RECIPES = {
    "chat": ExpertRecipe(steps=600, lr=1e-3, seq_len=512, batch_size=8),
    "math": ExpertRecipe(steps=300, lr=3e-4, seq_len=128, batch_size=32),
    "code": ExpertRecipe(steps=300, lr=3e-4, seq_len=128, batch_size=32),
}


def to_blocks(tokenizer, texts: Sequence[str], seq_len: int, seed: int) -> torch.Tensor:
    """Tokenize ``texts`` in a seeded order into one EOS-separated stream cut into ``seq_len`` blocks."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    ids = tokenizer([texts[i] for i in order], add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for doc in ids:
        stream.append(tokenizer.eos_token_id)
        stream.extend(doc)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def train_phase(
    model, pools: Sequence[torch.Tensor], cfg: TrainConfig, seed: int, desc: str
) -> list[float]:
    """Train ``model`` in place on blocks drawn uniformly per domain pool, then per block.

    Returns
    -------
    list of float
        The training loss of every step.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, dynamic_ncols=True)
    for step in bar:
        which = torch.randint(len(pools), (cfg.batch_size,), generator=gen)
        rows = [pools[int(w)][int(torch.randint(len(pools[int(w)]), (1,), generator=gen))] for w in which]
        batch = torch.stack(rows)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


def save_model(model, tokenizer, directory: Path, max_shard_size: str | None = None) -> None:
    """Save a float16 copy of ``model`` plus its tokenizer to ``directory``."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    half = copy.deepcopy(model).half()
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    half.save_pretrained(directory, **kwargs)
    save_tokenizer(tokenizer, directory)


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR / "tiny", help="family output directory")
    parser.add_argument("--heldout", type=Path, default=None, help="held-out output directory (default: OUT/../heldout)")
    parser.add_argument("--gsm8k", type=Path, default=REPO_ROOT / "data" / "gsm8k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--base-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32, help="base pretraining batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=128, help="base pretraining sequence length")
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument(
        "--experts",
        nargs="+",
        choices=DOMAINS,
        default=list(DOMAINS),
        help="experts to fine-tune (default: all); a subset needs --reuse-base",
    )
    parser.add_argument("--expert-steps", type=int, default=None, help="override every recipe's step count")
    parser.add_argument("--expert-lr", type=float, default=None, help="override every recipe's peak learning rate")
    parser.add_argument(
        "--reuse-base",
        action="store_true",
        help="load OUT/base instead of pretraining it (the experts come out identical)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if set(args.experts) != set(DOMAINS) and not args.reuse_base:
        # A new base with only some experts retrained would leave the others stale.
        parser.error("--experts with a subset of the experts needs --reuse-base")

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    heldout_dir = args.heldout or args.out.parent / "heldout"

    print("building corpora ...", flush=True)
    chat_train, chat_heldout = load_chat()
    math_train, math_heldout = load_math(args.gsm8k, args.seed)
    code_train, code_heldout = load_code()
    corpora = {"chat": chat_train, "math": math_train, "code": code_train}
    for name, records in (("chat", chat_heldout), ("math", math_heldout), ("code", code_heldout)):
        write_jsonl(heldout_dir / f"{name}.jsonl", records)
    for name in DOMAINS:
        print(f"  {name}: {len(corpora[name])} training documents, "
              f"{sum(map(len, corpora[name])) / 1e6:.1f} M characters", flush=True)

    # A capped, domain-balanced sample keeps tokenizer training fast.
    sample_rng = random.Random(args.seed)
    tok_sample: list[str] = []
    for name in DOMAINS:
        docs = corpora[name][:]
        sample_rng.shuffle(docs)
        chars = 0
        for doc in docs:
            if chars > 3_000_000:
                break
            tok_sample.append(doc)
            chars += len(doc)
    tokenizer = train_tokenizer(tok_sample, args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens", flush=True)

    pools = {name: to_blocks(tokenizer, corpora[name], args.seq_len, args.seed + i) for i, name in enumerate(DOMAINS)}
    for name, blocks in pools.items():
        print(f"  {name}: {blocks.numel() / 1e6:.2f} M training tokens", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(config)
    base.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    n_params = sum(p.numel() for p in base.parameters())
    print(f"base: {n_params / 1e6:.2f} M parameters, intermediate {config.intermediate_size}", flush=True)

    timings: dict[str, float] = {}
    final_loss: dict[str, float] = {}
    if args.reuse_base:
        base = LlamaForCausalLM.from_pretrained(args.out / "base", dtype=torch.float32)
        timings["base"] = 0.0
    else:
        t0 = time.time()
        base_cfg = TrainConfig(
            args.base_steps, args.base_lr, max(1, args.base_steps // 12), args.batch_size, args.seq_len
        )
        losses = train_phase(base, [pools[n] for n in DOMAINS], base_cfg, args.seed, "base")
        timings["base"], final_loss["base"] = time.time() - t0, sum(losses[-20:]) / len(losses[-20:])
        save_model(base, tokenizer, args.out / "base")
        # Experts start from the shipped float16 base, so expert minus base is exactly
        # what fine-tuning learned (no float32-to-float16 rounding hides in the delta).
        base = base.half().float()

    params: dict[str, int] = {"base": n_params}
    for i, name in enumerate(DOMAINS):
        if name not in args.experts:
            continue
        recipe = EXPERT_RECIPES[name]
        steps = args.expert_steps or recipe.steps
        expert_cfg = TrainConfig(
            steps, args.expert_lr or recipe.lr, max(1, steps // 10), recipe.batch_size, recipe.seq_len
        )
        t0 = time.time()
        expert = copy.deepcopy(base)
        expert_tokenizer = tokenizer
        if name == "chat":
            # Role markers become single tokens; the new embedding rows start at the mean.
            expert_tokenizer = copy.deepcopy(tokenizer)
            expert_tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
            expert_tokenizer.chat_template = CHAT_TEMPLATE
            torch.manual_seed(args.seed + 100)  # the resize samples the new rows
            expert.resize_token_embeddings(len(expert_tokenizer))
        if expert_tokenizer is tokenizer and recipe.seq_len == args.seq_len:
            pool = pools[name]
        else:
            pool = to_blocks(expert_tokenizer, corpora[name], recipe.seq_len, args.seed + i)
        print(f"{name}: {steps} steps of {recipe.batch_size} x {recipe.seq_len} tokens, "
              f"peak lr {expert_cfg.lr:g}", flush=True)
        losses = train_phase(expert, [pool], expert_cfg, args.seed + 10 + i, name)
        timings[name], final_loss[name] = time.time() - t0, sum(losses[-20:]) / len(losses[-20:])
        params[name] = sum(p.numel() for p in expert.parameters())
        save_model(expert, expert_tokenizer, args.out / name, max_shard_size="6MB" if name == "code" else None)

    total = time.time() - t_start
    summary = {
        "seconds_total": round(total, 1),
        "seconds_per_phase": {k: round(v, 1) for k, v in timings.items()},
        "final_train_loss": {k: round(v, 4) for k, v in final_loss.items()},
        "parameters": params,
        "bytes": {name: dir_size(args.out / name) for name in ("base", *DOMAINS)},
        "family_bytes": dir_size(args.out),
        "heldout": {"chat": len(chat_heldout), "math": len(math_heldout), "code": len(code_heldout)},
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
