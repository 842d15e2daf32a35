"""Compress an expert into a ``NAME.meswitch`` artifact: delta, salient channels, low-bit codes.

The loop streams tensor by tensor: it maps both checkpoints, forms one delta in
float32, chooses its salient channels and quantizes the rest (all in C++), queues
the packed pieces in the artifact writer (which flushes bounded shards) and lets
the pages of the source tensors go before moving on. Peak memory is therefore a
few copies of the largest tensor plus one shard, whatever the model size.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meswitch import __version__
from meswitch.arguments import parse_salient  # noqa: F401 -- re-exported: the setting's parser
from meswitch.checkpoint import Checkpoint, open_checkpoint
from meswitch.naming import is_delta_role, layer_index, tensor_role

#: Small files copied from the expert so that ``decompress`` yields a loadable HF model.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")

#: Source bytes widened per step when forming a large delta (bounds resident source pages).
_DELTA_BLOCK_BYTES = 16 << 20

#: Candidates the budget planner chooses from.
PLANNER_BITS = (1, 2, 3, 4)
PLANNER_SALIENT_FRACTIONS = (0.0, 0.005, 0.01, 0.02, 0.05)


def _quant_default(key: str) -> Any:
    """A default of the C++ ``QuantSpec``, the one source of the quantization defaults."""
    from meswitch import _core

    return _core.QUANT_DEFAULTS[key]


def _gptq_default(key: str) -> Any:
    """A default of the C++ ``GptqSpec``."""
    from meswitch import _core

    return _core.GPTQ_DEFAULTS[key]


#: Quantizers: round-to-nearest, and error-compensating GPTQ (include/meswitch/gptq.hpp).
METHODS = ("rtn", "gptq")


@dataclass
class CompressionSettings:
    """How every delta matrix is quantized (unless the budget planner chooses per matrix).

    Attributes
    ----------
    bits
        Bits per low-bit code, 1-4.
    group_size
        Input channels per scale/zero group: 32, 64, 128 ..., or 0 for the whole row.
    salient
        Salient input channels per matrix kept in 16 bit, as a fraction of its
        columns within [0, 1]: 0.01 = 1 %, 1.0 = every channel. A positive
        fraction keeps at least one channel.
    salient_channels
        An absolute number of salient channels per matrix (capped at its width);
        when set it replaces ``salient``. :func:`salient_count` turns the two into
        a matrix's channel count; :func:`parse_salient` reads ``"1%"`` or ``"8"``.
    clip_grid, min_clip
        Step-size search: clip ratios from 1 down to ``min_clip`` in ``clip_grid``
        steps. The default, 1, keeps the full range: on the bundled family the
        search lowers the activation-weighted error yet raises perplexity, because
        the clipped extremes are the fine-tune's largest changes (docs/results.md).
    avg_bits
        If set, the budget planner picks bits and salient count per matrix to
        minimise the total measured error at this average bits per delta parameter.
    vocab_bits
        Bits for the embedding and ``lm_head`` deltas; ``None`` uses ``bits``. Every
        error in ``lm_head`` lands directly on the logits.
    refine_steps, refine_lr
        Learnable step sizes: after quantizing, train one multiplier per scale group
        end to end against the FP16 expert on the calibration text for this many
        Adam steps (0 = off; needs calibration text). See ``meswitch.refine``.
    method
        ``"gptq"`` (the default): quantize each linear's delta column by column, pushing
        every column's error onto the columns not yet quantized, weighted by the
        calibration inputs' second moments ``H = E[x x^T]`` (``include/meswitch/gptq.hpp``).
        An embedding, which is looked up rather than multiplied, uses the empirical Fisher
        ``E[g g^T]`` of the loss gradient at its output instead. Matrices without a
        Hessian (everything without calibration text; an embedding tied to the output
        layer) are rounded to nearest, which is what GPTQ reduces to for ``H = I``.
        ``"rtn"``: round every value to nearest on its own.
    damping, act_order
        GPTQ settings: ``damping * mean(diag H)`` is added to the Hessian's diagonal;
        ``act_order`` quantizes the most active input channels first.
    ragged_groups
        Allow a shorter last group in matrices whose width ``group_size`` does not
        divide (the default, so every width works); ``False`` makes that an error
        naming the tensor.
    max_shard_bytes
        Upper bound on the tensor bytes of one artifact shard (a single larger tensor
        gets a shard of its own).

    ``bits``, ``group_size``, ``clip_grid``, ``min_clip`` and ``ragged_groups`` default
    to the C++ ``QuantSpec`` (``meswitch._core.QUANT_DEFAULTS``).
    """

    bits: int = field(default_factory=lambda: _quant_default("bits"))
    group_size: int = field(default_factory=lambda: _quant_default("group_size"))
    salient: float = 0.01
    salient_channels: int | None = None
    clip_grid: int = field(default_factory=lambda: _quant_default("clip_grid"))
    min_clip: float = field(default_factory=lambda: _quant_default("min_clip"))
    avg_bits: float | None = None
    vocab_bits: int | None = None
    refine_steps: int = 0
    refine_lr: float = 1e-2
    method: str = "gptq"
    damping: float = field(default_factory=lambda: _gptq_default("damping"))
    act_order: bool = field(default_factory=lambda: _gptq_default("act_order"))
    ragged_groups: bool = field(default_factory=lambda: _quant_default("ragged_groups"))
    max_shard_bytes: int = 128 << 20

    def validate(self) -> None:
        if self.bits not in (1, 2, 3, 4):
            raise ValueError(f"bits must be 1, 2, 3 or 4, got {self.bits}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (np.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"damping must be a finite number > 0, got {self.damping}")
        if self.vocab_bits is not None and self.vocab_bits not in (1, 2, 3, 4):
            raise ValueError(f"vocab_bits must be 1, 2, 3 or 4, got {self.vocab_bits}")
        if self.group_size < 0:
            raise ValueError(f"group size must be positive or 0 (whole row), got {self.group_size}")
        if self.salient_channels is not None and (isinstance(self.salient_channels, bool)
                                                  or not isinstance(self.salient_channels, int)):
            raise ValueError(f"salient_channels must be a whole number or None, got {self.salient_channels!r}")
        salient_count(self.salient, self.salient_channels, 1)  # raises ValueError for a fraction outside [0, 1] or a negative count
        if self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        if self.clip_grid < 1 or not 0 < self.min_clip <= 1:
            raise ValueError("clip_grid must be >= 1 and min_clip in (0, 1]")
        if self.refine_steps < 0 or self.refine_lr <= 0:
            raise ValueError(f"refine_steps must be >= 0 and refine_lr > 0, got {self.refine_steps}, {self.refine_lr}")
        if self.avg_bits is not None and not 1.0 <= self.avg_bits <= 6.0:
            raise ValueError(f"avg_bits must be within [1, 6], got {self.avg_bits}")


def salient_count(salient: float, salient_channels: int | None, cols: int) -> int:
    """Salient channels kept in a matrix with ``cols`` input channels.

    ``salient_channels`` (capped at ``cols``) when it is not ``None``, else the
    fraction ``salient`` of ``cols``, rounded, at least 1 when positive. The rule is
    the C++ one (``meswitch::salient_count``), so every caller counts alike.

    Raises
    ------
    ValueError
        ``salient`` outside [0, 1] or not finite, or a negative ``salient_channels``.
    """
    from meswitch import _core

    return int(_core.salient_count(float(salient), salient_channels, cols))


def compressed_bits(rows: int, cols: int, bits: int, group_size: int, k: int) -> int:
    """Storage of one compressed delta in bits: codes, f16 scales, u8 zeros, f16 salient values, i32 indices."""
    groups = 1 if group_size == 0 else -(-cols // group_size)  # the last group may be ragged
    words = (cols * bits + 31) // 32
    return rows * words * 32 + rows * groups * (16 + 8) + rows * k * 16 + k * 32


@dataclass
class MatrixResult:
    """One compressed delta: the stored pieces and what it cost."""

    pieces: dict[str, np.ndarray]
    bits: int
    group_size: int
    salient: int
    error: float  # activation-weighted squared error
    reference: float  # activation-weighted squared norm of the delta
    storage_bits: int


def compress_matrix(delta: np.ndarray, channel_weight: np.ndarray | None, *, bits: int, group_size: int,
                    k: int, clip_grid: int, min_clip: float, name: str, ragged_groups: bool = True,
                    hessian: np.ndarray | None = None, damping: float = 0.01,
                    act_order: bool = False) -> MatrixResult:
    """Salient selection + quantization of one float32 delta ``[rows, cols]`` (C++).

    With ``hessian`` (``E[x x^T]`` of the layer's input, float32 ``[cols, cols]``) the
    codes come from the error-compensating quantizer (GPTQ), else from round-to-nearest.
    Salient channels are chosen the same way for both: by ``channel_weight`` (``E[x^2]``,
    the Hessian's diagonal) times the column's round-to-nearest error.
    """
    from meswitch import _core

    rows, cols = delta.shape
    if k > 0:
        scores = _core.channel_error_scores(delta, channel_weight, bits, group_size, clip_grid, min_clip, name,
                                            ragged_groups)
        salient_idx = np.asarray(_core.select_salient_channels(scores, k), dtype=np.int32)
    else:
        salient_idx = np.zeros(0, dtype=np.int32)
    if hessian is not None:
        pieces = _core.quantize_delta_gptq(delta, hessian, salient_idx, bits, group_size, clip_grid, min_clip, name,
                                           ragged_groups, damping, act_order)
    else:
        pieces = _core.quantize_delta(delta, channel_weight, salient_idx, bits, group_size, clip_grid, min_clip,
                                      name, ragged_groups)
    error, reference = float(pieces["error"]), float(pieces["reference"])  # weighted, computed in C++
    stored = {piece: pieces[piece] for piece, _ in _core.DELTA_PIECES}
    return MatrixResult(stored, bits, int(pieces["group_size"]), int(salient_idx.size), error, reference,
                        compressed_bits(rows, cols, bits, group_size, int(salient_idx.size)))


def dequantize_pieces(pieces: Mapping[str, np.ndarray], rows: int, cols: int, bits: int,
                      group_size: int) -> np.ndarray:
    """Dense float32 ``[rows, cols]`` delta from its stored pieces (C++ reference path)."""
    from meswitch import _core

    return _core.dequantize_delta(np.ascontiguousarray(pieces["qweight"]), np.ascontiguousarray(pieces["scales"]),
                                  np.ascontiguousarray(pieces["zeros"]), np.ascontiguousarray(pieces["salient_idx"]),
                                  np.ascontiguousarray(pieces["salient"]), rows, cols, bits, group_size or cols)


# --------------------------------------------------------------------------- budget planner

@dataclass
class PlanChoice:
    bits: int
    salient: int
    error: float
    storage_bits: int
    group_size: int | None = None  # None: the settings' group size; 0: whole row


def plan_budget(candidates: Mapping[str, Sequence[PlanChoice]], parameters: Mapping[str, int],
                avg_bits: float) -> dict[str, PlanChoice]:
    """Pick one candidate per matrix minimising the summed error within ``avg_bits`` per parameter.

    Greedy over each matrix's lower convex hull of (storage, error): start from the
    cheapest choice everywhere and repeatedly take the upgrade with the largest error
    reduction per extra bit that still fits. On convex hulls this is the exact
    Lagrangian solution at the budget's breakpoints.
    """
    budget = avg_bits * sum(parameters.values())
    hulls: dict[str, list[PlanChoice]] = {}
    for name, options in candidates.items():
        ordered = sorted(options, key=lambda c: (c.storage_bits, c.error))
        front: list[PlanChoice] = []
        for option in ordered:  # Pareto front: strictly less error for more storage
            if not front or option.error < front[-1].error:
                front.append(option)
        hull: list[PlanChoice] = []
        for option in front:  # lower convex hull
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                slope_ab = (a.error - b.error) / (b.storage_bits - a.storage_bits)
                slope_bc = (b.error - option.error) / (option.storage_bits - b.storage_bits)
                if slope_bc >= slope_ab:
                    hull.pop()
                else:
                    break
            hull.append(option)
        hulls[name] = hull
    position = {name: 0 for name in hulls}
    spent = sum(hull[0].storage_bits for hull in hulls.values())
    if spent > budget:
        cheapest = spent / sum(parameters.values())
        raise ValueError(f"--avg-bits {avg_bits} is below the cheapest plan ({cheapest:.3f} bits per parameter)")
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        hull, at = hulls[name], position[name]
        if at + 1 < len(hull):
            gain = (hull[at].error - hull[at + 1].error) / (hull[at + 1].storage_bits - hull[at].storage_bits)
            heapq.heappush(heap, (-gain, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        hull, at = hulls[name], position[name]
        extra = hull[at + 1].storage_bits - hull[at].storage_bits
        if spent + extra > budget:
            continue  # this upgrade does not fit; cheaper ones elsewhere still may
        spent += extra
        position[name] = at + 1
        push(name)
    return {name: hulls[name][position[name]] for name in hulls}


# --------------------------------------------------------------------------- the compression loop

@dataclass
class CompressionReport:
    """What ``compress`` wrote and measured."""

    artifact: str
    seconds: float
    delta_parameters: int
    delta_bytes_fp16: int
    artifact_bytes: int
    avg_bits: float
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.delta_bytes_fp16 / max(1, self.artifact_bytes)

    def summary_lines(self) -> list[str]:
        lines = [f"artifact        {self.artifact}",
                 f"delta params    {self.delta_parameters:,}",
                 f"fp16 delta      {self.delta_bytes_fp16 / 2**20:.2f} MiB",
                 f"artifact        {self.artifact_bytes / 2**20:.2f} MiB ({self.ratio:.2f}x smaller)",
                 f"avg bits/param  {self.avg_bits:.3f}",
                 f"time            {self.seconds:.1f} s"]
        layers: dict[str, list[float]] = {}
        for name, entry in self.tensors.items():
            if entry["kind"] == "delta":
                layer = layer_index(name)
                layers.setdefault("-" if layer is None else str(layer), []).append(entry["relative_error"])
        lines.append("relative error per layer (mean over matrices): " + ", ".join(
            f"{key}: {np.mean(values):.4f}" for key, values in sorted(layers.items(), key=lambda kv: (len(kv[0]), kv[0]))))
        return lines


def _load_config_text(directory: Path) -> str:
    from meswitch.inputs import read_model_config

    return read_model_config(directory)[0]


def _floating(checkpoint: Checkpoint, name: str, directory: Path) -> np.ndarray:
    from meswitch import _core

    info = checkpoint.info(name)
    if info["dtype"] not in ("F32", "F16", "BF16"):
        raise _core.FormatError(f"{directory}: tensor '{name}': dtype {info['dtype']} is not floating")
    return checkpoint.get_array(name)


def _channel_weights(statistics: Mapping[str, np.ndarray] | None, name: str, role: str,
                     cols: int) -> np.ndarray | None:
    """``E[x^2]`` per input channel of ``name`` (the diagonal of a Hessian), floored; ``None`` without."""
    if statistics is None or name not in statistics:
        return None  # an embedding has statistics only as the Fisher at its output
    statistic = np.asarray(statistics[name])
    weight = np.ascontiguousarray(np.diagonal(statistic) if statistic.ndim == 2 else statistic, dtype=np.float32)
    if weight.shape != (cols,):
        raise ValueError(f"calibration statistics for '{name}' have shape {statistic.shape}, expected ({cols},) "
                         f"or ({cols}, {cols})")
    # A channel never active in calibration still matters on other text: floor at a small share.
    floor = max(float(weight.mean()) * 1e-3, 1e-12)
    return np.maximum(weight, floor).astype(np.float32)


def _hessian(statistics: Mapping[str, np.ndarray] | None, name: str, role: str, cols: int,
             settings: CompressionSettings) -> np.ndarray | None:
    """The calibration Hessian ``[cols, cols]`` of ``name`` when GPTQ has one to use, else ``None``."""
    if settings.method != "gptq" or statistics is None or name not in statistics:
        return None  # an embedding has one when calibration text gave the Fisher at its output
    statistic = statistics[name]
    if np.ndim(statistic) != 2:
        return None  # per-channel statistics only: round to nearest (GPTQ with a diagonal H is RTN)
    if np.shape(statistic) != (cols, cols):
        raise ValueError(f"calibration Hessian for '{name}' has shape {np.shape(statistic)}, "
                         f"expected ({cols}, {cols})")
    return np.ascontiguousarray(statistic, dtype=np.float32)


def calibration_statistics(expert: str | Path, texts: Sequence[str], max_tokens: int = 16384, *,
                           hessians: bool = False, spill: str | Path | None = None,
                           progress: bool = False) -> Mapping[str, np.ndarray]:
    """Per linear of the expert on ``texts``: ``E[x^2]`` per input channel, or with ``hessians`` ``E[x x^T]``.

    The Hessians include the embedding's: the empirical Fisher at its output
    (:func:`meswitch.calibration.embedding_output_fisher`, untied embeddings). With
    ``spill`` the Hessians are captured one decoder layer at a time and written to that
    directory (:func:`meswitch.calibration.stream_input_hessians`; a 7B model's would not
    fit in memory all at once), and come back memory-mapped.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meswitch.calibration import (
        collect_channel_second_moments,
        collect_input_hessians,
        embedding_output_fisher,
        stream_input_hessians,
    )

    tokenizer = AutoTokenizer.from_pretrained(expert)
    model = AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float32)
    if not hessians:
        return collect_channel_second_moments(model, tokenizer, texts, max_tokens=max_tokens)
    if spill is not None:
        statistics = stream_input_hessians(model, tokenizer, texts, spill, max_tokens=max_tokens, progress=progress)
        for name, fisher in embedding_output_fisher(model, tokenizer, texts, max_tokens=max_tokens).items():
            statistics.add(fisher, [name])
        return statistics
    return {**collect_input_hessians(model, tokenizer, texts, max_tokens=max_tokens),
            **embedding_output_fisher(model, tokenizer, texts, max_tokens=max_tokens)}


def compress(base: str | Path, expert: str | Path, out: str | Path, *,
             settings: CompressionSettings | None = None,
             calibration: str | Path | Sequence[str] | Mapping[str, np.ndarray] | None = None,
             name: str | None = None, domain: str = "",
             progress: bool | Callable[[int, int, str], None] = True, force: bool = False) -> CompressionReport:
    """Compress ``expert`` against ``base`` into the artifact directory ``out``.

    Parameters
    ----------
    base, expert
        Hugging Face model directories (safetensors, sharded or not, f32/f16/bf16).
    out
        Artifact directory, conventionally ``NAME.meswitch``. It must not exist, be
        empty, or hold an earlier artifact, which is replaced only with ``force``; the
        current directory, the base, the expert and their parents are refused. The
        new artifact is swapped into place in one step: a crash leaves the old one or
        the new one, never neither.
    settings
        Quantization settings (:class:`CompressionSettings`).
    calibration
        Calibration text file, list of texts, or precomputed statistics per weight:
        ``E[x^2]`` ``[cols]`` or the Hessian ``E[x x^T]`` ``[cols, cols]`` (a mapping may
        compute them lazily). ``None`` scores channels weight-only and rounds to nearest.
    name, domain
        Expert name (default: the expert directory's name) and a domain description.
    progress
        ``True`` for a progress bar, ``False`` for none, or a callback ``(done, total, tensor)``.
    force
        Replace an earlier artifact at ``out``.

    Returns
    -------
    CompressionReport
    """
    with contextlib.ExitStack() as cleanup:  # temporary files (spilled Hessians) go on every exit
        return _compress(base, expert, out, settings, calibration, name, domain, progress, force, cleanup)


def _compress(base, expert, out, settings, calibration, name, domain, progress, force,
              cleanup: contextlib.ExitStack) -> CompressionReport:
    from meswitch import _core

    settings = settings or CompressionSettings()
    settings.validate()
    base, expert, out = Path(base), Path(expert), Path(out)
    inputs = [("the base model", str(base)), ("the expert", str(expert))]
    _core.check_output_directory(str(out), "artifact", force, inputs)  # before any work
    start = time.perf_counter()
    base_config, expert_config = _load_config_text(base), _load_config_text(expert)
    base_ckpt, expert_ckpt = open_checkpoint(base), open_checkpoint(expert)

    missing = sorted(set(base_ckpt) - set(expert_ckpt))
    if missing:
        raise _core.FormatError(f"{expert}: tensor '{missing[0]}': present in the base {base} but missing "
                                f"from the expert ({len(missing)} missing in all)")

    statistics: Mapping[str, np.ndarray] | None
    calibration_info: dict[str, Any] = {"kind": "weight-only"}
    texts: list[str] = []
    if settings.refine_steps and (calibration is None or isinstance(calibration, Mapping)):
        raise ValueError("refine_steps needs calibration text (the refinement runs the model on it)")
    if calibration is None:
        statistics = None
    elif isinstance(calibration, Mapping):
        statistics, calibration_info = calibration, {"kind": "statistics"}
    else:
        from meswitch.calibration import read_calibration_texts

        texts = read_calibration_texts(calibration) if isinstance(calibration, (str, Path)) else list(calibration)
        if settings.method == "gptq":  # Hessians spilled beside the output, removed when done
            out.parent.mkdir(parents=True, exist_ok=True)
            spill = Path(tempfile.mkdtemp(prefix=f".{out.name}.hessians-", dir=out.parent))
            cleanup.callback(shutil.rmtree, spill, ignore_errors=True)
            statistics = calibration_statistics(expert, texts, hessians=True, spill=spill, progress=progress is True)
        else:
            statistics = calibration_statistics(expert, texts)
        calibration_info = {"kind": "activation-aware", "texts": len(texts),
                            "source": str(calibration) if isinstance(calibration, (str, Path)) else "texts"}

    names = sorted(expert_ckpt)
    delta_names = [n for n in names if n in base_ckpt and is_delta_role(tensor_role(n))
                   and len(expert_ckpt.info(n)["shape"]) == 2]
    plan: dict[str, PlanChoice] | None = None
    planner_info: dict[str, Any] | None = None
    if settings.avg_bits is not None:
        plan_start = time.perf_counter()
        sensitivity = None
        if texts:  # the output-aware score needs the model on calibration text
            from meswitch.sensitivity import output_sensitivity

            hessians = statistics if settings.method == "gptq" else None
            sensitivity = output_sensitivity(expert, texts, hessians=hessians)
            if any(name not in sensitivity for name in delta_names):
                sensitivity = None  # scores must share one unit across matrices
        plan = _plan(base, expert, base_ckpt, expert_ckpt, delta_names, statistics, settings, progress, sensitivity)
        planner_info = {"bits": list(PLANNER_BITS), "salient_fractions": list(PLANNER_SALIENT_FRACTIONS),
                        "score": "output" if sensitivity is not None else "relative weight error",
                        "seconds": time.perf_counter() - plan_start}

    # With refinement the quantized artifact is an intermediate in a private scratch
    # directory beside ``out``: ``out`` appears only refined.
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(_core.make_staging_directory(str(out))) if settings.refine_steps else None
    written = scratch / "unrefined.meswitch" if scratch is not None else out
    try:
        writer = _core.ArtifactWriter(str(written), settings.max_shard_bytes, force, inputs)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        entries, totals = _write_tensors(writer, names, delta_names, base, expert, base_ckpt, expert_ckpt,
                                         statistics, settings, plan, progress)
        for side in SIDE_FILES:
            if (expert / side).is_file():
                writer.add_file(f"expert/{side}", str(expert / side))
        manifest = {
            "name": name or expert.name,
            "domain": domain,
            "created_by": f"meswitch {__version__}",
            "base": json.loads(_core.base_fingerprint(str(base), base_config)),
            "base_path_hint": str(base),
            "expert_config": json.loads(expert_config),
            "quantization": {**asdict(settings), "calibration": calibration_info,
                             "planner": planner_info},
            "statistics": {"delta_parameters": totals["params"], "delta_storage_bits": totals["storage_bits"],
                           "avg_bits": totals["storage_bits"] / max(1, totals["params"])},
            "tensors": entries,
        }
        writer.commit(json.dumps(manifest))
    except BaseException:
        writer.abort()  # the staging directory goes now, not when the traceback is collected
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    if scratch is not None:
        from meswitch.refine import refine_step_sizes

        try:
            refine_step_sizes(base, expert, written, out, texts, steps=settings.refine_steps,
                              lr=settings.refine_lr, progress=bool(progress), force=force, inputs=inputs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    artifact_bytes = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    return CompressionReport(str(out), time.perf_counter() - start, totals["params"], totals["params"] * 2,
                             artifact_bytes, totals["storage_bits"] / max(1, totals["params"]), entries)


def _write_tensors(writer, names: Sequence[str], delta_names: Sequence[str], base: Path, expert: Path,
                   base_ckpt: Checkpoint, expert_ckpt: Checkpoint, statistics, settings: CompressionSettings,
                   plan: dict[str, PlanChoice] | None, progress) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    entries: dict[str, dict[str, Any]] = {}
    totals = {"params": 0, "storage_bits": 0}
    bar = _Progress(progress, len(names), f"compress {expert.name}")
    try:
        for index, tensor in enumerate(names):
            if tensor in delta_names:
                entries[tensor] = _compress_delta(writer, tensor, tensor_role(tensor), base, expert, base_ckpt,
                                                  expert_ckpt, statistics, settings, plan, totals)
            else:
                entries[tensor] = _store_other(writer, tensor, base_ckpt, expert_ckpt, expert, totals)
            expert_ckpt.release(tensor)
            if tensor in base_ckpt:
                base_ckpt.release(tensor)
            bar(index + 1, tensor)
    finally:
        bar.close()
    return entries, totals


class _Progress:
    """Progress of a loop: a tqdm bar, a callback ``(done, total, tensor)`` or nothing.

    ``close`` runs on every exit, errors included: the bar is cleared (``leave=False``)
    so an error message never lands after a half-drawn bar.
    """

    def __init__(self, progress: bool | Callable[[int, int, str], None], total: int, label: str) -> None:
        self._callback = progress if callable(progress) else None
        self._total = total
        self._bar = None
        if progress is True:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="tensor", leave=False)

    def __call__(self, done: int, tensor: str) -> None:
        if self._callback is not None:
            self._callback(done, self._total, tensor)
        elif self._bar is not None:
            self._bar.set_postfix_str(tensor[-40:], refresh=False)
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _delta_of(tensor: str, base: Path, expert: Path, base_ckpt: Checkpoint, expert_ckpt: Checkpoint):
    from meswitch import _core

    base_array = _floating(base_ckpt, tensor, base)
    expert_array = _floating(expert_ckpt, tensor, expert)
    try:
        if base_array.ndim != 2 or expert_array.ndim != 2 or base_array.shape[1:] != expert_array.shape[1:] \
                or expert_array.shape[0] < base_array.shape[0] or base_array.nbytes <= _DELTA_BLOCK_BYTES:
            return _core.compute_delta(base_array, expert_array, tensor)  # checks and reports the mismatch
        # Large matrices go in row blocks whose source pages are dropped as soon as they are
        # used, so the float32 delta is the only tensor-sized buffer resident at a time.
        rows, cols = base_array.shape
        delta = np.empty((rows, cols), dtype=np.float32)
        block = max(1, _DELTA_BLOCK_BYTES // (cols * base_array.itemsize))
        for first in range(0, rows, block):
            last = min(rows, first + block)
            part, _ = _core.compute_delta(base_array[first:last], expert_array[first:last], tensor)
            delta[first:last] = part
            base_ckpt.release(tensor, first * cols * base_array.itemsize, (last - first) * cols * base_array.itemsize)
            expert_ckpt.release(tensor, first * cols * expert_array.itemsize,
                                (last - first) * cols * expert_array.itemsize)
        extra = np.array(expert_array[rows:], dtype=np.float32)
        if not np.isfinite(extra).all():
            bad = np.argwhere(~np.isfinite(extra))[0]
            raise _core.FormatError(f"tensor '{tensor}': non-finite value in the expert at ({rows + bad[0]}, {bad[1]})")
        return delta, extra
    except _core.FormatError as error:
        raise _core.FormatError(f"{expert} vs {base}: {error}") from None


def _compress_delta(writer, tensor: str, role: str, base: Path, expert: Path, base_ckpt: Checkpoint,
                    expert_ckpt: Checkpoint, statistics, settings: CompressionSettings,
                    plan: dict[str, PlanChoice] | None, totals: dict[str, int]) -> dict[str, Any]:
    from meswitch import _core

    delta, extra = _delta_of(tensor, base, expert, base_ckpt, expert_ckpt)
    expert_ckpt.release(tensor)  # the float32 delta is all that is needed from here on
    base_ckpt.release(tensor)
    rows, cols = delta.shape
    weight = _channel_weights(statistics, tensor, role, cols)
    hessian = _hessian(statistics, tensor, role, cols, settings)
    bits, k, group_size = settings.bits, salient_count(settings.salient, settings.salient_channels, cols), settings.group_size
    if role in ("embedding", "lm_head") and settings.vocab_bits is not None:
        bits = settings.vocab_bits
    if plan is not None:
        bits, k = plan[tensor].bits, plan[tensor].salient
        if plan[tensor].group_size is not None:
            group_size = plan[tensor].group_size
    try:
        result = compress_matrix(delta, weight, bits=bits, group_size=group_size, k=k,
                                 clip_grid=settings.clip_grid, min_clip=settings.min_clip, name=tensor,
                                 ragged_groups=settings.ragged_groups, hessian=hessian,
                                 damping=settings.damping, act_order=settings.act_order)
    except (ValueError, RuntimeError) as error:
        raise type(error)(f"{expert}: {error}") from None
    for piece, dtype in _core.DELTA_PIECES:
        writer.add_tensor(f"{tensor}.{piece}", dtype, np.ascontiguousarray(result.pieces[piece]))
    info = expert_ckpt.info(tensor)
    if extra.shape[0] > 0:  # whole rows in the expert's own dtype, bit for bit
        rows_past_base = np.ascontiguousarray(expert_ckpt.get_array(tensor)[rows:])
        writer.add_tensor(f"{tensor}.extra_rows", info["dtype"],
                          rows_past_base.view(np.uint16) if info["dtype"] == "BF16" else rows_past_base)
    totals["params"] += rows * cols
    totals["storage_bits"] += result.storage_bits
    return {"kind": "delta", "role": role, "dtype": info["dtype"], "shape": info["shape"],
            "rows": rows, "cols": cols, "bits": result.bits, "group_size": result.group_size,
            "salient": result.salient, "method": "gptq" if hessian is not None else "rtn", "extra_rows": int(extra.shape[0]),
            "error": result.error, "relative_error": result.error / result.reference if result.reference > 0 else 0.0,
            "storage_bits": result.storage_bits}


def _store_other(writer, tensor: str, base_ckpt: Checkpoint, expert_ckpt: Checkpoint, expert: Path,
                 totals: dict[str, int]) -> dict[str, Any]:
    info = expert_ckpt.info(tensor)
    array = expert_ckpt.get_array(tensor)
    if tensor in base_ckpt:
        base_info = base_ckpt.info(tensor)
        if base_info["shape"] == info["shape"] and base_info["dtype"] == info["dtype"] and \
                np.array_equal(base_ckpt.get_array(tensor).view(np.uint8), array.view(np.uint8)):
            return {"kind": "same", "dtype": info["dtype"], "shape": info["shape"]}
    storage = np.ascontiguousarray(array)
    dtype = info["dtype"]
    if dtype == "BF16":
        storage = storage.view(np.uint16)
    writer.add_tensor(f"{tensor}.full", dtype, storage)
    return {"kind": "full", "dtype": dtype, "shape": info["shape"], "bytes": int(storage.nbytes)}


def _plan(base: Path, expert: Path, base_ckpt: Checkpoint, expert_ckpt: Checkpoint, delta_names: Sequence[str],
          statistics, settings: CompressionSettings, progress, sensitivity=None) -> dict[str, PlanChoice]:
    """Measure every (bits, salient) candidate of every delta matrix, then solve the budget.

    With ``sensitivity`` (``meswitch.sensitivity.output_sensitivity``) a candidate's error is
    its estimated effect on the calibration loss; without, its error relative to the delta's
    own weighted energy, times the matrix's size.
    """
    candidates: dict[str, list[PlanChoice]] = {}
    parameters: dict[str, int] = {}
    bar = _Progress(progress, len(delta_names), f"plan {expert.name}")
    try:
        for index, tensor in enumerate(delta_names):
            delta, _ = _delta_of(tensor, base, expert, base_ckpt, expert_ckpt)
            rows, cols = delta.shape
            weight = _channel_weights(statistics, tensor, tensor_role(tensor), cols)
            hessian = _hessian(statistics, tensor, tensor_role(tensor), cols, settings)
            options = []
            # Whole-row groups are candidates too: they drop the scale/zero overhead (0.375 bits
            # per parameter at groups of 64), which is what lets a tight budget stay at 2 bits.
            for group_size in dict.fromkeys((settings.group_size, 0)):
                for bits in PLANNER_BITS:
                    for fraction in PLANNER_SALIENT_FRACTIONS:
                        k = salient_count(fraction, None, cols)
                        result = compress_matrix(delta, weight, bits=bits, group_size=group_size, k=k,
                                                 clip_grid=settings.clip_grid, min_clip=settings.min_clip, name=tensor,
                                                 ragged_groups=settings.ragged_groups, hessian=hessian,
                                                 damping=settings.damping, act_order=settings.act_order)
                        if sensitivity is not None:
                            approx = dequantize_pieces(result.pieces, rows, cols, bits, result.group_size)
                            error = sensitivity[tensor].score(delta - approx)
                        else:
                            # Relative to each delta's own weighted energy, times its size: the units
                            # of activation statistics differ per layer.
                            relative = result.error / result.reference if result.reference > 0 else 0.0
                            error = relative * rows * cols
                        options.append(PlanChoice(bits, k, error, result.storage_bits, group_size))
            candidates[tensor] = options
            parameters[tensor] = rows * cols
            bar(index + 1, tensor)
    finally:
        bar.close()
    return plan_budget(candidates, parameters, settings.avg_bits)
