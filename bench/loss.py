"""Benchmark the fused Triton Dice+BCE loss (forward + backward) against its alternatives.

Compares, on logits of shape (B, C, H, W) and a uint8 mask (~10% foreground per channel), the loss train.py uses
(one Dice per channel over the whole batch, their mean over channels; BCE the mean over elements). C = 1 (the binary
model) by default; --channels 1,3 adds rows for C = 3 (the three BraTS regions as overlapping sigmoid channels):
  triton          fused_dice.dice_bce_loss(backend="triton")
  eager           the plain-PyTorch reference (backend="torch")
  compiled        torch.compile(reference, dynamic=False, fullgraph=True), at --compile-batches only
  monai           MONAI's DiceCELoss(sigmoid=True, batch=True), when monai is importable (a similar,
                  not identical loss: it is here for speed only); it too averages one Dice per channel

Three times per fwd+bwd call, because they answer different questions:
  call ms    median of single calls, each followed by a synchronize: the latency one call sees
  wall ms    N calls back to back, timed by two CUDA events (one final wait): the throughput of a
             training loop, where the CPU queues the next launches while the GPU works
  kernel ms  GPU time only (CUDA): a CUDA graph of n x [L2 flush, call] replayed, minus the same graph
             of flushes alone, divided by n. No launch overhead, no warm L2 (the B=256 working set
             would otherwise partly sit in the 50 MB L2). Falls back to triton.testing.do_bench
             (marked *) if an impl cannot be captured in a graph.
The Triton row's GB/s counts the bytes it must move (fwd reads logits + mask, bwd reads them again and
writes the gradient) over its kernel time, as a % of a 256 MiB device copy timed the same way in the
same run. At the end, a verdict for B=256: fused speed-up over the compiled reference (target >= 1.3x)
and achieved bandwidth (target >= 60% of the copy).

torch.compile: one static (dynamic=False) compile per compiled (B, C, dtype), by default only at B=256
(the verdict's batch), 2 compiles per C. Static shapes give the reference its best kernels (a dynamic batch
dim picks reduction splits for the first shape it sees); compiling every (B, dtype) would cost ~8
cold compiles. --compile-batches all compiles every row.

Exits 1, with a one-line reason on stderr, if any impl raises or the Triton loss or gradient disagrees
with the eager reference beyond tolerance (the table is printed first).

    python bench/loss.py                      # CUDA: B in {16, 64, 256, 1024}, 240x240, bf16 + fp32
    python bench/loss.py --device cpu         # CPU, Triton in the interpreter, small sizes
    python bench/loss.py --channels 1,3       # also the 3-region loss, logits (B, 3, H, W)
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's modules; bench/ (common.py) is the script's own folder


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--batches", default=None,
                    help="comma-separated batch sizes (default 16,64,256,1024 on cuda, 2,4 on cpu)")
    ap.add_argument("--hw", type=int, default=None, help="image side (default 240 on cuda, 64 on cpu)")
    ap.add_argument("--channels", default="1",
                    help="comma-separated channel counts C of the logits (B, C, H, W) (default 1; 3: BraTS regions)")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated logits dtypes")
    ap.add_argument("--target-dtype", default="uint8", choices=["uint8", "bool", "float32"], help="mask dtype")
    ap.add_argument("--repeats", type=int, default=20, help="single calls timed for 'call ms' (default 20)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a small shared machine, multi-thread medians "
                         "jump between scheduler ticks)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    ap.add_argument("--compile-batches", default="auto",
                    help="batch sizes at which to compile the reference: 'auto' (256 if measured, else the "
                         "largest), 'all', or a comma-separated list")
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

import data  # noqa: E402  (first_line)
import fused_dice  # noqa: E402
from common import git_commit, machine, sync, utc_now  # noqa: E402

DEVICE = torch.device(ARGS.device)
CUDA = DEVICE.type == "cuda"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "uint8": torch.uint8, "bool": torch.bool}
VERDICT_B = 256
L2_FLUSH_BYTES = 256 * 2**20  # well above the L2 of an H100/H200 (50 MB)
GRAPH_MEMORY_BYTES = 8 * 2**30  # cap on what the n captured calls of one graph may hold at once
NOTES: set[str] = set()  # footnotes printed under the table (skips, compile times, fallbacks)


# ----------------------------------------------------------------------------------------------
# timing


def call_ms(step, x: torch.Tensor) -> float:
    """Median time of one call, synchronising before and after each (latency as one caller sees it)."""
    times = []
    for _ in range(ARGS.repeats):
        x.grad = None
        sync(DEVICE)
        t0 = time.perf_counter()
        step()
        sync(DEVICE)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def wall_ms(step, x: torch.Tensor, n: int) -> float:
    """Mean time per call over n calls queued back to back, with one wait at the end."""
    x.grad = None
    step()
    sync(DEVICE)
    if CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            x.grad = None
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n
    t0 = time.perf_counter()
    for _ in range(n):
        x.grad = None
        step()
    return (time.perf_counter() - t0) * 1e3 / n


def graph_ms(body, n: int) -> float:
    """Median over 5 replays of a CUDA graph of n captured body() calls, per call."""
    side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graph's docs ask
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            body()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    del graph
    return statistics.median(times)


_FLUSH: torch.Tensor | None = None


def kernel_ms(step, x: torch.Tensor | None, est_ms: float, call_bytes: float) -> tuple[float, str]:
    """GPU time of one call with a cold L2 and no launch overhead: (ms, "" or "*" if do_bench was used).

    A graph of n x [flush L2, call] minus a graph of n x [flush L2]. n makes a replay ~20 ms, at most
    20 calls, and fewer when n calls' memory (call_bytes each, from the peak measured before) would
    pass GRAPH_MEMORY_BYTES.
    """
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=DEVICE)
    n = max(3, min(20, int(20 / max(est_ms, 1e-3)), int(GRAPH_MEMORY_BYTES / max(call_bytes, 1.0))))

    def flush():
        _FLUSH.zero_()

    def flush_and_call():
        _FLUSH.zero_()
        if x is not None:
            x.grad = None
        step()

    try:
        ms = graph_ms(flush_and_call, n) - graph_ms(flush, n)
        mark = ""
    except Exception as e:  # an op that cannot be captured: time it with events per call instead
        torch.cuda.synchronize()
        NOTES.add(f"*: kernel ms by triton.testing.do_bench (events per call, L2 flushed), because CUDA graph "
                  f"capture failed: {type(e).__name__}: {data.first_line(e)[:160]}")
        ms = triton.testing.do_bench(step, grad_to_none=[x] if x is not None else None, return_mode="median")
        mark = "*"
    if x is not None:
        x.grad = None  # drop the graph pool's last gradient
    gc.collect()
    torch.cuda.empty_cache()
    return ms, mark


def peak_extra_bytes(step, x: torch.Tensor) -> float:
    """Peak memory above what was allocated before one call of step (includes the gradient); CUDA only."""
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def copy_bandwidth_gbs() -> tuple[float, float]:
    """(GB/s, ms) of a device copy, counting bytes read plus bytes written, timed like the kernels."""
    n = (256 if CUDA else 32) * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    if CUDA:
        ms, _ = kernel_ms(lambda: dst.copy_(src), None, est_ms=0.2, call_bytes=0.0)
    else:
        ms = wall_ms(lambda: dst.copy_(src), src, ARGS.repeats)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9, ms


# ----------------------------------------------------------------------------------------------
# implementations and checks


def make_impls() -> dict:
    """name -> loss(logits, target), or a string saying why it is skipped. 'compiled' is built per row."""

    def ref(x, y):
        return fused_dice.dice_bce_loss(x, y, backend="torch")

    impls = {
        "triton": lambda x, y: fused_dice.dice_bce_loss(x, y, backend="triton"),
        "eager": ref,
        "compiled": "skipped (--no-compile)" if ARGS.no_compile else ref,
    }
    try:
        from monai.losses import DiceCELoss

        monai_loss = DiceCELoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)
        # MONAI wants a float target of the logits' dtype; the conversion is done outside the timing
        impls["monai"] = lambda x, y: monai_loss(x, y)
    except Exception as e:  # ImportError, or a MONAI version without these arguments
        impls["monai"] = f"skipped (monai not importable: {type(e).__name__})"
    return impls


def loss_and_grad(loss_fn, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    x.grad = None
    loss = loss_fn(x, y)
    loss.backward()
    grad, x.grad = x.grad, None
    return loss.item(), grad


def disagreement(dtype: torch.dtype, got: tuple[float, torch.Tensor], want: tuple[float, torch.Tensor]) -> str:
    """'' when the Triton (loss, grad) matches the eager reference's, else what differs.

    Both compute in float32; the gradient is rounded to the logits' dtype, hence the looser bound for
    bf16/fp16 (one bf16 ulp is 2^-8 of the value). Tolerances scale with the largest gradient element.
    """
    (loss, grad), (ref_loss, ref_grad) = got, want
    if not math.isfinite(loss) or abs(loss - ref_loss) > 1e-4 * abs(ref_loss) + 1e-6:
        return f"loss {loss:.7g} vs reference {ref_loss:.7g}"
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    scale = ref_grad.float().abs().max().item()
    err = (grad.float() - ref_grad.float()).abs().max().item()
    if not err <= tol * scale:  # also catches NaN
        return f"max |grad - reference grad| = {err:.3g} > {tol:g} x max |grad| ({scale:.3g})"
    return ""


# ----------------------------------------------------------------------------------------------


def main() -> None:
    batches = [int(b) for b in (ARGS.batches or ("16,64,256,1024" if CUDA else "2,4")).split(",")]
    hw = ARGS.hw or (240 if CUDA else 64)
    channels = [int(c) for c in ARGS.channels.split(",")]
    dtypes = [DTYPES[d] for d in ARGS.dtypes.split(",")]
    tdtype = DTYPES[ARGS.target_dtype]
    if ARGS.compile_batches == "auto":
        compile_batches = {VERDICT_B if VERDICT_B in batches else max(batches)}
    elif ARGS.compile_batches == "all":
        compile_batches = set(batches)
    else:
        compile_batches = {int(b) for b in ARGS.compile_batches.split(",")}

    if not CUDA:
        torch.set_num_threads(ARGS.threads)
    print(f"machine: {machine(DEVICE)}")
    print(f"date: {utc_now()}")
    print(f"torch {torch.__version__}, triton {triton.__version__}, "
          f"git commit {git_commit(('fused_dice.py', 'bench/loss.py', 'bench/common.py'))}")
    print(f"device {DEVICE}{' (Triton in the CPU interpreter: times say nothing about a GPU)' if not CUDA else ''}, "
          f"target dtype {ARGS.target_dtype}, shape (B, C, {hw}, {hw}), C in {{{', '.join(map(str, channels))}}}, "
          f"{ARGS.repeats} single calls per 'call ms'"
          + ("" if CUDA else f", {torch.get_num_threads()} torch thread(s)"))
    copy_gbs, copy_ms = copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write, {'kernel time' if CUDA else 'wall time'}): {copy_gbs:.1f} GB/s "
          f"({copy_ms:.3f} ms per {(256 if CUDA else 32)} MiB)")
    print()

    impls = make_impls()
    NOTES.update(f"{k}: {v}" for k, v in impls.items() if isinstance(v, str))
    failures: list[str] = []
    results: dict[tuple[int, int, torch.dtype, str], dict] = {}
    print("| B | C | logits | impl | call ms (median) | wall ms (back to back) | kernel ms | peak extra MiB "
          "| GB/s | % of copy | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for b, c, dtype in itertools.product(batches, channels, dtypes):
        shape = (b, c, hw, hw)
        name_dtype = str(dtype).removeprefix("torch.")
        x = torch.randn(shape, generator=gen, device=DEVICE).mul_(3).to(dtype).requires_grad_()
        y = (torch.rand(shape, generator=gen, device=DEVICE) < 0.1).to(tdtype)
        y_float = y.to(dtype) if not isinstance(impls["monai"], str) else None
        checked = {}  # "eager"/"triton" -> (loss, grad), compared below
        for name, loss_fn in impls.items():
            if isinstance(loss_fn, str) or (name == "compiled" and b not in compile_batches):
                continue
            tgt = y_float if name == "monai" else y
            try:
                if name == "compiled":
                    torch._dynamo.reset()  # one fresh static compile per row: no recompile limit to hit
                    loss_fn = torch.compile(loss_fn, dynamic=False, fullgraph=True)
                    t0 = time.perf_counter()
                    loss_and_grad(loss_fn, x, tgt)
                    sync(DEVICE)
                    compile_s = time.perf_counter() - t0
                    NOTES.add(f"compiled B={b} C={c} {name_dtype}: first fwd+bwd (the compile) took "
                              f"{compile_s:.1f} s")

                def step(loss_fn=loss_fn, tgt=tgt):
                    loss_fn(x, tgt).backward()

                out = loss_and_grad(loss_fn, x, tgt)  # also the warm-up (Triton JIT, compile)
                loss_val = out[0]
                if name in ("eager", "triton"):
                    checked[name] = out
                del out
                t_call = call_ms(step, x)
                n_wall = max(10, min(200, int(100 / max(t_call, 1e-3)))) if CUDA else ARGS.repeats
                t_wall = wall_ms(step, x, n_wall)
                if CUDA:
                    peak = peak_extra_bytes(step, x)
                    t_kernel, mark = kernel_ms(step, x, t_wall, peak)
                    kernel, mem = f"{t_kernel:.3f}{mark}", f"{peak / 2**20:.1f}"
                else:
                    t_kernel, kernel, mem = t_wall, "-", "n/a"
            except Exception as e:  # report, keep measuring the others, exit 1 at the end
                reason = f"{name} raised at B={b} C={c} {name_dtype}: {type(e).__name__}: {data.first_line(e)[:200]}"
                failures.append(reason)
                print(f"| {b} | {c} | {name_dtype} | {name} | ERROR | | | | | | {reason} |", flush=True)
                x.grad = None
                continue
            gbs, pct, share = "-", "-", None
            if name == "triton" and t_kernel > 0:  # fwd reads x, y; bwd reads x, y and writes grad
                moved = x.numel() * (3 * x.element_size() + 2 * y.element_size())
                g = moved / (t_kernel * 1e-3) / 1e9
                share = 100 * g / copy_gbs
                gbs, pct = f"{g:.4g}", f"{share:.3g}%"
            results[b, c, dtype, name] = {"kernel": t_kernel, "wall": t_wall, "call": t_call, "pct": share}
            print(f"| {b} | {c} | {name_dtype} | {name} | {t_call:.3f} | {t_wall:.3f} (n={n_wall}) | {kernel} | {mem} "
                  f"| {gbs} | {pct} | {loss_val:.6f} |", flush=True)
        # the check: Triton against the eager reference on the same inputs
        if "triton" in checked and "eager" in checked:
            why = disagreement(dtype, checked["triton"], checked["eager"])
            if why:
                failures.append(f"triton disagrees with the reference at B={b} C={c} {name_dtype}: {why}")
        del x, y, y_float, checked
        if CUDA:
            gc.collect()
            torch.cuda.empty_cache()

    print()
    verdict(channels, dtypes, hw, copy_gbs, results)
    for note in sorted(NOTES):
        print(f"- {note}")
    if failures:
        print("\nFAILURES:\n" + "\n".join(f"- {f}" for f in failures))
        more = f" (and {len(failures) - 1} more: see FAILURES in the output)" if len(failures) > 1 else ""
        print(f"bench/loss.py: FAILED: {failures[0]}{more}", file=sys.stderr)
        sys.exit(1)


def verdict(channels, dtypes, hw: int, copy_gbs: float, results: dict) -> None:
    """The two targets at B=256, per C: fused vs compiled reference (>= 1.3x), bandwidth (>= 60% of copy)."""
    if not any(b == VERDICT_B for b, _, _, _ in results):
        print(f"verdict: B={VERDICT_B} was not measured in this run; the targets are for a CUDA run at "
              f"(256, C, 240, 240)")
        return
    time_kind = "kernel" if CUDA else "wall"
    for c, dtype in itertools.product(channels, dtypes):
        name_dtype = f"C={c} {str(dtype).removeprefix('torch.')}"
        tri = results.get((VERDICT_B, c, dtype, "triton"))
        comp = results.get((VERDICT_B, c, dtype, "compiled"))
        if tri is None:
            print(f"verdict B={VERDICT_B} {name_dtype}: no Triton measurement")
            continue
        parts = []
        if comp is None:
            parts.append("speed-up: no compiled reference at this batch (see --no-compile / --compile-batches)")
        else:
            s = comp[time_kind] / tri[time_kind]
            s_wall = comp["wall"] / tri["wall"]
            parts.append(f"fused {tri[time_kind]:.3f} ms vs compiled {comp[time_kind]:.3f} ms {time_kind} time = "
                         f"{s:.2f}x (target >= 1.3x: {'met' if s >= 1.3 else 'NOT met'}; wall {s_wall:.2f}x)")
        if tri["pct"] is None:
            parts.append("bandwidth: no positive kernel time to divide by")
        else:
            met = "met" if tri["pct"] >= 60 else "NOT met"
            parts.append(f"bandwidth {tri['pct']:.0f}% of copy (target >= 60%: {met})")
        where = "" if CUDA else " [CPU, Triton interpreted: not a GPU result]"
        print(f"verdict B={VERDICT_B} {name_dtype} ({hw}x{hw}){where}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
