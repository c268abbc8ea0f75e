"""Training throughput of train.py as an ablation table: the same model and batch, one fast-path trick added per row.

    python bench/train.py                               # CUDA when available: 240 x 240, batch 64, base 32
    python bench/train.py --device cpu --quick          # CPU smoke run: 64 x 64, batch 8, base 8, a few steps
    python bench/train.py --out bench/train_table.md    # also write the markdown table

Rows (each adds one trick to the row above; every row trains the same U-Net on the same batch shape):
  baseline        eager fp32, a DataLoader over the disk cache (cfg.resident=False, data.DiskSlices)
  + resident      the training set in device memory (data.load_slices), batches by indexing (data.iterate_batches)
  + channels_last model and input in channels-last memory format
  + bf16 autocast
  + torch.compile of forward + loss
  + fused loss    the Triton Dice+BCE kernels (loss_backend "triton"; the rows above use "torch")

Every row is built from train.py's own pieces (TrainConfig, build_model, make_optimizer, make_train_step,
amp_dtype) and data.py's (prepare, split_volumes, DiskSlices, load_slices, iterate_batches, augment); a timed
step is what train.py's loop does per batch: wait for the batch, augment it, one optimisation step.
Data: synthetic phantoms of the real shape, written once under the cache dir.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import data  # noqa: E402
import fused_dice  # noqa: E402
import train  # noqa: E402

FULL_EPOCH_SLICES = 57_195  # slices of the Kaggle BraTS 2020 training set (369 volumes x 155), 240 x 240

# (key, label, fields changed from the row above). Cumulative: row k has the changes of rows 0..k.
ROWS = [
    ("baseline", "eager fp32, DataLoader over disk cache (baseline)",
     dict(resident=False, channels_last="off", amp="off", compile="off", loss_backend="torch")),
    ("resident", "+ resident data (load_slices + iterate_batches)", dict(resident=True)),
    ("channels_last", "+ channels_last", dict(channels_last="on")),
    ("bf16", "+ bf16 autocast", dict(amp="bf16")),
    ("compile", "+ torch.compile", dict(compile="on")),
    ("fused", "+ fused loss (Triton)", dict(loss_backend="triton")),
]

# defaults: (full run, --quick)
DEFAULTS = {
    "size": (240, 64),
    "batch_size": (64, 8),
    "base": (32, 8),
    "steps": (30, 8),
    "warmup": (10, 3),
    # full: 8 volumes x 155 slices -> ~6 training volumes, several hundred slices (writing and caching them is
    # CPU work, well under a minute or two); quick: small volumes, a few seconds to build
    "data": ("synthetic:8x155", "synthetic:6x24"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/train.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--size", type=int, default=None, help="slice side in pixels (default 240; --quick 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64; --quick 8")
    p.add_argument("--base", type=int, default=None, help="U-Net width at the first level (default 32; --quick 8)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 30; --quick 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row before timing (default 10; --quick 3)")
    p.add_argument("--data", default=None, help=f"synthetic:VOLUMESxSLICES (default {DEFAULTS['data'][0]}; --quick {DEFAULTS['data'][1]})")
    p.add_argument("--cache-dir", default=None, help=f"default {data.default_cache_dir()}")
    p.add_argument("--workers", type=int, default=train.TrainConfig.workers, help="DataLoader workers of the baseline row")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on the CPU, where a few shared cores make multi-threaded eager steps "
                        "stall on busy cores; torch's own default with CUDA; 0: torch's default)")
    p.add_argument("--profile-steps", type=int, default=5, help="CUDA: extra steps under torch.profiler for 'GPU busy'")
    p.add_argument("--warm-cache", action="store_true",
                   help="compile with the usual on-disk inductor/Triton caches (default: each compiled row starts from "
                        "empty caches in a temporary folder, so its compile time is a cold compile's)")
    p.add_argument("--skip-compile", action="store_true",
                   help="skip the torch.compile rows (compiling takes about a minute on a 2-core CPU)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke run for the CPU")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("size", "batch_size", "base", "depth", "steps", "warmup"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


# ----------------------------------------------------------------------------------------------------------
# Machine, clocks, memory


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return sha + (" (+ uncommitted changes)" if dirty else "")
    except Exception as e:  # no git, not a repository, ...
        return f"unknown ({type(e).__name__})"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host CPU {cpu_model()}, {os.cpu_count()} cores"
    return f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {load_average()}"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        return "n/a"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Peak resident set size of this process above its value at start, sampled every 5 ms by a thread."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RssPeak":
        try:
            self.start = self.peak = rss_bytes()
        except (OSError, ValueError):
            return self  # no /proc: leave it unmeasured
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int | None:
        return self.peak - self.start if self._thread is not None else None


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Measured matmul rate in FLOP/s: bf16 8192^3 on CUDA, fp32 2048^3 on the CPU."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = 2048, torch.float32, 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b)
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        times.append(time.perf_counter() - t)
    rate = 2 * n**3 / statistics.median(times)
    del a, b
    return rate, f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} torch.matmul {n}x{n}x{n}, median of {reps}"


def step_flops(cfg: train.TrainConfig, device: torch.device) -> int:
    """FLOPs of the model's forward + backward on one batch, counted by FlopCounterMode (convolutions and matmuls)."""
    model = train.build_model(cfg).to(device).train()
    x = torch.randn(cfg.batch_size, len(train.channel_list(cfg.channel)), cfg.size, cfg.size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    flops = counter.get_total_flops()
    del model, x
    return flops


def gpu_busy(step_once, n: int, device: torch.device) -> float:
    """Fraction of wall time the GPU runs kernels or copies (union of their intervals under torch.profiler) over n steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step_once()
        sync(device)
        wall = time.perf_counter() - t0
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, -math.inf
    for s, e in spans:  # union of intervals, in microseconds
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    return busy / 1e6 / wall


# ----------------------------------------------------------------------------------------------------------
# One row


def forever(make_iter):
    while True:
        yield from make_iter()


def run_row(cfg: train.TrainConfig, device: torch.device, cache: data.Cache, split: dict, state: dict, args) -> dict:
    """Warm up, time `args.steps` steps (each: wait for the batch, augment, optimisation step), measure memory."""
    channels = train.channel_list(cfg.channel)
    dtype = train.amp_dtype(cfg.amp, device)
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    if use_compile:
        torch._dynamo.reset()  # each compiled row pays its own compilation
        if not args.warm_cache:  # ... from empty on-disk caches (both are read from the environment when used)
            fresh = tempfile.mkdtemp(dir=state["compile_cache_root"])
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(fresh, "inductor")
            os.environ["TRITON_CACHE_DIR"] = os.path.join(fresh, "triton")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss = RssPeak() if device.type == "cpu" else None
    if rss is not None:
        rss.__enter__()
    loader = batches = None
    try:
        # --- batches, as train.py's loop gets them
        if cfg.resident:
            if "train_set" not in state:
                state["train_set"] = data.load_slices(cache, split["train"], channels, device)
            train_set = state["train_set"]
            generator = torch.Generator(device=train_set.images.device).manual_seed(cfg.seed)
            batches = forever(lambda: data.iterate_batches(train_set, cfg.batch_size, generator, device))
        else:
            disk_set = data.DiskSlices(cache, split["train"], channels)
            torch.manual_seed(cfg.seed)
            loader = torch.utils.data.DataLoader(
                disk_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.workers,
                pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0)

            def loader_epoch():
                for x, y in loader:
                    yield x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True).unsqueeze(1).float()
            batches = forever(loader_epoch)
        aug_generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)

        # --- model, optimiser, step: train.py's own
        torch.manual_seed(cfg.seed)
        model = train.build_model(cfg).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        total = args.warmup + args.steps + args.profile_steps
        optimizer, scheduler = train.make_optimizer(model, cfg, device, total, 1)
        step = train.make_train_step(model, optimizer, scheduler, cfg, device, dtype, channels_last, use_compile)

        def one_step() -> tuple[float, float, torch.Tensor]:
            sync(device)
            t0 = time.perf_counter()
            x, y = next(batches)
            sync(device)
            t1 = time.perf_counter()
            if cfg.augment:
                x, y = data.augment(x, y, aug_generator, affine=cfg.affine, intensity=cfg.intensity)
            loss, _ = step(x, y)
            sync(device)
            return t1 - t0, time.perf_counter() - t0, loss

        warm = [one_step()[1] for _ in range(args.warmup)]
        waits, times = [], []
        t_start = time.perf_counter()
        for _ in range(args.steps):
            w, t, loss = one_step()
            waits.append(w)
            times.append(t)
        wall = time.perf_counter() - t_start
        final_loss = float(loss.detach().float())
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        busy = None
        if device.type == "cuda" and args.profile_steps > 0:
            try:
                busy = gpu_busy(lambda: one_step(), args.profile_steps, device)
            except Exception as e:  # the profiler is optional; say why it is missing
                busy = f"n/a ({type(e).__name__})"
                print(f"GPU busy not measured: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        if rss is not None:
            rss.__exit__(None, None, None)
        if batches is not None:
            batches.close()
        loader = batches = None  # stops the persistent DataLoader workers before the next row
        gc.collect()
    return {
        "slices_per_s": args.steps * cfg.batch_size / wall,
        "median_s": statistics.median(times),
        "first_step_s": warm[0] if warm else None,
        "warmup_s": sum(warm),
        "wait_frac": sum(waits) / sum(times),
        "peak_bytes": peak if peak is not None else (rss.growth if rss is not None else None),
        "busy": busy,
        "loss": final_loss,
        "compiled": use_compile,
    }


def skip_reason(key: str, device: torch.device, args) -> str | None:
    if key == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if key == "fused":
        if not fused_dice.HAS_TRITON:
            return "triton is not installed"
        if device.type != "cuda":
            return "on the CPU the Triton kernels run only in the interpreter (TRITON_INTERPRET=1): far too slow to time"
    if key in ("compile", "fused") and args.skip_compile:
        return "--skip-compile"
    return None


# ----------------------------------------------------------------------------------------------------------


def fmt_mem(row: dict, device: torch.device) -> str:
    b = row["peak_bytes"]
    if b is None:
        return "n/a"
    return f"{b / 2**20:,.0f} MiB" if device.type == "cuda" else f"+{b / 2**20:,.0f} MiB RSS"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = train.resolve_device(args.device)
    except data.DataError as e:
        print(f"bench/train.py: error: {e}", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda":  # as train.py's main() sets them
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    base_cfg = dataclasses.replace(
        train.TrainConfig(), data=args.data, size=args.size, batch_size=args.batch_size, base=args.base, depth=args.depth,
        workers=args.workers, device=device.type, cache_dir=args.cache_dir)
    try:
        kind, _ = data.parse_source(args.data)
        t = time.perf_counter()
        cache = data.prepare(args.data, args.size, args.cache_dir)
        prep_s = time.perf_counter() - t
        split = data.split_volumes(cache.volume_ids, base_cfg.seed)
    except data.DataError as e:
        print(f"bench/train.py: error: {e}", file=sys.stderr)
        return 2
    n_train = sum(len(cache.volume(v)["slices"]) for v in split["train"])
    if n_train < args.batch_size:
        print(f"bench/train.py: error: the training split has {n_train} slices, fewer than --batch-size {args.batch_size}; "
              "use more volumes or slices in --data", file=sys.stderr)
        return 2
    n_ch = len(train.channel_list(base_cfg.channel))

    flops = step_flops(base_cfg, device)
    peak_rate, peak_desc = matmul_peak(device)

    header = [
        f"machine: {machine(device)}",
        f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; torch {torch.__version__}; "
        f"git commit {git_commit()}",
        f"workload: U-Net base {args.base} depth {args.depth}, {n_ch} channels, batch {args.batch_size} x {args.size}x{args.size}; "
        f"data {args.data} ({kind}, {n_train} training slices, cache {cache.root}, ready in {prep_s:.1f} s); "
        f"{args.warmup} warm-up + {args.steps} timed steps per row; baseline DataLoader workers {args.workers}",
        f"model FLOPs per step (forward + backward, FlopCounterMode): {flops / 1e9:,.1f} GFLOP; "
        f"peak rate for MFU: {peak_rate / 1e12:,.2f} TFLOP/s measured ({peak_desc})",
    ]
    print("\n".join(header), flush=True)

    rows, cfg, state = [], base_cfg, {}
    saved_env = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    compile_tmp = tempfile.TemporaryDirectory(prefix="bench-train-compile-")
    state["compile_cache_root"] = compile_tmp.name
    for key, label, change in ROWS:
        cfg = dataclasses.replace(cfg, **change)
        reason = skip_reason(key, device, args)
        if reason:
            print(f"[{key}] skipped: {reason}", flush=True)
            rows.append((key, label, None, f"skipped: {reason}"))
            continue
        print(f"[{key}] {label} ...", flush=True)
        try:
            r = run_row(cfg, device, cache, split, state, args)
        except Exception as e:
            traceback.print_exc()
            msg = str(e).splitlines()[0] if str(e) else ""
            rows.append((key, label, None, f"failed: {type(e).__name__}: {msg[:120]}"))
            continue
        print(f"[{key}] {r['slices_per_s']:,.1f} slices/s, median step {r['median_s'] * 1e3:.1f} ms, loss {r['loss']:.4f}", flush=True)
        rows.append((key, label, r, None))
    state.clear()
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    compile_tmp.cleanup()

    base = next((r for k, _, r, _ in rows if k == "baseline" and r), None)
    lines = ["| configuration | slices/s | step (median ms) | speed-up | peak memory | MFU | data wait | GPU busy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label, r, note in rows:
        if r is None:
            lines.append(f"| {label} | {note} | | | | | | |")
            continue
        speed = f"{r['slices_per_s'] / base['slices_per_s']:.2f}x" if base else "n/a"
        mfu = flops / r["median_s"] / peak_rate
        busy = r["busy"] if isinstance(r["busy"], str) else ("n/a" if r["busy"] is None else f"{100 * r['busy']:.0f}%")
        lines.append(f"| {label} | {r['slices_per_s']:,.1f} | {r['median_s'] * 1e3:,.1f} | {speed} | {fmt_mem(r, device)} | "
                     f"{100 * mfu:.1f}% | {100 * r['wait_frac']:.0f}% | {busy} |")
    notes = []
    compiled = [(label, r) for _, label, r, _ in rows if r and r["compiled"]]
    for label, r in compiled:
        notes.append(f"compile time ({label}): first compiled step {r['first_step_s']:.1f} s; all {args.warmup} warm-up "
                     f"steps {r['warmup_s']:.1f} s against a steady step of {r['median_s'] * 1e3:.1f} ms; "
                     + ("on-disk inductor/Triton caches as found (may be warm)" if args.warm_cache else
                        "from empty inductor/Triton on-disk caches (cold compile)"))
    if not compiled:
        notes.append("compile time: not measured (no torch.compile row ran)")
    done = [(label, r) for _, label, r, _ in rows if r]
    if done:
        label, fastest = max(done, key=lambda lr: lr[1]["slices_per_s"])
        if args.size == data.RAW_SIZE:
            secs = FULL_EPOCH_SLICES / fastest["slices_per_s"]
            notes.append(f"full-size epoch estimate: {FULL_EPOCH_SLICES:,} slices at 240x240 / {fastest['slices_per_s']:,.1f} slices/s "
                         f"({label}) = {secs:,.0f} s ({secs / 60:.1f} min) per epoch at batch {args.batch_size}, base "
                         f"{args.base}: an estimate from measured steps on synthetic data of the same shape")
        else:
            notes.append(f"full-size epoch estimate: not made, this run measured {args.size}x{args.size} slices, not 240x240")
    notes += [
        "slices/s: timed steps x batch / their wall time; a step = wait for the batch + data.augment + one optimisation "
        "step (train.make_train_step), with a device synchronisation before each clock read",
        f"speed-up: slices/s over the baseline row; MFU: model FLOPs per step / median step time / the measured "
        f"{'bf16' if device.type == 'cuda' else 'fp32'} matmul rate above",
        "data wait: share of step time spent getting the next batch onto the device",
        ("peak memory: torch.cuda.max_memory_allocated during the row (the resident rows include the training set "
         f"held on the GPU, {n_train * (n_ch + 1) * args.size**2 * 2 / 2**20:,.0f} MiB)") if device.type == "cuda" else
        ("peak memory: growth of this process's resident set size over the row, sampled every 5 ms (DataLoader "
         "workers are other processes and not counted; memory freed by earlier rows and kept by the allocator "
         "hides part of the growth)"),
        (f"GPU busy: union of kernel and copy intervals under torch.profiler over {args.profile_steps} extra steps / "
         "their wall time (the profiler's own host overhead makes it a lower bound)") if device.type == "cuda" else
        "GPU busy: n/a on the CPU",
    ]
    if device.type == "cpu":
        notes.append(f"load average at the end of the run: {load_average()} (other jobs share this machine's cores)")
    report = "\n".join(header) + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print()
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
