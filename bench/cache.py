"""Peak resident memory and time of building the preprocessed cache, on synthetic sets of growing size.

    python bench/cache.py --volumes 4 16 --slices 155 --size 240

Each build runs in a fresh child process (so its peak RSS is its own) over Kaggle-layout .h5 phantoms written
beforehand. If the peak does not grow with the number of volumes, the build streams volume by volume, and the
full Kaggle set (369 volumes x 155 slices = 57,195 slices) needs no more memory than a few volumes.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402

CHILD = """
import resource, sys, time
sys.path.insert(0, {repo!r})
import data
t = time.perf_counter()
cache = data.prepare({spec!r}, {size}, {cache!r})
print(time.perf_counter() - t, cache.meta["kept"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volumes", type=int, nargs="+", default=[4, 16])
    p.add_argument("--slices", type=int, default=155)
    p.add_argument("--size", type=int, default=240)
    p.add_argument("--workdir", type=Path, default=None, help="where phantoms and caches go (default: a temp folder)")
    args = p.parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="brats-cache-bench-"))).resolve()
    repo = str(Path(__file__).resolve().parents[1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo).stdout.strip()
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"date {datetime.date.today()}, commit {commit or 'unknown'}")
    rows = []
    for v in args.volumes:
        spec = f"synthetic:{v}x{args.slices}"
        data.prepare(spec, 8, work)  # writes the phantoms (and a tiny cache) outside the measured process
        cache = work / f"measured-{v}"
        shutil.rmtree(cache, ignore_errors=True)
        (cache).mkdir(parents=True)
        (cache / f"synthetic-v{data.SYNTHETIC_VERSION}-{v}x{args.slices}").symlink_to(work / f"synthetic-v{data.SYNTHETIC_VERSION}-{v}x{args.slices}")
        out = subprocess.run([sys.executable, "-c", CHILD.format(repo=repo, spec=spec, size=args.size, cache=str(cache))],
                             capture_output=True, text=True, check=True).stdout.split()
        seconds, kept, rss_kib = float(out[0]), int(out[1]), int(out[2])
        disk = sum(f.stat().st_size for f in cache.glob("h5-*/*") if f.is_file())
        rows.append((v, v * args.slices, kept, seconds, rss_kib / 2**20, disk / 2**30))
    print(f"\n| volumes | raw slices | kept slices | build s | slices/s | peak RSS GiB | cache GiB |\n|---:|---:|---:|---:|---:|---:|---:|")
    for v, raw, kept, s, rss, disk in rows:
        print(f"| {v} | {raw} | {kept} | {s:.1f} | {raw / s:.0f} | {rss:.2f} | {disk:.2f} |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
