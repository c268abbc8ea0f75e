"""Speed and peak memory of building the preprocessed cache (data.prepare), with 1 and N worker processes.

    python bench/cache.py --volumes 8 --workers 1 2                        # .h5 phantoms of the real shape, 240 x 240
    python bench/cache.py --volumes 8 --workers 1 2 --size 128 --crop      # the CPU recipe's setting
    python bench/cache.py --data nifti:../shared/data/brats-sample --workers 1 2 --size 128 --crop
    python bench/cache.py --volumes 4 16 32 --workers 1                    # peak memory against the number of volumes

The default source is Kaggle-layout .h5 phantoms (data.write_synthetic: 155 slices of 240 x 240 x 4 per volume,
float32 with lzf compression), written once before anything is timed. Each build runs in a fresh child process
into an empty cache folder, the files already in the page cache (not a cold disk). Reported per build:
- slices/s: raw slices (all of them, kept or dropped) / wall time of data.prepare;
- workers' start-up: seconds (and CPU seconds) until that many spawned processes have started, each importing
  data.py and torch, measured apart; "after start-up" figures take it out of the build's time (and CPU time);
- CPU ms/slice: user + system time of the build process and its workers per raw slice. On shared cores it is the
  steadier figure: a build whose workers each had a core of their own would run at workers x 1000 / it slices/s;
- peak RSS: the build process's own peak and its largest worker's (VmHWM in /proc, sampled every 20 ms for the
  workers), and the largest sum of the RSS of the build process and its workers seen in those samples. Not
  getrusage's ru_maxrss: a child starts from the RSS of the process that forked it, across exec (a 13 MiB
  process forked by one of 218 MiB reports 218 MiB; here a build process whose own peak was 0.24 GiB reported
  1.31 GiB, the RSS of this script after writing the phantoms);
- load: the 1-minute load average when the build ended (other jobs on the machine slow a build down).
For .h5 sources the raw read rate of the files alone (h5py, image and mask of every slice into preallocated arrays,
nothing else) is measured too, in 1 and N processes: the floor that decompressing the files sets.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules; bench/ is the script's own

import data  # noqa: E402
from common import git_commit, machine, utc_now  # noqa: E402

GiB = 2**30


def cpu_seconds(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def child_build(spec: str, size: int, crop: bool, cache: str, workers: int) -> dict:
    """One measured data.prepare in this (fresh) process."""
    cpu = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    built = data.prepare(spec, size, Path(cache), crop, workers=workers)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "raw": sum(v["depth"] for v in built.meta["volumes"]), "kept": built.meta["kept"],
            "cpu": cpu_seconds(resource.RUSAGE_SELF) - cpu[0] + cpu_seconds(resource.RUSAGE_CHILDREN) - cpu[1],
            "self_rss": memory(os.getpid())[1]}


def read_files(files: list[str]) -> tuple[int, float]:
    """Read the image and mask of every .h5 file into preallocated arrays, nothing else (the floor); the number of
    files and the CPU seconds it took."""
    import h5py
    import numpy as np

    cpu = time.process_time()
    image = np.empty((data.RAW_SIZE, data.RAW_SIZE, len(data.CHANNELS)), np.float32)
    mask = np.empty((data.RAW_SIZE, data.RAW_SIZE, 3), np.uint8)
    for path in files:
        with h5py.File(path, "r") as f:  # as data.read_h5_volume reads them
            f["image"].read_direct(image)
            f["mask"].read_direct(mask)
    return len(files), time.process_time() - cpu


def child_read(root: str, workers: int) -> dict:
    """The raw read rate of an .h5 source's files, one volume per task, in `workers` spawned processes."""
    import multiprocessing

    volumes = [[str(p) for p in files] for files in data.list_h5(Path(root)).values()]
    if workers == 1:
        t = time.perf_counter()
        done = [read_files(v) for v in volumes]
        seconds = time.perf_counter() - t
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(read_files, [volumes[0][:1]] * workers)  # started and warm: the floor leaves start-up out
            t = time.perf_counter()
            done = pool.map(read_files, volumes, chunksize=1)
            seconds = time.perf_counter() - t
    return {"seconds": seconds, "raw": sum(n for n, _ in done), "cpu": sum(cpu for _, cpu in done)}


def wait_for_all(barrier) -> None:
    barrier.wait()


def child_startup(workers: int) -> dict:
    """Seconds until `workers` spawned processes have all started (each imports data.py, hence torch), as the
    build's workers do before their first volume."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    procs = [ctx.Process(target=wait_for_all, args=(barrier,)) for _ in range(workers)]
    t = time.perf_counter()
    for proc in procs:
        proc.start()
    barrier.wait()
    seconds = time.perf_counter() - t
    for proc in procs:
        proc.join()
    return {"seconds": seconds, "cpu": cpu_seconds(resource.RUSAGE_CHILDREN)}


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (children are listed per thread that started them)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:  # the thread or process ended meanwhile
                pass
    return tree


def memory(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in bytes, from /proc: VmRSS and VmHWM, which exec resets (unlike
    getrusage's ru_maxrss, which a child inherits from the process that started it)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):  # ended, or a zombie
        return 0, 0


def run_child(args: list[str]) -> tuple[dict, dict]:
    """Run this script as a child (`--child ...`), sampling its process tree every 20 ms; its JSON answer and the
    memory seen: peak RSS of the child itself, of its largest descendant (a build worker), and of their sum."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    total, done = 0, threading.Event()

    def sample() -> None:
        nonlocal total
        while not done.is_set():
            now = 0
            for pid in process_tree(proc.pid):
                rss, hwm = memory(pid)
                now += rss
                peaks[pid] = max(peaks.get(pid, 0), hwm)
            total = max(total, now)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"child {args} failed with exit code {proc.returncode}")
    workers = [v for pid, v in peaks.items() if pid != proc.pid]
    return json.loads(out.strip().splitlines()[-1]), {"worker": max(workers, default=0), "total": total}


