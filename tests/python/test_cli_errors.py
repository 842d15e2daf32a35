"""Every user error of the ``meswitch`` command line is one line on stderr and a non-zero exit.

Each row is a command line (placeholders in braces name the prepared files below), the
exit status it must end with (2: the command line is wrong; 1: an input it names cannot
be used) and a piece of the message (the flag, file, line or field it must name). The
rows run in this process through ``meswitch.cli.main`` (fast: none loads a model); a
handful run again as real subprocesses, as a user would start them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from meswitch.family import family_dir

FAMILY = family_dir()


def _compress(*extra: str, base: str = "{base}", expert: str = "{expert}") -> list[str]:
    return ["compress", "--base", base, "--expert", expert, "--out", "{out}", *extra]


def _decompress(artifact: str, base: str = "{base}") -> list[str]:
    return ["decompress", "--base", base, "--artifact", artifact, "--out", "{out}"]


#: (id, argv, exit status, text the one error line must contain)
ROWS = [
    # the command itself
    ("no-command", [], 2, "required: COMMAND"),
    ("unknown-command", ["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ("unknown-flag", _compress("--bogus"), 2, "meswitch compress: error: unrecognized arguments: --bogus"),
    # inspect
    ("inspect-missing-path", ["inspect", "{missing}"], 2, "PATH: {missing}: no such file or directory"),
    ("inspect-empty-dir", ["inspect", "{empty}"], 1, "{empty}"),
    ("inspect-config-is-a-list", ["inspect", "{list_config_model}"], 1, "config.json: not a JSON object"),
    ("inspect-config-not-json", ["inspect", "{bad_json_config_model}"], 1, "config.json: not valid JSON"),
    ("inspect-manifest-not-json", ["inspect", "{bad_manifest}"], 1, "manifest.json"),
    ("inspect-manifest-is-a-list", ["inspect", "{list_manifest}"], 1, "manifest.json"),
    # compress: values of every numeric flag; "--flag=" keeps a value that starts with "-"
    # (and is not a number) from reading as a flag
    *[(f"compress-{flag.strip('-=')}-{value}", _compress(*([flag + value] if flag.endswith("=") else [flag, value])),
       2, f"{flag.rstrip('=')}: '{value}'")
      for flag, value in [("--salient", "inf"), ("--salient", "nan"), ("--salient", "-1"), ("--salient", "0.5"),
                          ("--salient", "150%"), ("--salient", "nan%"), ("--salient", "many"),
                          ("--bits", "7"), ("--bits", "0"), ("--bits", "two"), ("--bits", "2.5"),
                          ("--vocab-bits", "5"), ("--group-size", "-1"), ("--group-size", "inf"),
                          ("--avg-bits", "0.5"), ("--avg-bits", "nan"), ("--avg-bits", "9"),
                          ("--clip-grid", "0"), ("--min-clip", "2"), ("--min-clip", "0"),
                          ("--refine-steps", "-1"), ("--refine-lr", "0"), ("--refine-lr", "inf"),
                          ("--max-shard-bytes", "0"), ("--max-shard-bytes", "12XB"), ("--max-shard-bytes=", "-5MB"),
                          ("--max-shard-bytes", "1.5")]],
    # compress: arguments and paths
    ("compress-no-out", ["compress", "--base", "{base}", "--expert", "{expert}"], 2, "required: --out"),
    ("compress-base-missing", _compress(base="{missing}"), 2, "--base: {missing}: no such file or directory"),
    ("compress-expert-missing", _compress(expert="{missing}"), 2, "--expert: {missing}"),
    ("compress-base-is-a-file", _compress(base="{file}"), 2, "--base: {file}: not a directory"),
    ("compress-calib-missing", _compress("--calib", "{missing}"), 2, "--calib: {missing}"),
    ("compress-refine-without-calib", _compress("--refine-steps", "3"), 2, "--refine-steps needs --calib"),
    ("compress-base-without-config", _compress(base="{empty}"), 1, "{empty}: no config.json"),
    ("compress-base-config-is-a-list", _compress(base="{list_config_model}"), 1, "config.json: not a JSON object"),
    ("compress-expert-config-not-json", _compress(expert="{bad_json_config_model}"), 1,
     "config.json: not valid JSON"),
    ("compress-calib-record-without-text", _compress("--calib", "{calib_no_text}"), 1,
     "no_text.jsonl:2: missing field 'text'"),
    ("compress-calib-not-json", _compress("--calib", "{calib_bad_json}"), 1, "bad.jsonl:1: not valid JSON"),
    ("compress-calib-record-is-a-list", _compress("--calib", "{calib_list}"), 1, "list.jsonl:1: not a JSON object"),
    ("compress-calib-text-not-a-string", _compress("--calib", "{calib_null_text}"), 1,
     "null.jsonl:1: field 'text' is NoneType"),
    ("compress-calib-empty", _compress("--calib", "{calib_empty}"), 1, "no calibration text"),
    # decompress
    ("decompress-artifact-missing", _decompress("{missing}"), 2, "--artifact: {missing}"),
    ("decompress-base-missing", _decompress("{empty}", base="{missing}"), 2, "--base: {missing}"),
    ("decompress-no-manifest", _decompress("{empty}"), 1, "{empty}: no manifest.json"),
    ("decompress-manifest-not-json", _decompress("{bad_manifest}"), 1, "manifest.json"),
    ("decompress-manifest-is-a-list", _decompress("{list_manifest}"), 1, "manifest.json"),
    # demo
    ("demo-max-examples-0", ["demo", "--max-examples", "0"], 2, "--max-examples: '0'"),
    ("demo-max-examples-negative", ["demo", "--max-examples", "-3"], 2, "--max-examples: '-3'"),
    ("demo-family-missing", ["demo", "--family", "{missing}"], 2, "--family: {missing}"),
    # eval
    ("eval-missing-path", ["eval", "{missing}"], 2, "MODEL_DIR: {missing}"),
    ("eval-max-examples-0", ["eval", "{expert}", "--max-examples", "0"], 2, "--max-examples: '0'"),
    ("eval-threads-0", ["eval", "{expert}", "--threads", "0"], 2, "--threads: '0'"),
    ("eval-unknown-domain", ["eval", "{expert}", "--domains", "poetry"], 2, "--domains: invalid choice"),
    ("eval-heldout-missing", ["eval", "{expert}", "--heldout", "{missing}"], 2, "--heldout: {missing}"),
    ("eval-dir-without-config", ["eval", "{empty}", "--domains", "code"], 1, "{empty}: no config.json"),
    ("eval-config-is-a-list", ["eval", "{list_config_model}", "--domains", "code"], 1, "not a JSON object"),
    ("eval-artifact-without-base", ["eval", "{bad_manifest}", "--domains", "code"], 2, "pass --base"),
    ("eval-heldout-record-without-final", ["eval", "{expert}", "--domains", "math", "--heldout", "{heldout_bad}"], 1,
     "math.jsonl:2: missing field 'final'"),
    ("eval-heldout-record-without-text", ["eval", "{expert}", "--domains", "chat", "--heldout", "{heldout_bad}"], 1,
     "chat.jsonl:1: missing field 'text'"),
    ("eval-heldout-not-json", ["eval", "{expert}", "--domains", "code", "--heldout", "{heldout_bad}"], 1,
     "code.jsonl:3: not valid JSON"),
    ("eval-heldout-file-missing", ["eval", "{expert}", "--domains", "code", "--heldout", "{empty}"], 1,
     "code.jsonl: No such file or directory"),
]

#: Rows run again as real subprocesses (the installed CLI, as a user starts it).
SUBPROCESS_ROWS = ["compress-salient-nan", "compress-calib-record-without-text", "eval-heldout-record-without-final",
                   "decompress-manifest-not-json", "inspect-missing-path"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The bad inputs the rows name, built once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    paths: dict[str, Path] = {"base": FAMILY / "base", "expert": FAMILY / "math", "missing": root / "does-not-exist"}

    def directory(name: str, content: dict[str, str] | None = None, weights: bool = False) -> None:
        path = root / name
        path.mkdir()
        for file, text in (content or {}).items():
            (path / file).write_text(text)
        if weights:  # a readable checkpoint, so that the config is what fails
            os.symlink(FAMILY / "base" / "model.safetensors", path / "model.safetensors")
        paths[name] = path

    directory("empty")
    directory("list_config_model", {"config.json": "[1, 2]"}, weights=True)
    directory("bad_json_config_model", {"config.json": '{"model_type": "llama",'}, weights=True)
    directory("bad_manifest", {"manifest.json": "{not json"})
    directory("list_manifest", {"manifest.json": "[]"})
    directory("heldout_bad", {"math.jsonl": json.dumps({"text": "1+1\n#### 2", "question": "1+1", "final": 2}) + "\n"
                                            + json.dumps({"text": "2+2\n#### 4", "question": "2+2"}) + "\n",
                              "chat.jsonl": json.dumps({"turns": []}) + "\n",
                              "code.jsonl": json.dumps({"text": "x = 1"}) + "\n\n{oops\n"})
    calib = root / "calib"
    calib.mkdir()
    for name, text in {"no_text.jsonl": '{"text": "fine"}\n{"prompt": "no text here"}\n',
                       "bad.jsonl": "{oops\n", "list.jsonl": "[1, 2]\n", "null.jsonl": '{"text": null}\n',
                       "empty.jsonl": "\n"}.items():
        (calib / name).write_text(text)
    paths.update(calib_no_text=calib / "no_text.jsonl", calib_bad_json=calib / "bad.jsonl",
                 calib_list=calib / "list.jsonl", calib_null_text=calib / "null.jsonl",
                 calib_empty=calib / "empty.jsonl", file=calib / "bad.jsonl")
    return {key: str(path) for key, path in paths.items()}


def _argv(row_argv: list[str], files: dict[str, str], out: Path) -> list[str]:
    return [part.format(**files, out=out) for part in row_argv]


def _check(code: int, stdout: str, stderr: str, expected_code: int, expected_text: str) -> None:
    assert "Traceback" not in stdout + stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line: {stderr!r}"
    assert lines[0].startswith("meswitch"), lines[0]
    assert ": error: " in lines[0]
    assert expected_text in lines[0], lines[0]
    assert code == expected_code, (code, lines[0])


@pytest.mark.parametrize(("argv", "code", "text"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_user_error_is_one_line(argv, code, text, files, tmp_path, capsys):
    from meswitch.cli import main

    status = main(_argv(argv, files, tmp_path / "out"))
    captured = capsys.readouterr()
    _check(status, captured.out, captured.err, code, text.format(**files))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("row_id", SUBPROCESS_ROWS)
def test_user_error_is_one_line_in_a_subprocess(row_id, files, tmp_path, run_cli):
    _, argv, code, text = next(row for row in ROWS if row[0] == row_id)
    done = run_cli(_argv(argv, files, tmp_path / "out"), tmp_path)
    _check(done.returncode, done.stdout, done.stderr, code, text.format(**files))


def test_an_error_after_the_progress_bar_started_is_still_one_line(tmp_path, run_cli):
    """The bar is cleared before the error: what a terminal shows of stderr is the error alone."""
    done = run_cli(["compress", "--base", str(FAMILY / "base"), "--expert", str(FAMILY / "math"),
                     "--no-ragged-groups", "--out", str(tmp_path / "strict.meswitch")], tmp_path)
    # A terminal shows, of each line, what follows its last carriage return (tqdm redraws with \r).
    assert "\r" in done.stderr  # the bar was drawn
    visible = [line.rsplit("\r", 1)[-1] for line in done.stderr.split("\n")]
    visible = [line for line in visible if line.strip()]
    assert "Traceback" not in done.stderr
    assert len(visible) == 1 and visible[0].startswith("meswitch compress: error: "), done.stderr
    assert "does not divide the width 688" in visible[0]
    assert done.returncode == 1
    assert not (tmp_path / "strict.meswitch").exists()


def test_help_still_prints_help(tmp_path, run_cli):
    done = run_cli(["compress", "--help"], tmp_path)
    assert done.returncode == 0 and "--max-shard-bytes" in done.stdout and "--force" in done.stdout
    assert done.stderr == ""


@pytest.mark.parametrize(("text", "size"), [("134217728", 134217728), ("64MB", 64 * 10**6), ("64MiB", 64 << 20),
                                            ("1GiB", 1 << 30), ("1.5KiB", 1536), (" 2 kb ", 2000)])
def test_sizes(text, size):
    from meswitch.arguments import parse_size

    assert parse_size(text) == size
