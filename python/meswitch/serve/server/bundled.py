"""The bundled tiny family, compressed once into a cache and reused by every later ``meswitch serve``.

``meswitch serve`` with no arguments serves the bundled family (``meswitch.family``): its
base and its chat, math and code experts, compressed with the project's defaults (2-bit
codes, :class:`~meswitch.compress.CompressionSettings`). The artifacts go to
``CACHE/family-KEY/NAME.meswitch``, where ``CACHE`` is ``$MESWITCH_CACHE_DIR``, else
``$XDG_CACHE_HOME/meswitch``, else ``~/.cache/meswitch``, and ``KEY`` is a hash of the
family's files (their contents), the compression settings and the meswitch version: a
changed family, other settings or another release compress afresh, next to the old entry.

Each artifact is written by the compressor's own staging and rename, so a start that is
interrupted leaves an artifact whole or absent, never half written, and the next start
compresses only what is missing. The store still verifies every artifact's checksums when
it first loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from meswitch import __version__


def cache_root() -> Path:
    """Where ``meswitch`` caches: ``$MESWITCH_CACHE_DIR``, ``$XDG_CACHE_HOME/meswitch`` or ``~/.cache/meswitch``."""
    explicit = os.environ.get("MESWITCH_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "meswitch"


def _settings():
    from meswitch.compress import CompressionSettings

    return CompressionSettings(bits=2)


def family_key(family: Path, experts: tuple[str, ...]) -> str:
    """A hash of the family's files, the compression settings and the meswitch version."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"meswitch": __version__, "settings": asdict(_settings()), "experts": experts},
                             sort_keys=True).encode())
    for directory in ("base", *experts):
        for path in sorted((family / directory).iterdir()):
            if path.is_file():
                digest.update(f"{directory}/{path.name}\0".encode())
                with path.open("rb") as file:
                    for block in iter(lambda: file.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()[:16]


def bundled_artifacts(cache: Path | None = None, *,
                      report: Callable[[str], None] = print) -> tuple[Path, list[Path]]:
    """The bundled family's base and its compressed experts, compressing those not cached yet.

    Parameters
    ----------
    cache
        The cache directory (default :func:`cache_root`).
    report
        Where progress lines go.

    Returns
    -------
    (base directory, [artifact directories])
    """
    from meswitch.compress import compress
    from meswitch.family import EXPERTS, family_dir

    family = family_dir()
    entry = (cache or cache_root()) / f"family-{family_key(family, EXPERTS)}"
    artifacts = []
    for index, name in enumerate(EXPERTS, start=1):
        artifact = entry / f"{name}.meswitch"
        if (artifact / "manifest.json").is_file():
            report(f"expert {name}: cached {artifact}")
        else:
            report(f"expert {name}: compressing ({index}/{len(EXPERTS)}, 2-bit) into {artifact}")
            try:
                done = compress(family / "base", family / name, artifact, settings=_settings(), domain=name,
                                progress=False)
            except Exception:
                if not (artifact / "manifest.json").is_file():
                    raise
                report(f"expert {name}: written meanwhile by another start; using it")  # a concurrent start won
            else:
                report(f"expert {name}: {done.artifact_bytes / 2**20:.2f} MiB, {done.avg_bits:.2f} bits/param, "
                       f"{done.seconds:.1f} s")
        artifacts.append(artifact)
    return family / "base", artifacts


__all__ = ["bundled_artifacts", "cache_root", "family_key"]