def phantoms(work: Path, volumes: int, slices: int, distinct: int = 0) -> Path:
    """A Kaggle-layout folder of `volumes` phantoms; with 0 < distinct < volumes, volume k's slice files are hard
    links to those of phantom (k - 1) % distinct + 1."""
    if not 0 < distinct < volumes:
        return data.write_synthetic(work / f"phantoms-{volumes}x{slices}", volumes, slices)
    source = data.h5_folder(data.write_synthetic(work / f"phantoms-{distinct}x{slices}", distinct, slices))
    folder = work / f"phantoms-{volumes}x{slices}-of-{distinct}"
    files = folder / source.relative_to(source.parents[2])
    shutil.rmtree(folder, ignore_errors=True)
    files.mkdir(parents=True)
    for k in range(1, volumes + 1):
        for s in range(slices):
            os.link(source / f"volume_{(k - 1) % distinct + 1}_slice_{s}.h5", files / f"volume_{k}_slice_{s}.h5")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volumes", type=int, nargs="+", default=[8], help="phantom volumes per build (several: one set each)")
    p.add_argument("--slices", type=int, default=155)
    p.add_argument("--distinct", type=int, default=0,
                   help="write only this many distinct phantoms and fill the other volumes with hard links to their "
                        "files (every volume then costs the same to build; writing a phantom takes seconds); 0: all")
    p.add_argument("--data", default=None, help="measure this --data source (h5:DIR or nifti:DIR) instead of phantoms")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--size", type=int, default=240)
    p.add_argument("--crop", action="store_true", help="crop to the brain before resizing (train.py --crop on)")
    p.add_argument("--no-floor", action="store_true", help="skip the raw read rate of the .h5 files")
    p.add_argument("--workdir", type=Path, default=None, help="where phantoms and caches go (default: a temp folder)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            answer = child_build(rest[0], int(rest[1]), rest[2] == "crop", rest[3], int(rest[4]))
        elif kind == "read":
            answer = child_read(rest[0], int(rest[1]))
        else:
            answer = child_startup(int(rest[0]))
        print(json.dumps(answer))
        return

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="brats-cache-bench-"))).resolve()
    print(f"machine: {machine('cpu')}; {len(os.sched_getaffinity(0))} usable cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start\ndate: {utc_now()}\ncommit: {git_commit(('data.py', 'bench/cache.py'))}")
    sources = []  # (spec, label, volumes)
    if args.data:
        sources.append((args.data, args.data, None))
    else:
        for v in args.volumes:
            folder = phantoms(work, v, args.slices, args.distinct)  # not timed
            copies = f" ({args.distinct} distinct)" if 0 < args.distinct < v else ""
            sources.append((f"h5:{folder}", f".h5 phantoms {v}x{args.slices}{copies}", v))
    startup = {w: run_child(["startup", str(w)])[0] for w in args.workers if w > 1}  # seconds and CPU seconds
    rows, floors = [], []
    for spec, label, v in sources:
        base = None
        for w in args.workers:
            cache = work / f"cache-{v or 'data'}-{w}"
            shutil.rmtree(cache, ignore_errors=True)
            r, mem = run_child(["build", spec, str(args.size), "crop" if args.crop else "full", str(cache), str(w)])
            disk = sum(f.stat().st_size for f in cache.glob("*/*") if f.is_file())
            base = base or r["raw"] / r["seconds"]
            rows.append((label, w, r, mem, disk, base, os.getloadavg()[0]))
            shutil.rmtree(cache, ignore_errors=True)
        if spec.startswith("h5:") and not args.no_floor:
            for w in args.workers:
                r, _ = run_child(["read", spec[3:], str(w)])
                floors.append((label, w, r, os.getloadavg()[0]))

    print(f"\nsize {args.size}, {'cropped to the brain' if args.crop else 'whole frame'}\n")
    print("| source | workers | raw slices | kept | build s | slices/s | speed-up | workers' start-up s | slices/s after "
          "start-up | CPU ms/slice after start-up | peak RSS GiB: build process | largest worker | sampled total | "
          "cache GiB | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec, w, r, mem, disk, base, load in rows:
        rate, start = r["raw"] / r["seconds"], startup.get(w, {"seconds": 0.0, "cpu": 0.0})
        worker = f"{mem['worker'] / GiB:.2f}" if w > 1 else "in-process"
        print(f"| {spec} | {w} | {r['raw']} | {r['kept']} | {r['seconds']:.1f} | {rate:.0f} | {rate / base:.2f}x | "
              f"{start['seconds']:.1f} | {r['raw'] / max(r['seconds'] - start['seconds'], 1e-9):.0f} | "
              f"{1000 * (r['cpu'] - start['cpu']) / r['raw']:.1f} | "
              f"{r['self_rss'] / GiB:.2f} | {worker} | {mem['total'] / GiB:.2f} | {disk / GiB:.2f} | {load:.1f} |")
    if floors:
        print("\nraw read of the .h5 files alone (the floor)\n")
        print("| source | processes | slices | s | slices/s | CPU ms/slice | load |\n|---|---:|---:|---:|---:|---:|---:|")
        for spec, w, r, load in floors:
            print(f"| {spec} | {w} | {r['raw']} | {r['seconds']:.1f} | {r['raw'] / r['seconds']:.0f} | "
                  f"{1000 * r['cpu'] / r['raw']:.1f} | {load:.1f} |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
