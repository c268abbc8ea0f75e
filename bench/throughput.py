"""Training throughput of train.py as an ablation table: the same model and batch shape, one trick added per row.

    python bench/throughput.py                               # CUDA when available: 240 x 240, batch 64, base 32
    python bench/throughput.py --device cpu --quick          # CPU smoke run: 64 x 64, batch 8, base 8, a few steps
    python bench/throughput.py --out bench/throughput.md    # also write the markdown report

Rows, cumulative (each adds one trick to the row above):
  seed baseline   what users would otherwise run: DataLoader workers read one .h5 slice at a time and z-score
                  and resize it with OpenCV; fp32, eager, PyTorch's default cuDNN settings
  + cache         train.py --resident off: workers read the preprocessed disk cache (feed.TrainBatches), with
                  train.py's cuDNN settings (autotuning, TF32)
  + resident      train.py's default: the training set in device memory, a batch is one indexing
  + channels_last, + bf16 autocast, + torch.compile of forward + loss, + fused loss (the Triton Dice+BCE kernels)

Every row but the first is train.py's own code: feed.TrainBatches for the batches, train.build_model,
train.make_optimizer and train.make_train_step for the step, inference.resolve_speed for the settings; every
row also runs feed.augment on the device. A row is timed as train.py runs: N steps back to back (get the batch,
one optimisation step) between two clock reads with one device synchronisation at the end, so the CPU queues
work ahead of the GPU as it does in training. Exit 1 if any row fails; the report says which.
Data: synthetic phantoms of the real shape, written once under the cache dir.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import data  # noqa: E402
import feed  # noqa: E402
import fused_dice  # noqa: E402
import inference  # noqa: E402
import train  # noqa: E402
from common import git_commit, machine, sync, utc_now  # noqa: E402

KAGGLE_SLICES = 57_195  # slices of the Kaggle BraTS 2020 training set (369 volumes x 155)
PROFILE_TOP = 8  # kernels listed per profiled row
SAMPLE_BRAIN_FRACTION = 1937 / 2170  # slices with brain in the 14-case BraTS sample (measured by data.prepare)

# (key, label, TrainConfig fields changed from the row above). Cumulative: row k has the changes of rows 0..k.
ROWS = [
    ("seed", "seed baseline: DataLoader over .h5 slices, OpenCV per slice, fp32, eager",
     dict(resident="off", channels_last="off", amp="off", compile="off", loss_backend="torch")),
    ("cache", "+ preprocessed cache (train.py --resident off), cuDNN autotune + TF32", {}),
    ("resident", "+ resident on the device (train.py default)", dict(resident="on")),
    ("channels_last", "+ channels_last", dict(channels_last="on")),
    ("bf16", "+ bf16 autocast", dict(amp="bf16")),
    ("compile", "+ torch.compile", dict(compile="on")),
    ("fused", "+ fused loss (Triton)", dict(loss_backend="triton")),
]

# defaults: (full run, --quick)
DEFAULTS = {"size": (240, 64), "batch_size": (64, 8), "base": (32, 8), "steps": (30, 8), "warmup": (10, 3),
            "data": ("synthetic:6x80", "synthetic:6x24")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/throughput.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--size", type=int, default=None, help="slice side in pixels (default 240; --quick 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64; --quick 8")
    p.add_argument("--base", type=int, default=None, help="U-Net width at the first level (default 32; --quick 8)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 30; --quick 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row before timing (default 10; --quick 3)")
    p.add_argument("--data", default=None, help=f"synthetic:VOLUMESxSLICES (default {DEFAULTS['data'][0]}; --quick {DEFAULTS['data'][1]})")
    p.add_argument("--cache-dir", default=None, help=f"default {data.default_cache_dir()}")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the two DataLoader rows")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--profile-steps", type=int, default=5, help="CUDA: extra steps under torch.profiler for 'GPU busy'")
    p.add_argument("--profile-rows", default="resident,fused",
                   help="comma-separated rows profiled on CUDA (GPU busy and the top kernels); each costs a profiler run")
    p.add_argument("--rows", default=",".join(k for k, _, _ in ROWS), help="comma-separated rows to run")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke run for the CPU")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("size", "batch_size", "base", "depth", "steps", "warmup"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for flag, value in (("--rows", args.rows), ("--profile-rows", args.profile_rows)):
        unknown = set(value.split(",")) - {k for k, _, _ in ROWS} - ({""} if flag == "--profile-rows" else set())
        if unknown:
            p.error(f"{flag}: unknown {sorted(unknown)}")
    return args


# ----------------------------------------------------------------------------------------------------------
# The seed baseline's data path: not train.py's (that is the point), so it lives here


class H5Slices(torch.utils.data.Dataset):
    """One Kaggle-layout .h5 slice per item with its `context` neighbours on each side (ends repeated), each file
    read, z-scored over its non-zero pixels and resized with OpenCV, as a DataLoader-based pipeline typically does
    it: (image float32 ((2 context + 1) C, size, size), neighbour by neighbour as feed.with_context orders them;
    mask uint8 (size, size) of the centre slice)."""

    def __init__(self, volumes: list[list[Path]], size: int, channels: list[int], context: int = 0):
        self.volumes, self.size, self.channels, self.context = volumes, size, channels, context
        self.items = [(v, k) for v, files in enumerate(volumes) for k in range(len(files))]

    def __len__(self) -> int:
        return len(self.items)

    def read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        import h5py

        with h5py.File(path, "r") as f:
            image, mask = f["image"][()][..., self.channels], f["mask"][()].any(-1).astype(np.uint8)
        brain = image != 0
        for c in range(image.shape[-1]):
            v = image[..., c][brain[..., c]]
            if v.size:
                image[..., c] = np.where(brain[..., c], (image[..., c] - v.mean()) / (v.std() + 1e-6), 0)
        image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return image.transpose(2, 0, 1), cv2.resize(mask, (self.size, self.size), interpolation=cv2.INTER_NEAREST)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        v, k = self.items[i]
        files = self.volumes[v]
        images = [self.read(files[min(max(z, 0), len(files) - 1)])[0] for z in range(k - self.context, k)]
        centre, mask = self.read(files[k])
        images += [centre] + [self.read(files[min(z, len(files) - 1)])[0] for z in range(k + 1, k + self.context + 1)]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(images))), torch.from_numpy(mask)


def seed_batches(cache: data.Cache, volume_ids: list[str], cfg: train.TrainConfig, device: torch.device):
    """Endless (x float32, y uint8 (B, 1, H, W)) batches of the seed baseline, augmented on the device."""
    groups = data.list_h5(Path(cache.meta["root"]))
    dataset = H5Slices([groups[v] for v in volume_ids], cfg.size, train.channel_list(cfg.channel), cfg.context)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.workers > 0)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    while True:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).unsqueeze(1)
            yield feed.augment(x, y, generator)


def train_batches(batches: feed.TrainBatches):
    """Endless batches of train.py's own batch source, epoch after epoch."""
    epoch = 0
    while True:
        epoch += 1
        yield from batches.epoch(epoch)


