"""Reading compressed-expert artifacts and turning them back into dense models."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from meswitch.checkpoint import NUMPY_DTYPES, open_checkpoint, save_file


class ExpertArtifact:
    """A ``NAME.meswitch`` directory opened for reading.

    Parameters
    ----------
    path
        The artifact directory.
    verify_checksums
        Check every shard's sha256 against the manifest (default).

    Raises
    ------
    FileNotFoundError
        ``path`` has no ``manifest.json``.
    meswitch.FormatError
        Unknown format or version, a malformed manifest (every field is checked before
        use), a checksum mismatch, a malformed shard, a stored tensor whose dtype or
        shape disagrees with its entry, a side file that is a link, unlisted or altered.
    """

    def __init__(self, path: str | os.PathLike[str], verify_checksums: bool = True) -> None:
        from meswitch import _core

        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            raise FileNotFoundError(f"{self.path}: no manifest.json (not a NAME.meswitch artifact)")
        self._core = _core.ExpertArtifact.open(str(self.path), verify_checksums)
        self.manifest: dict[str, Any] = json.loads(self._core.manifest_json())

    @classmethod
    def from_core(cls, core: Any, manifest: dict[str, Any] | None = None) -> ExpertArtifact:
        """Wrap an already opened ``meswitch._core.ExpertArtifact`` (the expert store's resident ones).

        ``manifest``, when given, is ``core``'s manifest already parsed (the store keeps it
        per record, see ``record_serial``); it is shared, not copied, so treat it as read-only.
        """
        artifact = cls.__new__(cls)
        artifact.path = Path(core.directory)
        artifact._core = core
        artifact.manifest = json.loads(core.manifest_json()) if manifest is None else manifest
        return artifact

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def record_serial(self) -> int:
        """The same number for every opening of the same checked files (an expert store's reloads
        of an unchanged expert), another after any changed; see ``include/meswitch/artifact.hpp``."""
        return self._core.record_serial

    @property
    def tensors(self) -> dict[str, dict[str, Any]]:
        return self.manifest["tensors"]

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype of a stored tensor (``"F16"``, ``"U32"``, ...)."""
        return self._core.stored_dtype(name)

    def stored(self, name: str) -> np.ndarray:
        """A stored tensor (e.g. ``W.qweight``) as a read-only NumPy view."""
        array = self._core.stored(name)
        if self.stored_dtype(name) == "BF16":
            array = array.view(ml_dtypes.bfloat16)
        return array

    def check_base(self, base: str | os.PathLike[str]) -> None:
        """Raise ``meswitch.FormatError`` unless ``base`` is the model this expert was compressed against."""
        from meswitch.inputs import read_model_config

        self._core.check_base(str(base), read_model_config(base)[0])

    def validate_delta(self, weight: str) -> None:
        """Raise ``meswitch.FormatError`` unless the stored pieces of a ``delta`` weight obey the format.

        The rules (shapes for the manifest's layout, zero points below 2^bits, strictly
        ascending salient indices within the width, finite scales and salient values) are
        already checked for every delta when the artifact is opened, which is why the fused
        kernels check only the layout on every call; this runs the check again.
        """
        self._core.validate_delta(weight)

    def delta(self, weight: str) -> np.ndarray:
        """The dequantized float32 delta of a ``delta`` weight (base rows only).

        Raises ``meswitch.FormatError`` when its stored pieces break the format's rules
        (shapes, zero points below 2^bits, ascending salient indices, finite values).
        """
        return self._core.dequantized_delta(weight)

    def weights(self, base: str | os.PathLike[str], *, check_base: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(name, array)`` of the reconstructed expert, tensor by tensor, in its original dtypes."""
        if check_base:
            self.check_base(base)
        base_ckpt = open_checkpoint(base)
        for weight, entry in self.tensors.items():
            dtype = NUMPY_DTYPES[entry["dtype"]]
            kind = entry["kind"]
            # The reader checked every entry against its stored tensors and, through
            # check_base, against the base's dtypes and shapes.
            if kind == "same":
                yield weight, base_ckpt.get_array(weight)
            elif kind == "full":
                yield weight, self.stored(f"{weight}.full")
            elif kind == "delta":
                base_rows = base_ckpt.get_array(weight, widen=True).reshape(entry["rows"], entry["cols"])
                dense = base_rows + self.delta(weight)
                if entry["extra_rows"]:
                    extra = self.stored(f"{weight}.extra_rows").astype(np.float32)
                    dense = np.concatenate([dense, extra], axis=0)
                yield weight, dense.reshape(entry["shape"]).astype(dtype)

    def side_files(self) -> list[str]:
        """The expert's small files recorded in the manifest (``"expert/config.json"``, ...)."""
        return list(self._core.side_files())

    def read_side_file(self, path: str) -> bytes:
        """One side file's bytes, read without following links and checked against its sha256."""
        return self._core.read_side_file(path)


def load_artifact(path: str | os.PathLike[str], verify_checksums: bool = True) -> ExpertArtifact:
    """Open a compressed-expert artifact; see :class:`ExpertArtifact`."""
    return ExpertArtifact(path, verify_checksums)


def decompress(base: str | os.PathLike[str], artifact: str | os.PathLike[str] | ExpertArtifact,
               out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write base + dequantized delta as a Hugging Face model directory (loads with transformers).

    Parameters
    ----------
    base, artifact
        The base model directory and the compressed expert.
    out
        The model directory to write. It must not exist, be empty, or hold an earlier
        output of ``decompress`` (marked by ``meswitch_decompressed.json``); the latter
        is replaced only with ``force``. The current directory, the base, the artifact
        and their parents are refused.
    force
        Replace an earlier output of ``decompress`` at ``out``.

    The directory is built beside ``out`` and swapped into place in one step when
    complete: a crash leaves the old output or the new one, never neither.

    Raises
    ------
    meswitch._core.OutputPathError
        ``out`` is not ours to write (a ``FileExistsError``).
    """
    from meswitch import __version__, _core

    out = Path(out)
    expert = artifact if isinstance(artifact, ExpertArtifact) else load_artifact(artifact)
    inputs = [("the base model", str(base)), ("the artifact", str(expert.path))]
    _core.check_output_directory(str(out), "decompressed", force, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(_core.make_staging_directory(str(out)))
    try:
        tensors = dict(expert.weights(base))
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt", "meswitch_artifact": expert.name})
        for side in expert.side_files():
            (staging / Path(side).name).write_bytes(expert.read_side_file(side))
        marker = {"format": _core.output_marker_format("decompressed"), "artifact": expert.name,
                  "base_fingerprint": expert.manifest["base"]["fingerprint"], "created_by": f"meswitch {__version__}"}
        (staging / _core.output_marker_file("decompressed")).write_text(json.dumps(marker, indent=2) + "\n")
        _core.check_output_directory(str(out), "decompressed", force, inputs)  # again: it may have changed meanwhile
        _core.commit_directory(str(staging), str(out))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def model_from_weights(config_dir: str | os.PathLike[str], weights: Iterator[tuple[str, np.ndarray]] | dict,
                       dtype: Any = None):
    """A transformers causal LM with the architecture in ``config_dir`` and the given weights.

    Returns
    -------
    (model, tokenizer)
        The tokenizer is loaded from ``config_dir`` too (``None`` if it holds none).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    items = weights.items() if isinstance(weights, dict) else weights
    state = {name: torch.from_numpy(np.asarray(array, dtype=np.float32)) for name, array in items}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{config_dir}: weights do not fit the config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model = model.to(dtype or torch.float32).eval()
    has_tokenizer = any((Path(config_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    return model, AutoTokenizer.from_pretrained(config_dir) if has_tokenizer else None


def load_compressed_model(base: str | os.PathLike[str], artifact: str | os.PathLike[str] | ExpertArtifact,
                          dtype: Any = None):
    """A transformers model and tokenizer for base + compressed expert, built in memory.

    Returns
    -------
    (model, tokenizer)
    """
    expert = artifact if isinstance(artifact, ExpertArtifact) else load_artifact(artifact)
    return model_from_weights(expert.path / "expert", expert.weights(base), dtype)
