"""Benchmark the fused Triton Dice+BCE loss (forward + backward) against its alternatives.

Compares, on logits of shape (B, 1, H, W):
  triton          fused_dice.dice_bce_loss(backend="triton")
  eager           the plain-PyTorch reference (backend="torch")
  compiled        torch.compile of the reference
  monai           MONAI's DiceCELoss(sigmoid=True), when monai is importable (a similar, not
                  identical loss: it is here for speed only)

Reports the median forward+backward time, the peak extra memory (CUDA only) and, for the Triton
path, achieved bandwidth against a device-to-device copy measured in the same run.

    python bench/loss.py                      # CUDA: B in {16, 64, 256}, 240x240, bf16 + fp32
    python bench/loss.py --device cpu         # CPU, Triton in the interpreter, small sizes
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 16,64,256 on cuda, 2,4 on cpu)")
    ap.add_argument("--hw", type=int, default=None, help="image side (default 240 on cuda, 64 on cpu)")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated logits dtypes")
    ap.add_argument("--target-dtype", default="uint8", choices=["uint8", "bool", "float32"], help="mask dtype")
    ap.add_argument("--mode", default="batch", choices=["batch", "image"])
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats on cpu (default 20)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a small shared machine, multi-thread medians "
                         "jump between scheduler ticks)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.device is None:
    import torch

    ARGS.device = "cuda" if torch.cuda.is_available() else "cpu"
if ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by fused_dice)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

import fused_dice  # noqa: E402

CUDA = ARGS.device.startswith("cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "uint8": torch.uint8, "bool": torch.bool}


def git_commit() -> str:
    """Short HEAD, noting uncommitted changes to the benchmarked files; tolerates a missing git/commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            return "none (git rev-parse failed: no commit yet?)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fused_dice.py", "bench/loss.py"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" + uncommitted fused_dice.py/bench/loss.py" if dirty else "")
    except OSError:
        return "unknown (git not found)"


def machine() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def time_ms(fn, grad_to_none) -> float:
    """Median wall time of fn() in milliseconds."""
    if CUDA:
        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    fn()  # warm-up (kernel launch caches, compiled code)
    times = []
    for _ in range(ARGS.repeats or 20):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn, grad_to_none) -> str:
    """Peak memory above what was allocated before one call of fn (includes the gradient)."""
    if not CUDA:
        return "n/a"
    for t in grad_to_none:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f}"


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    n = (256 if CUDA else 32) * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=ARGS.device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), [])
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def make_impls(mode: str) -> dict:
    """name -> loss(logits, target), or a string saying why it is skipped."""

    def ref(x, y):
        return fused_dice.dice_bce_loss(x, y, mode=mode, backend="torch")

    impls = {
        "triton": lambda x, y: fused_dice.dice_bce_loss(x, y, mode=mode, backend="triton"),
        "eager": ref,
        "compiled": "skipped (--no-compile)" if ARGS.no_compile else torch.compile(ref, dynamic=False),
    }
    try:
        from monai.losses import DiceCELoss

        monai_loss = DiceCELoss(sigmoid=True, batch=mode == "batch", smooth_nr=1.0, smooth_dr=1.0)
        # MONAI wants a float target of the logits' dtype; the conversion is done outside the timing
        impls["monai"] = lambda x, y: monai_loss(x, y)
    except Exception as e:  # ImportError, or a MONAI version without these arguments
        impls["monai"] = f"skipped (monai not importable: {type(e).__name__})"
    return impls


def main() -> None:
    batches = [int(b) for b in (ARGS.batches or ("16,64,256" if CUDA else "2,4")).split(",")]
    hw = ARGS.hw or (240 if CUDA else 64)
    dtypes = [DTYPES[d] for d in ARGS.dtypes.split(",")]
    tdtype = DTYPES[ARGS.target_dtype]

    if not CUDA:
        torch.set_num_threads(ARGS.threads)
    print(f"machine: {machine()}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"torch {torch.__version__}, triton {triton.__version__}, git commit {git_commit()}")
    print(f"device {ARGS.device}{' (Triton in the CPU interpreter)' if not CUDA else ''}, mode={ARGS.mode}, "
          f"target dtype {ARGS.target_dtype}, shape (B, 1, {hw}, {hw})"
          + ("" if CUDA else f", {torch.get_num_threads()} torch thread(s), {ARGS.repeats or 20} repeats"))
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write): {copy_gbs:.1f} GB/s")
    print()

    impls = make_impls(ARGS.mode)
    notes = sorted({f"{k}: {v}" for k, v in impls.items() if isinstance(v, str)})
    print("| B | logits | impl | fwd+bwd ms (median) | peak extra MiB | GB/s | % of copy | loss |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device=ARGS.device).manual_seed(0)
    for b in batches:
        shape = (b, 1, hw, hw)
        for dtype in dtypes:
            x = torch.randn(shape, generator=gen, device=ARGS.device).mul_(3).to(dtype).requires_grad_()
            y = (torch.rand(shape, generator=gen, device=ARGS.device) < 0.1).to(tdtype)
            y_float = y.to(dtype)  # for MONAI
            for name, loss_fn in impls.items():
                if isinstance(loss_fn, str):
                    continue
                tgt = y_float if name == "monai" else y

                def step(loss_fn=loss_fn, tgt=tgt):
                    loss_fn(x, tgt).backward()

                loss_val = loss_fn(x, tgt).item()
                x.grad = None
                ms = time_ms(step, [x])
                mem = peak_extra_mib(step, [x])
                gbs = pct = "-"
                if name == "triton":  # fwd reads x, y; bwd reads x, y and writes grad
                    moved = x.numel() * (3 * x.element_size() + 2 * y.element_size())
                    g = moved / (ms * 1e-3) / 1e9
                    gbs, pct = f"{g:.3g}", f"{100 * g / copy_gbs:.2g}%"
                print(f"| {b} | {str(dtype).removeprefix('torch.')} | {name} | {ms:.3f} | {mem} | {gbs} | {pct} "
                      f"| {loss_val:.6f} |", flush=True)
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
