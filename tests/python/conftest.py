import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import meswitch
import numpy as np
import pytest

# What each CPU kernel path needs beyond baseline x86-64 (include/meswitch/cpu/simd.hpp).
CPU_PATH_INSTRUCTIONS = {"reference": "nothing", "avx2": "AVX2/FMA/F16C/BMI2", "avx2int": "AVX2/FMA/F16C/BMI2",
                         "avx512": "AVX-512 F/VL/BW/DQ", "avx512vnni": "AVX-512 VNNI/GFNI"}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def force_cpu_path(monkeypatch):
    """``force(path)`` makes ``path`` the CPU kernel path for the rest of the test (MESWITCH_CPU_PATH),
    or skips the test, with the reason, on a CPU that lacks it: a path that cannot run is never
    reported as passed."""
    from meswitch import ops

    def force(path: str) -> None:
        monkeypatch.setenv("MESWITCH_CPU_PATH", path)
        try:
            active = ops.cpu_kernel_path()
        except RuntimeError as error:
            if "does not support" not in str(error):
                raise
            pytest.skip(f"CPU lacks {CPU_PATH_INSTRUCTIONS[path]} for the {path} kernels")
        assert active == path

    return force


def subprocess_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment plus ``extra``, with a PYTHONPATH under which a subprocess imports the
    meswitch this process tests (an in-place checkout or the installed package), whatever its
    working directory: a relative PYTHONPATH would not."""
    package_root = str(Path(meswitch.__file__).resolve().parents[1])
    path = os.pathsep.join([package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    return {**os.environ, **(extra or {}), "PYTHONPATH": path}


@pytest.fixture
def subprocess_env() -> Callable[..., dict[str, str]]:
    """``subprocess_env(extra=None)``: see :func:`subprocess_environment`."""
    return subprocess_environment


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(argv, cwd, env=...)``: the ``meswitch`` command line as a real subprocess, output decoded."""

    def run(argv: list[str], cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "meswitch.cli", *argv], capture_output=True, cwd=cwd, check=False,
                              timeout=timeout, env=subprocess_environment(env))
        # Decoded by hand: text=True would turn the carriage returns of a progress bar into newlines.
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())

    return run


def cuda_unavailable_reason() -> str:
    """Why the CUDA tests cannot run here ("" when they can): no CUDA build, no driver or device,
    or a torch without CUDA."""
    from meswitch import cuda

    reason = cuda.unavailable_reason()
    if reason:
        return reason
    import torch

    return "" if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip with the reason where no GPU can run them."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    reason = cuda_unavailable_reason()
    if reason:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=f"no CUDA device: {reason}"))
