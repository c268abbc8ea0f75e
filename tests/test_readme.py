"""The README says what the code does: its commands parse, the flags it names exist, its files are there."""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys

import pytest

import mutants
import predict
import train
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def commands(script: str) -> list[list[str]]:
    """The arguments of every `python SCRIPT ...` line in the README's code blocks."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", README, re.S)
    found = []
    for line in (line.split("#")[0] for block in blocks for line in block.splitlines()):
        words = shlex.split(line)
        for i, word in enumerate(words[1:], 1):
            if word == script and words[i - 1].startswith("python"):
                found.append([w for w in words[i + 1:] if w not in ("[CASE_DIR", "...]")])
    return found


def flags_in(help_text: str) -> set[str]:
    """The flags a --help text lists."""
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


def help_flags(argv_help) -> set[str]:
    """The flags of a parse function's --help."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        argv_help(["--help"])
    return flags_in(out.getvalue())


def bench_flags(script: str) -> set[str]:
    """The flags of bench/SCRIPT --help."""
    text = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120).stdout
    assert text, f"bench/{script} --help printed nothing"
    return flags_in(text)


def test_every_train_command_parses():
    found = commands("train.py")
    assert len(found) >= 5
    for args in found:
        if "--resume" in args:  # needs a stopped run: the flags alone must parse
            train.make_parser().parse_args(args)
        else:
            assert isinstance(train.parse_args(args), train.TrainConfig)


def test_every_predict_command_parses():
    found = commands("predict.py")
    assert found
    for args in found:
        predict.parse_args(args)


def test_every_flag_the_readme_names_exists():
    known = help_flags(train.make_parser().parse_args) | help_flags(predict.parse_args) | {"--nproc_per_node"}
    known |= bench_flags("throughput.py") | bench_flags("loss.py") | bench_flags("cache.py") | bench_flags("cv.py")
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", README))
    assert named - known == set()


def test_the_file_table_names_files_that_exist():
    table = re.findall(r"^\| `([^`]+)` \|", README.split("## Set up")[0], re.M)
    assert {"data.py", "unet.py", "train.py", "predict.py", "inference.py", "figures.py", "metrics.py"} <= set(table)
    for name in table:
        assert (ROOT / name.rstrip("/")).exists(), name


def test_the_mutant_count_the_readme_gives_is_the_list():
    """`tests/mutants.py` grows with the code; the README's "plants N bugs" must follow it."""
    said = re.findall(r"`python tests/mutants.py` plants (\d+) bugs", README)
    assert said == [str(len(mutants.MUTANTS))]
