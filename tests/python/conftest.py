import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import meswitch
import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(argv, cwd, env=...)``: the ``meswitch`` command line as a real subprocess, output decoded."""

    def run(argv: list[str], cwd: Path, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        # The subprocess imports the meswitch this process tests (an in-place checkout or the
        # installed package), whatever its working directory: a relative PYTHONPATH would not.
        package_root = str(Path(meswitch.__file__).resolve().parents[1])
        path = os.pathsep.join([package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
        done = subprocess.run([sys.executable, "-m", "meswitch.cli", *argv], capture_output=True, cwd=cwd, check=False,
                              timeout=timeout, env={**os.environ, **(env or {}), "PYTHONPATH": path})
        # Decoded by hand: text=True would turn the carriage returns of a progress bar into newlines.
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())

    return run
