"""train.py under torchrun: two CPU processes, gloo backend, one tiny epoch (with a --time-budget, whose epoch
count rank 0 decides and broadcasts).

The data are 3 synthetic volumes of 8 slices (6 with brain each; split 1/1/1 by patient), so the training set
has 6 slices: with batch 2, one process runs 3 steps per epoch and each of two ranks runs 6 // (2 * 2) = 1,
which makes the per-epoch batch and slice counts tell one rank from two (4 slices with world 2, 6 with world 1).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA, SIZE, BATCH, WORLD = "synthetic:3x8", 32, 2, 2
TIMEOUT_S = 180

# Runs train.py unchanged as __main__ (runpy) and records, per rank, the training-set indices of every batch the
# training loop steps on: feed.augment sees each batch the loop uses (feed.TrainBatches calls the module's
# `augment`, so patching the attribute is enough; load_slices is wrapped only to learn the training set's images,
# the first set it loads). Written at exit to $RECORD_DIR/rank<R>.json.
RECORDER = r'''
import atexit, json, os, runpy, sys
repo = os.environ["REPO"]
sys.path.insert(0, repo)
import feed
record, train_images = [], []
original_load, original_augment = feed.load_slices, feed.augment

def load_slices(*args, **kwargs):
    slices = original_load(*args, **kwargs)
    if not train_images:
        train_images[:] = [slices.images.float().flatten(1)]
    return slices

def augment(x, y, *args, **kwargs):
    images = train_images[0]
    record.append([int((images == xi.flatten().to(images.device)).all(1).nonzero()[0, 0]) for xi in x])
    return original_augment(x, y, *args, **kwargs)

feed.load_slices, feed.augment = load_slices, augment
rank = os.environ.get("RANK", "0")
atexit.register(lambda: open(os.path.join(os.environ["RECORD_DIR"], f"rank{rank}.json"), "w").write(json.dumps(record)))
sys.argv = [os.path.join(repo, "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, tmp: Path, out: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_port", str(free_port()),
           script, "--data", DATA, "--size", str(SIZE), "--epochs", "1", "--base", "4", "--depth", "2",
           "--batch-size", str(BATCH), "--context", "0", "--device", "cpu", "--compile", "off", "--time-budget", "30", "--cache-dir", str(tmp), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPO": str(REPO), **(extra_env or {})}
    for attempt in range(2):  # a port taken between free_port() and torchrun's bind is the machine's fault: retry once
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s; output tail:\n{(e.stdout or b'')[-3000:]!r}\n{(e.stderr or b'')[-3000:]!r}")
        if proc.returncode == 0 or not any(s in proc.stderr for s in ("EADDRINUSE", "address already in use", "Address already in use")):
            break
        cmd[cmd.index("--master_port") + 1] = str(free_port())
    assert proc.returncode == 0, f"torchrun exit code {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One plain `torchrun train.py` run: (process, run folder, cache dir)."""
    tmp = tmp_path_factory.mktemp("ddp")
    proc = torchrun("train.py", tmp, tmp / "run")
    return proc, tmp / "run", tmp


@pytest.fixture(scope="module")
def recorded_run(ddp_run, tmp_path_factory):
    """A second run through the recorder (same cache): the batch indices each rank drew."""
    _, _, cache_dir = ddp_run
    tmp = tmp_path_factory.mktemp("ddp_record")
    script = tmp / "record_batches.py"
    script.write_text(RECORDER)
    torchrun(str(script), cache_dir, tmp / "run", {"RECORD_DIR": str(tmp)})
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def n_train_slices(run: Path, cache_dir: Path) -> int:
    """Training slices of this run, from its split.json and the cache's meta.json (as train.py counts them)."""
    split = json.loads((run / "split.json").read_text())
    metas = [json.loads(p.read_text()) for p in cache_dir.glob("h5-*/meta.json")]
    meta = next(m for m in metas if m["size"] == SIZE)
    kept = {v["id"]: len(v["slices"]) for v in meta["volumes"]}
    return sum(kept[v] for v in split["train"])


def test_ddp_run_writes_the_run_folder(ddp_run):
    proc, run, _ = ddp_run
    for name in ("best.pt", "metrics.json", "log.jsonl", "config.json", "split.json"):
        assert (run / name).is_file(), f"{name} missing from {sorted(p.name for p in run.iterdir())}"
    lines = (run / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1, lines  # rank 0 alone writes the log: one epoch, one line
    assert json.loads(lines[0])["epoch"] == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["test"]["volumes"] == 1
    # --time-budget: rank 0 counts the epochs that fit and broadcasts the count (a rank left out would hang)
    assert metrics["epochs"] == 1 and proc.stdout.count("time budget 30 min:") == 1


def expected_counts(run: Path, cache_dir: Path) -> tuple[int, int]:
    """(batches per rank per epoch, slices per epoch over all ranks) as train.py plans them with resident data."""
    n = n_train_slices(run, cache_dir)
    per_rank = max(1, n // (BATCH * WORLD))
    assert per_rank * BATCH * WORLD != (n // BATCH) * BATCH, "test data do not tell one rank from two; change DATA or BATCH"
    return per_rank, per_rank * BATCH * WORLD


def test_ddp_each_rank_runs_its_share_of_the_epoch(recorded_run, ddp_run):
    _, run, cache_dir = ddp_run
    per_rank, _ = expected_counts(run, cache_dir)
    assert len(recorded_run) == WORLD
    for r, batches in enumerate(recorded_run):  # one process alone would run 3 batches of 2
        assert len(batches) == per_rank, f"rank {r} ran {len(batches)} steps, expected {per_rank}: {batches}"
        assert all(len(b) == BATCH for b in batches), batches


def test_ddp_logged_throughput_counts_each_slice_once(ddp_run):
    _, run, cache_dir = ddp_run
    per_rank, expected = expected_counts(run, cache_dir)
    record = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    logged = record["slices_per_s"] * record["seconds"]  # slices the log says the epoch trained on
    assert logged == pytest.approx(expected, rel=1e-6), (
        f"log.jsonl: slices_per_s x seconds = {logged:.3f} slices, but the epoch trained on {expected} "
        f"({per_rank} batch(es) of {BATCH} on each of {WORLD} ranks)")


def test_ddp_ranks_draw_different_batches(recorded_run):
    assert recorded_run[0] != recorded_run[1], f"both ranks trained on the same batches: {recorded_run[0]}"
    assert [sorted(b) for b in recorded_run[0]] != [sorted(b) for b in recorded_run[1]]


def test_ddp_ranks_draw_disjoint_slices_in_an_epoch(recorded_run):
    seen = [{i for b in batches for i in b} for batches in recorded_run]
    assert not seen[0] & seen[1], f"slices trained on by both ranks in epoch 1: {sorted(seen[0] & seen[1])}"
