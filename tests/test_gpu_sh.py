"""bench/gpu.sh's own logic, on the CPU in seconds: what a run leaves in OUT, the exit code, the budget, the rerun
command and the commit it names. The steps themselves are stood in for by PYTHON=true / false."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.sh"
STEPS = ("b.throughput", "c.loss", "d.e2e", "e.cache_build", "f.kernel_tests")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def gpu_sh(tmp_path: Path, script: Path = SCRIPT, **env: str) -> tuple[int, str, Path]:
    """Run the script with OUT and GPU_SH_WORK under tmp_path; (exit code, summary.txt, OUT)."""
    out, work = tmp_path / "out", tmp_path / "work"
    base = {k: v for k, v in os.environ.items() if k not in ("GIT_COMMIT", "GPU_SH_STEPS", "GPU_SH_BUDGET")}
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                         env={**base, "OUT": str(out), "GPU_SH_WORK": str(work), "GPU_SH_DEVICE": "cpu", **env})
    summary = (out / "summary.txt").read_text()
    assert summary.strip().splitlines()[-1] in run.stdout  # the summary is also what the caller sees last
    return run.returncode, summary, out


def table(summary: str) -> dict[str, list[str]]:
    """The summary's step table: step name -> [rc, seconds, note]."""
    rows = [line.strip("| ").split("|") for line in summary.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows if r[0].strip() in STEPS}


def plant_stale_files(tmp_path: Path) -> None:
    """What an earlier run on the same machine left: its reports and its end-to-end run."""
    (tmp_path / "out").mkdir()
    for name in ("e2e_metrics.json", "train.md", "loss.md", "pytest.log"):
        (tmp_path / "out" / name).write_text("from an earlier run\n")
    (tmp_path / "work" / "e2e").mkdir(parents=True)
    (tmp_path / "work" / "e2e" / "metrics.json").write_text("{}\n")


def test_steps_not_run_leave_no_file_of_an_earlier_run(tmp_path):
    plant_stale_files(tmp_path)
    rc, summary, out = gpu_sh(tmp_path, PYTHON=sys.executable, GPU_SH_STEPS="")
    assert rc == 0 and "result: every step passed" in summary
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt"]
    assert not (tmp_path / "work" / "e2e").exists()
    assert all(row[0] == "skip" and row[2] == "not in GPU_SH_STEPS" for row in table(summary).values())
    assert list(table(summary)) == list(STEPS)


def test_failed_steps_exit_1_name_themselves_and_their_rerun(tmp_path):
    plant_stale_files(tmp_path)
    rc, summary, out = gpu_sh(tmp_path, PYTHON="false", GPU_SH_STEPS="c d", GIT_COMMIT="abc1234")
    rows = table(summary)
    assert rc == 1 and "SOME STEP FAILED" in summary
    assert rows["c.loss"][0] == rows["d.e2e"][0] == "1"
    assert rows["b.throughput"][0] == rows["e.cache_build"][0] == rows["f.kernel_tests"][0] == "skip"
    assert 'rerun the failed steps: GPU_SH_STEPS="c d" GIT_COMMIT=abc1234 bash bench/gpu.sh' in summary
    assert not (out / "e2e_metrics.json").exists()  # step d failed: the earlier run's metrics are not passed off
    assert not (out / "train.md").exists()


def test_a_spent_budget_skips_the_remaining_steps_and_fails(tmp_path):
    rc, summary, _ = gpu_sh(tmp_path, PYTHON="true", GPU_SH_BUDGET="12", GPU_SH_STEPS="b f")
    rows = table(summary)
    assert rc == 1
    assert rows["b.throughput"][0] == rows["f.kernel_tests"][0] == "skip"
    assert "budget is spent" in rows["b.throughput"][2]
    assert 'GPU_SH_STEPS="b f"' in summary


def test_steps_that_pass_leave_exit_0(tmp_path):
    rc, summary, _ = gpu_sh(tmp_path, PYTHON="true", GPU_SH_STEPS="b c", GIT_COMMIT="abc1234")
    rows = table(summary)
    assert rc == 0 and rows["b.throughput"][0] == rows["c.loss"][0] == "0" and "rerun" not in summary


def test_the_commit_is_the_callers_and_unknown_says_so(tmp_path):
    _, summary, _ = gpu_sh(tmp_path / "given", PYTHON="true", GPU_SH_STEPS="", GIT_COMMIT="abc1234")
    assert "commit: abc1234\n" in summary  # as given: not re-derived (or marked dirty) from a .git found there
    copy = tmp_path / "tree"  # a copy of the tree with no .git, as on a GPU machine
    (copy / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, copy / "bench" / "gpu.sh")
    _, summary, _ = gpu_sh(tmp_path / "bare", script=copy / "bench" / "gpu.sh", PYTHON="true", GPU_SH_STEPS="",
                           GIT_CEILING_DIRECTORIES=str(tmp_path))
    assert "commit: unknown (no git checkout here and no GIT_COMMIT" in summary