# ----------------------------------------------------------------------------------------------------------
# Measuring


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Measured matmul rate in FLOP/s: bf16 8192^3 on CUDA, fp32 2048^3 on the CPU."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if device.type == "cuda" else (2048, torch.float32, 3)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    sync(device)
    rate = 2 * n**3 * reps / (time.perf_counter() - t)
    return rate, f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} torch.matmul {n}^3, {reps} back to back"


def step_flops(cfg: train.TrainConfig, device: torch.device) -> int:
    """FLOPs of the model's forward + backward on one batch, counted by FlopCounterMode (convolutions and matmuls)."""
    model = train.build_model(cfg).to(device).train()
    x = torch.randn(cfg.batch_size, model.cfg.in_channels, cfg.size, cfg.size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return counter.get_total_flops()


def gpu_profile(step_once, n: int, device: torch.device) -> tuple[float, list[tuple[str, float]]]:
    """n steps under torch.profiler: the fraction of wall time the GPU runs kernels or copies (union of their
    intervals), and the kernels that take the most GPU time (name, ms per step), where the step's time goes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step_once()
        sync(device)
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, -math.inf
    for s, e in spans:  # union of intervals, in microseconds
        if e > end:
            busy += e - max(s, end)
            end = e
    per_name: dict[str, float] = {}
    for e in kernels:
        per_name[e.name] = per_name.get(e.name, 0.0) + (e.time_range.end - e.time_range.start) / 1e3 / n
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:PROFILE_TOP]
    return busy / 1e6 / wall, top


def run_row(key: str, cfg: train.TrainConfig, device: torch.device, cache: data.Cache, split: dict, args) -> dict:
    """Build the row's batches and step, warm up, time args.steps steps back to back."""
    speed = inference.resolve_speed(device, cfg.amp, cfg.channels_last, cfg.compile)
    if key == "seed":
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = False, False  # PyTorch's defaults
        batches = seed_batches(cache, split["train"], cfg, device)
    else:
        if device.type == "cuda":
            train.tune_cuda()
        batches = train_batches(feed.TrainBatches(
            cache, split["train"], train.channel_list(cfg.channel), device, cfg.batch_size, context=cfg.context,
            resident=cfg.resident == "on", workers=cfg.workers, seed=cfg.seed, modality_dropout=cfg.modality_dropout))
    torch.manual_seed(cfg.seed)
    model = train.build_model(cfg).to(device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer, scheduler = train.make_optimizer(model, cfg, device, args.warmup + args.steps + args.profile_steps, 1)
    train_step = train.make_train_step(model, optimizer, scheduler, train.make_scaler(device, speed), cfg, device, speed)

    def one_step() -> torch.Tensor:
        x, y = next(batches)
        return train_step(x, y)[0]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    one_step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        one_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = one_step()
    sync(device)
    wall = time.perf_counter() - t0
    busy, top, profile_error = None, [], None
    if device.type == "cuda" and args.profile_steps > 0 and key in args.profile_rows.split(","):
        try:  # a profiler (CUPTI) failure costs the row its profile, not the throughput measured above
            busy, top = gpu_profile(one_step, args.profile_steps, device)
        except Exception as e:
            profile_error = f"{type(e).__name__}: {data.first_line(e)[:100]}"
            print(f"[{key}] profile failed ({profile_error}); the row's throughput stands", flush=True)
    result = {"slices_per_s": args.steps * cfg.batch_size / wall, "step_s": wall / args.steps, "first_step_s": first,
              "loss": float(loss.detach()), "busy": busy, "top": top, "profile_error": profile_error,
              "compiled": speed.compile,
              "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    batches.close()  # stops DataLoader workers before the next row
    return result


def skip_reason(key: str, device: torch.device) -> str | None:
    if key == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if key == "fused" and device.type != "cuda":
        return "on the CPU the Triton kernels run only in the interpreter: far too slow to time"
    return None


def make_report(header: list[str], rows: list[tuple], flops: int, peak_rate: float, device: torch.device,
                args: argparse.Namespace) -> tuple[str, list[str]]:
    """The markdown report of the rows run so far, and the keys of the rows that failed."""
    base = next((r for k, _, r, _ in rows if k == "seed" and r), None)
    resident_fp32 = next((r for k, _, r, _ in rows if k == "resident" and r), None)
    lines = ["| configuration | slices/s | ms/step | vs seed baseline | vs eager fp32 resident | peak memory | MFU | GPU busy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label, r, note in rows:
        if r is None:
            lines.append(f"| {label} | {note} | | | | | | |")
            continue
        rel = [f"{r['slices_per_s'] / b['slices_per_s']:.2f}x" if b else "n/a" for b in (base, resident_fp32)]
        mem = f"{r['peak_bytes'] / 2**20:,.0f} MiB" if r["peak_bytes"] is not None else "n/a"
        busy = ("profile failed" if r["profile_error"] else "n/a") if r["busy"] is None else f"{100 * r['busy']:.0f}%"
        lines.append(f"| {label} | {r['slices_per_s']:,.1f} | {r['step_s'] * 1e3:,.1f} | {rel[0]} | {rel[1]} | {mem} | "
                     f"{100 * flops / r['step_s'] / peak_rate:.1f}% | {busy} |")
    failed = [k for k, _, r, note in rows if note and note.startswith("FAILED")]
    notes = [f"rows failed: {', '.join(failed)}" if failed else "rows failed: none"]
    notes += [f"compile ({label}): first step {r['first_step_s']:.1f} s (compilation, caches as found) against a "
              f"steady {r['step_s'] * 1e3:.1f} ms" for _, label, r, _ in rows if r and r["compiled"]]
    done = [(label, r) for _, label, r, _ in rows if r]
    if done and args.size == data.RAW_SIZE:
        label, fastest = max(done, key=lambda lr: lr[1]["slices_per_s"])
        split_slices = 0.7 * KAGGLE_SLICES * SAMPLE_BRAIN_FRACTION
        notes.append(f"Kaggle-scale epoch: the training split is ~{split_slices:,.0f} slices (70% of {KAGGLE_SLICES:,}, "
                     f"{100 * SAMPLE_BRAIN_FRACTION:.1f}% with brain as in the BraTS sample); at the measured "
                     f"{fastest['slices_per_s']:,.0f} slices/s ({label}) an epoch after the first takes "
                     f"{split_slices / fastest['slices_per_s']:.1f} s (computed from the measured rate)")
    notes += [
        "slices/s: timed steps x batch / wall time of the steps run back to back, one synchronisation at the end",
        f"MFU: model FLOPs per step / step time / the {'bf16' if device.type == 'cuda' else 'fp32'} matmul rate above",
        "peak memory: torch.cuda.max_memory_allocated over the row (the resident rows hold the training set on the GPU)",
        f"GPU busy: union of kernel and copy intervals under torch.profiler over {args.profile_steps} extra steps / "
        f"their wall time (a lower bound: the profiler adds host overhead), rows {args.profile_rows or 'none'} only",
    ]
    for _, label, r, _ in rows:
        if r and r["top"]:
            notes.append(f"top kernels of '{label}' (GPU ms per step of {r['step_s'] * 1e3:.1f} ms wall): " + "; ".join(
                f"{name[:70]} {ms:.2f}" for name, ms in r["top"]))
        if r and r["profile_error"]:
            notes.append(f"profile of '{label}' failed: {r['profile_error']}")
    report = "\n".join(header) + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return report, failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = inference.resolve_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        base_cfg = dataclasses.replace(
            train.TrainConfig(), data=args.data, size=args.size, batch_size=args.batch_size, base=args.base,
            depth=args.depth, workers=args.workers, device=str(device), cache_dir=args.cache_dir, crop="off")
        t = time.perf_counter()
        cache = data.prepare(args.data, args.size, args.cache_dir, crop_to_brain=False)
        prep_s = time.perf_counter() - t
        split = data.split_volumes(cache.volume_ids, base_cfg.seed)
    except data.UserError as e:
        print(f"bench/throughput.py: error: {e}", file=sys.stderr)
        return 2
    n_train = sum(len(cache.volume(v)["slices"]) for v in split["train"])
    if n_train < args.batch_size:
        print(f"bench/throughput.py: error: the training split has {n_train} slices, fewer than --batch-size "
              f"{args.batch_size}; use more volumes or slices in --data", file=sys.stderr)
        return 2
    flops = step_flops(base_cfg, device)
    peak_rate, peak_desc = matmul_peak(device)
    header = [
        f"machine: {machine(device)}",
        f"date: {utc_now()}; torch {torch.__version__}; git commit {git_commit()}",
        f"workload: U-Net base {args.base} depth {args.depth} norm {base_cfg.norm}, 4 modalities x {2 * base_cfg.context + 1} "
        f"slices of context in, batch {args.batch_size} x {args.size}x{args.size}, modality dropout "
        f"{base_cfg.modality_dropout} (train.py's defaults); "
        f"data {args.data} ({n_train} training slices with brain, cache ready in {prep_s:.1f} s); "
        f"{args.warmup} warm-up + {args.steps} timed steps per row; DataLoader workers {args.workers}",
        f"model FLOPs per step (forward + backward, FlopCounterMode): {flops / 1e9:,.1f} GFLOP; "
        f"peak rate for MFU: {peak_rate / 1e12:,.2f} TFLOP/s measured ({peak_desc})",
    ]
    print("\n".join(header), flush=True)

    rows, cfg, chosen = [], base_cfg, args.rows.split(",")
    for key, label, change in ROWS:
        cfg = dataclasses.replace(cfg, **change)
        reason = "not in --rows" if key not in chosen else skip_reason(key, device)
        if reason:
            print(f"[{key}] skipped: {reason}", flush=True)
            rows.append((key, label, None, f"skipped: {reason}"))
            continue
        print(f"[{key}] {label} ...", flush=True)
        if args.out:  # the rows so far, so a run stopped by its timeout still leaves the rows it finished
            with data.atomic_path(Path(args.out)) as tmp:
                tmp.write_text(make_report(header, rows, flops, peak_rate, device, args)[0] +
                               f"\nINCOMPLETE: {len(rows)} of {len(ROWS)} rows done, then row '{key}' started\n")
        try:
            r = run_row(key, cfg, device, cache, split, args)
        except Exception as e:
            traceback.print_exc()
            rows.append((key, label, None, f"FAILED: {type(e).__name__}: {data.first_line(e)[:120]}"))
            continue
        finally:
            gc.collect()
        print(f"[{key}] {r['slices_per_s']:,.1f} slices/s, {r['step_s'] * 1e3:.1f} ms/step, loss {r['loss']:.4f}", flush=True)
        rows.append((key, label, r, None))

    report, failed = make_report(header, rows, flops, peak_rate, device, args)
    print("\n" + report)
    if args.out:
        with data.atomic_path(Path(args.out)) as tmp:
            tmp.write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
