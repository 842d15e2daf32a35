"""Reading compressed-expert artifacts and turning them back into dense models."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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
        Unknown format or version, checksum mismatch, malformed shard.
    """

    def __init__(self, path: str | os.PathLike[str], verify_checksums: bool = True) -> None:
        from meswitch import _core

        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            raise FileNotFoundError(f"{self.path}: no manifest.json (not a NAME.meswitch artifact)")
        self._core = _core.ExpertArtifact.open(str(self.path), verify_checksums)
        self.manifest: dict[str, Any] = json.loads(self._core.manifest_json())

    @property
    def name(self) -> str:
        return self.manifest["name"]

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

    def delta(self, weight: str) -> np.ndarray:
        """The dequantized float32 delta of a ``delta`` weight (base rows only)."""
        from meswitch.compress import dequantize_pieces

        entry = self.tensors[weight]
        pieces = {key: self.stored(f"{weight}.{key}") for key in ("qweight", "scales", "zeros", "salient_idx", "salient")}
        return dequantize_pieces(pieces, entry["rows"], entry["cols"], entry["bits"], entry["group_size"])

    def weights(self, base: str | os.PathLike[str], *, check_base: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(name, array)`` of the reconstructed expert, tensor by tensor, in its original dtypes."""
        if check_base:
            self.check_base(base)
        base_ckpt = open_checkpoint(base)
        for weight, entry in self.tensors.items():
            dtype = NUMPY_DTYPES[entry["dtype"]]
            kind = entry["kind"]
            if kind == "same":
                yield weight, base_ckpt.get_array(weight)
            elif kind == "full":
                array = self.stored(f"{weight}.full")
                yield weight, array.view(dtype) if array.dtype != dtype else array
            elif kind == "delta":
                base_rows = base_ckpt.get_array(weight, widen=True).reshape(entry["rows"], entry["cols"])
                dense = base_rows + self.delta(weight)
                if entry["extra_rows"]:
                    extra = self.stored(f"{weight}.extra_rows").astype(np.float32)
                    dense = np.concatenate([dense, extra], axis=0)
                yield weight, dense.reshape(entry["shape"]).astype(dtype)
            else:
                raise ValueError(f"{self.path}: tensor '{weight}': unknown kind '{kind}'")

    def side_files(self) -> list[Path]:
        directory = self.path / "expert"
        return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []


def load_artifact(path: str | os.PathLike[str], verify_checksums: bool = True) -> ExpertArtifact:
    """Open a compressed-expert artifact; see :class:`ExpertArtifact`."""
    return ExpertArtifact(path, verify_checksums)


def decompress(base: str | os.PathLike[str], artifact: str | os.PathLike[str] | ExpertArtifact,
               out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write base + dequantized delta as a Hugging Face model directory (loads with transformers).

    The directory is built beside ``out`` and renamed into place when complete.

    Parameters
    ----------
    base
        The base model directory the expert was compressed against.
    artifact
        A ``NAME.meswitch`` directory or an opened :class:`ExpertArtifact`.
    out
        The model directory to write.
    force
        Replace an existing output of the same kind; see docs/format.md.
    """
    expert = artifact if isinstance(artifact, ExpertArtifact) else load_artifact(artifact)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".tmp.", dir=out.parent))
    try:
        tensors = dict(expert.weights(base))
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt", "meswitch_artifact": expert.name})
        for side in expert.side_files():
            shutil.copy2(side, staging / side.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
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