def test_no_cuda_device_measures_nothing_and_fails(tmp_path):
    rc, summary, _ = gpu_sh(tmp_path, PYTHON="false", GPU_SH_DEVICE="cuda", GPU_SH_STEPS="b")
    assert rc == 1 and "CUDA probe failed (rc 1)" in summary
    assert table(summary)["b.throughput"][0] == "skip"


def test_benchmarks_name_the_callers_commit(monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import common
    finally:
        sys.path.remove(str(REPO / "bench"))
    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    assert common.git_commit() == "abc1234 (from GIT_COMMIT)"


def test_a_passing_end_to_end_step_never_reports_an_earlier_runs_metrics(tmp_path):
    plant_stale_files(tmp_path)  # the stand-in train.py (PYTHON=true) passes and writes nothing
    rc, summary, out = gpu_sh(tmp_path, PYTHON="true", GPU_SH_STEPS="d")
    assert rc == 0 and table(summary)["d.e2e"][0] == "0"
    assert not (out / "e2e_metrics.json").exists()


def test_a_failed_end_to_end_step_does_not_report_the_metrics_it_wrote(tmp_path):
    fake = tmp_path / "python"  # writes metrics.json into --out, then fails (as a crash in the figures would)
    fake.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = --out ] && mkdir -p "$2" && echo {} >"$2/metrics.json"; '
                    'shift; done\nexit 1\n')
    fake.chmod(0o755)
    rc, summary, out = gpu_sh(tmp_path, PYTHON=str(fake), GPU_SH_STEPS="d")
    assert rc == 1 and table(summary)["d.e2e"][0] == "1"
    assert (tmp_path / "work" / "e2e" / "metrics.json").exists() and not (out / "e2e_metrics.json").exists()


@pytest.mark.parametrize("skip, passes", [
    ("tests/test_fused_dice.py:497: needs two CUDA devices (logits on cuda:1 while cuda:0 is current)", True),
    ("tests/test_fused_dice.py:44: the Triton path needs TRITON_INTERPRET=1 (CPU interpreter) or, with the "
     "interpreter off, a CUDA GPU", False)])
def test_on_cuda_a_kernel_test_skipped_for_another_reason_fails_the_step(tmp_path, skip, passes):
    fake = tmp_path / "python"  # passes the CUDA probe; as pytest, reports one skip
    fake.write_text(f'#!/bin/sh\n[ "$2" = pytest ] && echo "SKIPPED [1] {skip}" && echo "1 passed, 1 skipped"\nexit 0\n')
    fake.chmod(0o755)
    rc, summary, _ = gpu_sh(tmp_path, PYTHON=str(fake), GPU_SH_DEVICE="cuda", GPU_SH_STEPS="f")
    row = table(summary)["f.kernel_tests"]
    if passes:
        assert rc == 0 and row[0] == "0"
    else:
        assert rc == 1 and row[0] == "skips" and row[2].startswith("UNEXPECTED SKIPS: SKIPPED [1] tests/test_fused")
        assert 'GPU_SH_STEPS="f"' in summary


def test_throughput_bench_runs_every_cpu_row_with_train_pys_defaults(tmp_path):
    """Step b's script on the CPU at tiny sizes: every row it can time there runs train.py's model and step with
    train.py's defaults (context slices included, the seed baseline reading the neighbours' files too), none fails."""
    out = tmp_path / "throughput.md"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--device", "cpu", "--quick",
                          "--rows", "seed,cache,resident,channels_last", "--workers", "0", "--steps", "1", "--warmup", "1",
                          "--cache-dir", str(tmp_path / "c"), "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = out.read_text()
    assert "4 modalities x 3 slices of context in" in report and "rows failed: none" in report
    rows = [line.split("|")[1:3] for line in report.splitlines() if line.startswith("| ") and "slices/s" not in line]
    timed = [label.strip() for label, rate in rows if rate.strip().replace(",", "").replace(".", "").isdigit()]
    assert len(timed) == 4 and timed[0].startswith("seed baseline"), rows


def test_the_seed_baseline_reads_each_slice_with_its_neighbours(tmp_path):
    """bench/throughput.py's seed dataset: slice k's input is slices k-1, k, k+1 (ends repeated), each read and
    normalised on its own, neighbour by neighbour as feed.with_context orders them; the mask is slice k's."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import throughput
    finally:
        sys.path.remove(str(REPO / "bench"))
    import data

    root = data.write_synthetic(tmp_path / "ph", 1, 5)
    (files,) = data.list_h5(root).values()
    dataset = throughput.H5Slices([files], 16, [0, 1, 2, 3], context=1)
    single = throughput.H5Slices([files], 16, [0, 1, 2, 3], context=0)
    assert len(dataset) == 5
    for k, (below, above) in ((0, (0, 1)), (2, (1, 3)), (4, (3, 4))):
        x, y = dataset[k]
        assert x.shape == (12, 16, 16) and torch.equal(y, single[k][1])
        for j, z in enumerate((below, k, above)):
            assert torch.equal(x[4 * j:4 * j + 4], single[z][0]), (k, j)
