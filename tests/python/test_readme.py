"""The README's commands run as written, on the bundled tiny expert family.

Every ``meswitch ...`` line of the README's bash blocks is extracted (a command added
to the README later is run too), its placeholders replaced by the bundled family's
paths, and run in order as a subprocess in one working directory, so later commands
see the outputs of earlier ones. Each must exit 0 and leave what it promises. The
README's Python block is run as well, with its placeholder strings replaced.

Only the substitutions in the tables below are made; ``COST`` ones only make a command
cheaper, never change what it does.

``meswitch serve`` runs until it is stopped: it is started, the README's client example (the
Python block that uses ``openai``) is run against it, and it is stopped with SIGTERM, which
must end it cleanly (exit 0).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meswitch.family import family_dir

README = Path(__file__).resolve().parents[2] / "README.md"
FAMILY = family_dir()
CALIB = FAMILY.parent / "calib" / "math.jsonl"
#: Calibration texts kept for cost (see COST): the README's calib.jsonl is the first ones of CALIB.
CALIB_TEXTS = 8

#: README placeholder -> what it stands for here (whole words of a command line). The README's
#: relative names stay: outputs land in the working directory, which also gets a calib.jsonl (COST).
PLACEHOLDERS = {
    "BASE": FAMILY / "base",
    "EXPERT": FAMILY / "math",
    "path/to/model": FAMILY / "base",
    "MODEL_DIR": FAMILY / "math",
}
#: Notation, not arguments: "[MODEL_DIR ...]" means "more of the same".
NOTATION = ("[MODEL_DIR", "...]")

#: Substitutions for cost only: (subcommand, flag or file, value here, whether to add the flag where
#: the README does not give it, reason).
COST = [
    ("compress", "calib.jsonl", f"first {CALIB_TEXTS} texts of {CALIB.name}", False,
     "statistics and refinement run the model over every calibration text; 8 exercise the same code"),
    ("compress", "--refine-steps", "2", False,
     "300 Adam steps through the model take minutes on CPU; 2 run the same refinement and rewrite"),
    ("eval", "--max-examples", "2", True,
     "the whole held-out sets take minutes on CPU; 2 examples per domain score every metric"),
]
#: Files the README's commands read that a user brings: name -> (the bundled file standing for it, reason).
USER_FILES = {
    f"{domain}.jsonl": (FAMILY.parent / "calib" / f"{domain}.jsonl",
                        "a user's examples of the domain, one per line: the family's calibration texts of it")
    for domain in ("chat", "math", "code")
}
#: Environment of the commands, for cost only: variable -> (value, reason).
ENVIRONMENT = {
    "OMP_NUM_THREADS": ("1", "torch's thread pool spins against other jobs on a shared machine (eval: 5 s, not 30)"),
}

#: Environment of ``meswitch serve``, for isolation only: variable -> (value, reason).
SERVE_ENVIRONMENT = {
    "MESWITCH_PORT": ("0", "any free port (8000 may be taken on a shared machine); the URL it prints says which"),
    "MESWITCH_CACHE_DIR": ("{workdir}/cache", "the bundled family goes to the test's directory, not the user's cache"),
}
#: The address the README's client example talks to; replaced by the URL the server printed.
README_SERVER_URL = "http://127.0.0.1:8000"

#: README string literal -> what it stands for here (the Python block).
PYTHON_PLACEHOLDERS = {
    "path/to/model": FAMILY / "base",
    "base": FAMILY / "base",
    "expert": FAMILY / "math",
}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def _is_client_block(code: str) -> bool:
    return "from openai import" in code or "import openai" in code


def library_blocks() -> list[str]:
    """The README's Python blocks that use meswitch itself."""
    return [code for code in _blocks("python") if not _is_client_block(code)]


def client_blocks() -> list[str]:
    """The README's Python blocks that talk to ``meswitch serve`` with the openai client."""
    return [code for code in _blocks("python") if _is_client_block(code)]


def readme_commands() -> list[list[str]]:
    """The ``meswitch`` command lines of the README's bash blocks, comments dropped."""
    return [shlex.split(line, comments=True) for block in _blocks("bash") for line in block.splitlines()
            if line.startswith("meswitch ")]


def prepared(argv: list[str]) -> list[str]:
    """``argv`` with the placeholders and the cost substitutions applied."""
    words = [str(PLACEHOLDERS.get(word, word)) for word in argv if word not in NOTATION]
    for command, flag, value, add, _ in COST:
        if words[1] != command or not flag.startswith("--"):
            continue
        if flag in words:
            words[words.index(flag) + 1] = value
        elif add:
            words += [flag, value]
    unknown = [word for word in words if re.fullmatch(r"[A-Z][A-Z_]+", word)]
    assert not unknown, f"README placeholder(s) {unknown} in {argv}: add them to PLACEHOLDERS"
    return words


