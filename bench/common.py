"""Helpers shared by the benchmarks (bench/loss.py, bench/throughput.py, bench/cache.py, bench/cpu_speed.py, ...): what ran, where, when.

Every benchmark prints these in its header, so a number in bench/RESULTS.md can be traced to a commit,
a machine and a date. torch is imported only inside the functions that need it.

    from common import git_commit, machine, utc_now, sync   # bench/ is on sys.path for bench scripts
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(paths: tuple[str, ...] = ()) -> str:
    """The commit the numbers belong to: the GIT_COMMIT environment variable when set (bench/gpu.sh sets it from
    the caller's checkout: the copy of the tree on a GPU machine may carry a stale .git, or none), else the short
    HEAD plus "-dirty (N uncommitted: ...)" when `paths` (default: the whole tree) have changes, else a COMMIT
    file at the repository root; it says which one it used.
    """
    if os.environ.get("GIT_COMMIT"):
        return f"{os.environ['GIT_COMMIT']} (from GIT_COMMIT)"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        if head.returncode == 0:
            status = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=REPO,
                                    capture_output=True, text=True).stdout.splitlines()
            changed = [line[3:] for line in status if line.strip()]
            if not changed:
                return head.stdout.strip()
            shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
            return f"{head.stdout.strip()}-dirty ({len(changed)} uncommitted: {shown})"
    except OSError:  # no git executable
        pass
    try:
        with open(os.path.join(REPO, "COMMIT")) as f:
            return f"{f.readline().strip()} (from the COMMIT file; no git checkout here)"
    except OSError:
        return "unknown (no git checkout, GIT_COMMIT or COMMIT file)"


def cpu_model() -> str:
    """CPU model name and logical CPU count, e.g. "AMD EPYC 7763 64-Core Processor (2 logical CPUs)"."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:  # not Linux
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def machine(device: object = "cpu") -> str:
    """One line naming what runs the benchmark: the GPU (name, memory, capability) and the host CPU.

    `device` is a torch.device or a string like "cuda", "cuda:1" or "cpu". CPU timings and the host
    side of GPU timings (launch overhead) both depend on the CPU, so it is always named.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return f"CPU {cpu_model()}; torch {torch.__version__}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    p = torch.cuda.get_device_properties(index)
    return (f"GPU {p.name} (cuda:{index}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
            f"sm_{p.major}{p.minor}), CUDA {torch.version.cuda}, torch {torch.__version__}; host CPU {cpu_model()}")


def utc_now() -> str:
    """The current time in UTC, to the second, e.g. "2026-11-27 14:03:11 UTC"."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def sync(device: object) -> None:
    """Wait for all queued work on `device` (CUDA); a no-op on the CPU, where work is synchronous."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
