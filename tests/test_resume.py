"""Long runs: a run killed or interrupted and resumed ends exactly like a run never stopped; nothing finished is
lost; a failed checkpoint write, a diverging loss and a conflicting flag each stop with one line."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import inference
import train
from conftest import ROOT

# 4 phantoms of 10 slices: split 2/1/1, ~16 training slices, batch 2 → 8 steps an epoch of a 48 px U-Net
ARGS = ["--data", "synthetic:4x10", "--size", "48", "--epochs", "5", "--base", "8", "--depth", "2", "--batch-size", "2",
        "--norm", "instance", "--device", "cpu"]


def start(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *ARGS, "--cache-dir", str(cache), "--out", str(out),
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def resume(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def wait_for_first_epoch(proc: subprocess.Popen, out: Path) -> None:
    """Until the run has finished epoch 1 (its log line and last.pt are on disk); the run is then in epoch 2+."""
    deadline = time.time() + 240
    while not ((out / "last.pt").exists() and (out / "log.jsonl").exists()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not finish its first epoch in time"
        time.sleep(0.02)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run_to_end(out: Path, cache: Path, *extra: str) -> Path:
    """A run never stopped."""
    proc = start(out, cache, *extra)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return out


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> Path:
    """The same run, never stopped."""
    return run_to_end(tmp_path_factory.mktemp("ref") / "run", cache)


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_sigkill_mid_run_then_resume_ends_identically(reference, cache, tmp_path):
    out = tmp_path / "run"
    proc = start(out, cache)
    wait_for_first_epoch(proc, out)
    proc.kill()  # SIGKILL: nothing can be saved; the run continues from the last end of epoch
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "metrics.json").exists()
    done = resume(out)
    assert done.returncode == 0, done.stderr
    assert metrics_of(out) == metrics_of(reference)
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == torch.load(reference / "best.pt", weights_only=True)["epoch"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5]


def test_sigint_saves_mid_epoch_prints_the_resume_line_and_resumes_identically(reference, cache, tmp_path):
    out = tmp_path / "run"
    proc = start(out, cache)
    wait_for_first_epoch(proc, out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "it/s" not in line]
    assert lines[-1].startswith("stopped by SIGINT") and f"python train.py --resume {out}" in lines[-1]
    assert "Traceback" not in stderr and not (out / "metrics.json").exists()
    progress = torch.load(out / "last.pt", weights_only=False)["progress"]
    assert progress["epoch"] >= 2 and progress["batch"] >= 1  # stopped after a step, inside an epoch
    done = resume(out)
    assert done.returncode == 0, done.stderr
    assert f"batch {progress['batch']} of 8" in done.stdout
    assert metrics_of(out) == metrics_of(reference)


def test_a_finished_out_is_refused_and_left_byte_identical(reference, cache):
    before = digest(reference)
    proc = start(reference, cache)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert stderr.strip().count("\n") == 0 and "holds a finished run" in stderr and "--overwrite on" in stderr
    assert digest(reference) == before
    again = resume(reference)
    assert again.returncode == 2 and "finished" in again.stderr and digest(reference) == before


def run_in_process(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = train.cli(argv)
    return code, err.getvalue()


def test_a_failed_checkpoint_write_keeps_the_previous_one(cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, writes = torch.save, []

    def disk_full_on_second_last(obj, path, *args, **kwargs):
        if Path(path).name.endswith("last.pt"):
            writes.append(path)
            if len(writes) == 2:
                Path(path).write_bytes(b"partial")  # what a full disk leaves behind, under the temporary name
                raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second_last)
    code, err = run_in_process([*ARGS, "--cache-dir", str(cache), "--out", str(out)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "could not write" in lines[0] and "last.pt" in lines[0] and "No space left" in lines[0]
    state = torch.load(out / "last.pt", weights_only=False)  # the epoch-1 checkpoint, whole
    assert state["progress"]["epoch"] == 2 and state["progress"]["batch"] == 0
    assert not list(out.glob(".tmp*")) and not (out / "metrics.json").exists()


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_non_finite_loss_stops_with_one_line(cache, tmp_path, monkeypatch, bad):
    out = tmp_path / "run"
    real_loss, calls = train.dice_bce_loss, []

    def nan_from_step_11(logits, target, **kwargs):
        calls.append(1)
        loss = real_loss(logits, target, **kwargs)
        return loss * float(bad) if len(calls) >= 11 and logits.requires_grad else loss

    monkeypatch.setattr(train, "dice_bce_loss", nan_from_step_11)
    code, err = run_in_process([*ARGS, "--cache-dir", str(cache), "--out", str(out)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    # epoch 1: 8 training steps + 1 validation call; the 11th call is step 2 of epoch 2
    assert "NaN or infinite at epoch 2, step 2 of 8" in lines[0] and str(out / "last.pt") in lines[0], lines[0]
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    assert torch.load(out / "last.pt", weights_only=False)["progress"]["epoch"] == 2
    assert not (out / "metrics.json").exists() and not (out / "curves.png").exists()


def test_a_non_finite_loss_in_epoch_1_names_no_checkpoint(cache, tmp_path, monkeypatch):
    """Stopped in epoch 1, before any last.pt exists: the line says no checkpoint was written, not a last.pt."""
    out = tmp_path / "run"
    real_loss, calls = train.dice_bce_loss, []

    def nan_from_step_3(logits, target, **kwargs):
        calls.append(1)
        loss = real_loss(logits, target, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(train, "dice_bce_loss", nan_from_step_3)
    code, err = run_in_process([*ARGS, "--cache-dir", str(cache), "--out", str(out)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "at epoch 1, step 3 of 8" in lines[0] and "no checkpoint was written yet" in lines[0], lines[0]
    assert "last.pt" not in lines[0] and not (out / "last.pt").exists()


def test_a_failed_figure_leaves_the_run_resumable(cache, tmp_path, monkeypatch):
    """metrics.json, the mark of a finished run, is written after the figures: a figure that fails (a full disk)
    leaves no metrics.json, so the --resume the error line names draws them and writes the metrics the failed
    attempt's test phase had computed."""
    out, real_test, tested = tmp_path / "run", train.test, []

    def test_recorded(*args, **kwargs):
        result = real_test(*args, **kwargs)
        tested.append(result[0])
        return result

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "test", test_recorded)
    monkeypatch.setattr(train.figures, "run_figures", disk_full)
    code, err = run_in_process([*ARGS, "--cache-dir", str(cache), "--out", str(out)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "No space left" in lines[0] and f"--resume {out}" in lines[0], err
    assert len(tested) == 1 and not (out / "metrics.json").exists() and not (out / "curves.png").exists()
    monkeypatch.undo()
    code, err = run_in_process(["--resume", str(out)])
    assert code == 0, err
    assert metrics_of(out) == json.loads(json.dumps(tested[0])) and (out / "curves.png").is_file()


@pytest.mark.parametrize("where", ["cache build", "test phase"])
def test_ctrl_c_outside_the_training_loop_is_one_line(where, cache, tmp_path, monkeypatch):
    """Ctrl-C while the cache builds (nothing trained) or in the test phase (last.pt written): exit 130 and one line,
    the resume command only where there is something to resume."""
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(*((train.data, "prepare") if where == "cache build" else (train, "test")), interrupted)
    code, err = run_in_process([*ARGS, "--epochs", "1", "--cache-dir", str(cache), "--out", str(out)])
    lines = err.strip().splitlines()
    assert code == 130 and len(lines) == 1 and lines[0].startswith("train.py: interrupted"), err
    assert (f"python train.py --resume {out}" in lines[0]) == (where == "test phase")
    assert "nothing to resume" in lines[0] if where == "cache build" else (out / "last.pt").is_file()


def test_resume_refuses_a_conflicting_flag_and_a_folder_without_a_run(reference, tmp_path):
    code, err = run_in_process(["--resume", str(reference), "--lr", "0.5"])
    assert code == 2 and err.count("\n") == 1 and "--lr 0.5 conflicts" in err
    code, err = run_in_process(["--resume", str(tmp_path)])
    assert code == 2 and "config.json" in err


def test_a_run_killed_before_its_first_checkpoint_is_named_so(reference, cache, tmp_path):
    """A SIGKILL during epoch 1 leaves config.json and split.json, no last.pt: the refusal says there is nothing to
    resume and points to --overwrite on, not to a --resume that would fail."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "split.json"):
        (out / name).write_bytes((reference / name).read_bytes())
    code, err = run_in_process([*ARGS, "--cache-dir", str(cache), "--out", str(out)])
    assert code == 2 and err.count("\n") == 1, err
    assert "before its first epoch ended" in err and "--overwrite on" in err and "--resume" not in err
    code, err = run_in_process(["--resume", str(out)])
    assert code == 2 and err.count("\n") == 1 and "no last.pt" in err and "--overwrite on" in err


def test_a_crash_in_the_test_phase_keeps_the_checkpoints(cache, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def broken(*args, **kwargs):
        raise ValueError("planted")

    monkeypatch.setattr(inference, "choose_postprocessing", broken)
    code, err = run_in_process([*ARGS, "--epochs", "1", "--cache-dir", str(cache), "--out", str(out)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "test phase failed (ValueError: planted)" in lines[0]
    assert f"--resume {out}" in lines[0]
    before = (out / "best.pt").read_bytes()
    monkeypatch.undo()
    code, err = run_in_process(["--resume", str(out)])  # training is done: straight to the test phase
    assert code == 0, err
    assert (out / "metrics.json").is_file() and json.loads((out / "metrics.json").read_text())["epochs_run"] == 1
    after = torch.load(out / "best.pt", weights_only=True)
    assert after["epoch"] == 1 and before != (out / "best.pt").read_bytes()  # now with the chosen post-processing