def _option(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words else None


def _check_promises(words: list[str], workdir: Path, stdout: str) -> None:
    """What each kind of command promises to leave behind."""
    command = words[1]
    if command == "compress":
        artifact = workdir / _option(words, "--out")
        assert (artifact / "manifest.json").is_file() and list(artifact.glob("*.safetensors"))
    elif command == "decompress":
        from safetensors.numpy import load_file

        out = workdir / _option(words, "--out")
        tensors = load_file(out / "model.safetensors")
        assert "model.layers.0.mlp.up_proj.weight" in tensors and (out / "config.json").is_file()
    elif command == "eval":
        assert "| model |" in stdout and "math ppl" in stdout
    elif command == "inspect":
        assert stdout.strip()
    elif command == "route":
        expert, confidence = stdout.split()  # the README's query is placed, not a fallback
        assert expert in ("chat", "math", "code") and 0 < float(confidence) <= 1
    elif command == "router":
        from meswitch.route import Router

        routed = Router(workdir / _option(words, "--out")).route("Natalia sold 48 clips in April. How many in May?")
        assert routed.label in ("chat", "math", "code") and 0 < routed.confidence <= 1
    plot = _option(words, "--plot")
    if plot is not None:
        assert (workdir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_readme_shows_every_subcommand():
    commands = readme_commands()
    assert {argv[1] for argv in commands} >= {"inspect", "compress", "decompress", "eval", "serve"}
    assert len(library_blocks()) == 1 and len(client_blocks()) == 1


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The working directory of the README's commands, with its ``calib.jsonl`` (see COST)."""
    lines = CALIB.read_text(encoding="utf-8").splitlines()[:CALIB_TEXTS]
    (tmp_path / "calib.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, (source, _) in USER_FILES.items():
        (tmp_path / name).write_bytes(source.read_bytes())
    return tmp_path


def _serve_and_run_the_client_example(words: list[str], workdir: Path, subprocess_env) -> None:
    """Start ``meswitch serve ...``, run the README's client example against it, stop it with SIGTERM."""
    env = {k: v for k, (v, _) in ENVIRONMENT.items()} | {
        k: v.format(workdir=workdir) for k, (v, _) in SERVE_ENVIRONMENT.items()}
    process = subprocess.Popen([sys.executable, "-m", "meswitch.cli", *words[1:]], cwd=workdir, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=subprocess_env(env))
    try:
        lines, url, deadline = [], None, time.monotonic() + 300
        while url is None:
            line = process.stdout.readline()
            assert (line or process.poll() is None) and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
            found = re.search(r" at (http://\S+?)/v1", line)
            url = found.group(1) if line.startswith("serving ") and found else None
        (code,) = client_blocks()
        assert README_SERVER_URL in code
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code.replace(README_SERVER_URL, url), f"{README}:python (client)", "exec"), {})  # noqa: S102
        assert printed.getvalue().split()[0] in ("chat", "math", "code", "base"), printed.getvalue()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0 and "Traceback" not in output, "".join(lines) + output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_readme_commands_run(workdir, run_cli, subprocess_env):
    tmp_path = workdir
    for argv in readme_commands():
        words = prepared(argv)
        started = time.perf_counter()
        if words[1] == "serve":
            _serve_and_run_the_client_example(words, tmp_path, subprocess_env)
            print(f"{time.perf_counter() - started:6.1f} s  {shlex.join(words)} (started, client example, stopped)")
            continue
        done = run_cli(words[1:], tmp_path, timeout=600, env={k: v for k, (v, _) in ENVIRONMENT.items()})
        print(f"{time.perf_counter() - started:6.1f} s  {shlex.join(words)}")
        assert done.returncode == 0, f"{shlex.join(argv)} -> {done.returncode}: {done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr
        _check_promises(words, tmp_path, done.stdout)


def test_readme_python_block_runs(workdir, monkeypatch):
    tmp_path = workdir
    (code,) = library_blocks()
    for literal, path in PYTHON_PLACEHOLDERS.items():
        code = code.replace(f'"{literal}"', repr(str(path)))
    monkeypatch.chdir(tmp_path)  # "expert.meswitch" is written here
    namespace: dict = {}
    exec(compile(code, f"{README}:python", "exec"), namespace)  # noqa: S102  (the README's own example)
    assert (tmp_path / "expert.meswitch" / "manifest.json").is_file()
    assert namespace["report"].avg_bits > 0 and namespace["model"] is not None
    assert float(abs(namespace["y"]).sum()) > 0  # the delta of a fine-tuned expert is not zero


@pytest.mark.parametrize(("command", "flag", "value", "add", "reason"), [row for row in COST if row[1].startswith("--")],
                         ids=[row[1] for row in COST if row[1].startswith("--")])
def test_cost_substitutions_name_real_flags(command, flag, value, add, reason, run_cli, tmp_path):
    """A cost substitution whose flag disappeared from the CLI would silently stop applying."""
    assert reason
    done = run_cli([command, "--help"], tmp_path)
    assert done.returncode == 0 and flag in done.stdout


def test_the_quick_start_demo_runs_and_replaces_its_own_earlier_artifacts(tmp_path, run_cli):
    """``./dev.sh demo`` runs ``meswitch demo``; run again, it replaces the artifacts it wrote before.

    The earlier run is stood for by one artifact compressed into the demo's work directory at 4
    bits (a second whole demo would cost minutes); the demo must replace it with its own 2-bit
    one. ``--max-examples 2`` for cost (see COST: the held-out scoring is what takes minutes)."""
    environment = {k: v for k, (v, _) in ENVIRONMENT.items()}
    earlier = tmp_path / "demo" / "chat.meswitch"
    done = run_cli(["compress", "--base", str(FAMILY / "base"), "--expert", str(FAMILY / "chat"), "--out", str(earlier),
                    "--bits", "4"], tmp_path, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((earlier / "manifest.json").read_text())["quantization"]["bits"] == 4

    done = run_cli(["demo", "--max-examples", "2", "--workdir", "demo"], tmp_path, timeout=600, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Size" in done.stdout and "meswitch :" in done.stdout
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["chat.meswitch", "code.meswitch", "math.meswitch"]
    assert json.loads((earlier / "manifest.json").read_text())["quantization"]["bits"] == 2
