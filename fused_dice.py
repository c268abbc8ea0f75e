"""Fused Dice + BCE loss for binary segmentation, on raw logits.

    loss = bce_weight * BCE + dice_weight * (1 - Dice)

BCE is the mean over all elements; Dice is one soft Dice over the whole batch (every element of every
sample in one sum), with `smooth` added to its numerator and denominator.

Three pieces side by side, like Liger-Kernel's fused losses:
  1. `dice_bce_loss_reference`: plain PyTorch, the one oracle for tests (float64 in, float64 out).
  2. Triton kernels: a forward that reads logits and targets once and writes per-block partial
     sums, a fixed-order reduce (no float atomics, so bit-identical run to run) that also computes
     the scalar loss, and a backward that reads the inputs once more and writes one gradient.
  3. `torch.library.custom_op` wrappers with fake impls and `register_autograd`, so
     `torch.compile` sees the loss as one opaque op with no graph break.

`dice_bce_loss` is the public entry point; it validates arguments and picks the backend.
All arithmetic is float32 whatever the input dtype; the gradient comes back in the logits' dtype
and memory layout (channels-last stays channels-last). Kernels launch on the logits' device, whichever
CUDA device is current.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

try:  # the reference path must work where Triton is not installed
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

# Triton decides at @triton.jit time whether kernels run in the CPU interpreter, so reading the
# variable once at import matches what the kernels will actually do.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("auto", "torch", "triton")
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TARGET_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8, torch.bool)

# Launch configuration. Module-level so tests can shrink them to force several blocks per sample
# and several loop trips in the reduce. Not tuned on a GPU yet.
BLOCK = 1024  # elements per vector step in the forward/backward kernels
ITERS = 4  # vector steps per program: each program owns BLOCK * ITERS elements of one sample
REDUCE_N = 16  # samples per tile in the reduce kernel
REDUCE_B = 64  # blocks per tile in the reduce kernel
MAX_SAMPLES = 65535  # samples live on grid axis 1, whose CUDA limit is 65535


# ----------------------------------------------------------------------------------------------
# 1. Plain-PyTorch reference


def dice_bce_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1.0,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """Plain-PyTorch Dice+BCE; the oracle. Computes in float32, or float64 when logits are float64."""
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dt)
    y = target.to(dt)
    bce = F.binary_cross_entropy_with_logits(x, y, reduction="mean")
    p = torch.sigmoid(x)
    dice = (2.0 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)
    return bce_weight * bce + dice_weight * (1.0 - dice)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels
#
# Layout: each sample is a dense run of M = numel / N elements in storage (see _sample_major_order),
# so program (blk, n) owns elements [blk * BLOCK * ITERS, (blk + 1) * BLOCK * ITERS) of sample n.
# The Dice needs only totals over the batch; the per-(block, sample) partials keep every program on
# one sample's contiguous run and let the reduce add them up in a fixed order.
# Blocks go on grid axis 0 (limit 2^31 - 1), samples on axis 1 (limit 65535).

if HAS_TRITON:

    @triton.jit
    def _dice_bce_fwd_kernel(
        x_ptr, y_ptr, part_ptr,  # logits, targets (N*M each), partials (4, N, NB) float32
        N, M, NB,
        BLOCK: tl.constexpr, ITERS: tl.constexpr,
    ):
        """Per-program partial sums of BCE, p*y, p and y over BLOCK * ITERS elements of a sample."""
        blk = tl.program_id(0)
        n = tl.program_id(1)
        base = n.to(tl.int64) * M
        start = blk * (BLOCK * ITERS)
        acc_bce = tl.zeros([BLOCK], dtype=tl.float32)
        acc_py = tl.zeros([BLOCK], dtype=tl.float32)
        acc_p = tl.zeros([BLOCK], dtype=tl.float32)
        acc_y = tl.zeros([BLOCK], dtype=tl.float32)
        for it in range(ITERS):
            offs = start + it * BLOCK + tl.arange(0, BLOCK)
            mask = offs < M
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + base + offs, mask=mask, other=0).to(tl.float32)
            p = tl.sigmoid(x)
            # stable BCE with logits: max(x, 0) - x*y + log(1 + exp(-|x|))
            bce = tl.maximum(x, 0.0) - x * y + tl.log(1.0 + tl.exp(-tl.abs(x)))
            acc_bce += tl.where(mask, bce, 0.0)
            acc_py += p * y  # y is 0 where masked
            acc_p += tl.where(mask, p, 0.0)
            acc_y += y
        out = n * NB + blk
        stride_q = N * NB
        tl.store(part_ptr + out, tl.sum(acc_bce, axis=0))
        tl.store(part_ptr + stride_q + out, tl.sum(acc_py, axis=0))
        tl.store(part_ptr + 2 * stride_q + out, tl.sum(acc_p, axis=0))
        tl.store(part_ptr + 3 * stride_q + out, tl.sum(acc_y, axis=0))

    @triton.jit
    def _dice_bce_reduce_kernel(
        part_ptr, stats_ptr, loss_ptr,  # partials (4, N, NB); stats (4,); loss ()
        N, NB, inv_n_total, smooth, bce_weight, dice_weight,
        RN: tl.constexpr, RB: tl.constexpr,
    ):
        """One program: sums the partials in a fixed order (no atomics: bit-identical run to run) into
        stats = [bce_sum, sum p*y, sum p, sum y] over the whole batch, then the loss."""
        stride_q = N * NB
        zero = tl.sum(tl.zeros([RN], dtype=tl.float32), axis=0)
        tot_bce = zero
        tot_py = zero
        tot_p = zero
        tot_y = zero
        for n0 in range(0, N, RN):
            rn = n0 + tl.arange(0, RN)
            nmask = rn < N
            s_bce = tl.zeros([RN], dtype=tl.float32)
            s_py = tl.zeros([RN], dtype=tl.float32)
            s_p = tl.zeros([RN], dtype=tl.float32)
            s_y = tl.zeros([RN], dtype=tl.float32)
            for b0 in range(0, NB, RB):
                rb = b0 + tl.arange(0, RB)
                m = nmask[:, None] & (rb[None, :] < NB)
                offs = rn[:, None] * NB + rb[None, :]
                s_bce += tl.sum(tl.load(part_ptr + offs, mask=m, other=0.0), axis=1)
                s_py += tl.sum(tl.load(part_ptr + stride_q + offs, mask=m, other=0.0), axis=1)
                s_p += tl.sum(tl.load(part_ptr + 2 * stride_q + offs, mask=m, other=0.0), axis=1)
                s_y += tl.sum(tl.load(part_ptr + 3 * stride_q + offs, mask=m, other=0.0), axis=1)
            tot_bce += tl.sum(s_bce, axis=0)
            tot_py += tl.sum(s_py, axis=0)
            tot_p += tl.sum(s_p, axis=0)
            tot_y += tl.sum(s_y, axis=0)
        tl.store(stats_ptr + 0, tot_bce)
        tl.store(stats_ptr + 1, tot_py)
        tl.store(stats_ptr + 2, tot_p)
        tl.store(stats_ptr + 3, tot_y)
        dice = (2.0 * tot_py + smooth) / (tot_p + tot_y + smooth)
        loss = bce_weight * (tot_bce * inv_n_total) + dice_weight * (1.0 - dice)
        tl.store(loss_ptr, loss)

    @triton.jit
    def _dice_bce_bwd_kernel(
        x_ptr, y_ptr, g_ptr, stats_ptr, go_ptr,  # logits, targets, grad out (N*M each), stats (4,), d loss
        M, inv_n_total, smooth, bce_weight, dice_weight,
        BLOCK: tl.constexpr, ITERS: tl.constexpr,
    ):
        """dL/dx = go * [bce_w (p - y) / n_total - dice_w * dD/dp * p (1 - p)], sigmoid recomputed.

        With I = sum p*y, P = sum p, Y = sum y (over the batch), S = P + Y + smooth, D = (2I + smooth) / S:
        dD/dp = (2y S - (2I + smooth)) / S^2, i.e. -dice_w * dD/dp = a*y + b below.
        """
        blk = tl.program_id(0)
        n = tl.program_id(1)
        s_py = tl.load(stats_ptr + 1)
        s_p = tl.load(stats_ptr + 2)
        s_y = tl.load(stats_ptr + 3)
        go = tl.load(go_ptr).to(tl.float32)
        den = s_p + s_y + smooth
        c = go * bce_weight * inv_n_total
        a = -go * dice_weight * 2.0 / den
        b = go * dice_weight * (2.0 * s_py + smooth) / (den * den)
        base = n.to(tl.int64) * M
        start = blk * (BLOCK * ITERS)
        for it in range(ITERS):
            offs = start + it * BLOCK + tl.arange(0, BLOCK)
            mask = offs < M
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + base + offs, mask=mask, other=0).to(tl.float32)
            p = tl.sigmoid(x)
            g = c * (p - y) + (a * y + b) * (p * (1.0 - p))
            tl.store(g_ptr + base + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Layout helpers (shared by the real and the fake impls, so their strides always agree)


def _sample_major_order(t: torch.Tensor) -> list[int] | None:
    """A dim order starting with the batch dim in which `t` is dense, or None.

    The loss sums over every element of a sample, so any memory order inside a sample works
    (e.g. channels_last) as long as the gradient is written in the same order.
    """
    order = [0] + sorted(range(1, t.dim()), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else None


def _flat(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    """View (or copy, when `t` is laid out differently) of `t` as 1-D in `order`."""
    return t.permute(order).contiguous().view(-1)


def _grad_like(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient with the logits' strides when they are sample-major dense, its flat storage view)."""
    order = _sample_major_order(logits) or list(range(logits.dim()))
    inv = sorted(range(len(order)), key=lambda i: order[i])
    flat = torch.empty(logits.numel(), dtype=logits.dtype, device=logits.device)
    grad = flat.view([logits.shape[d] for d in order]).permute(inv)
    return grad, flat


def _inputs_flat(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets as 1-D tensors in one shared sample-major order; zero-copy when possible."""
    order = _sample_major_order(logits) or list(range(logits.dim()))
    x = _flat(logits, order)
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)  # same bytes; Triton loads it as an integer
    return x, _flat(target, order)


# ----------------------------------------------------------------------------------------------
# 3. Custom ops and autograd


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` the current CUDA device for kernel launches (a no-op off CUDA).

    Triton launches on the current device and its current stream, not on the device of the
    tensors it is given: without this, logits on cuda:1 while cuda:0 is current would be read by
    a kernel running on cuda:0. `torch.cuda.device` takes a torch.device in every torch we support.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@torch.library.custom_op("brats_unet::dice_bce_fwd", mutates_args=())
def _dice_bce_fwd(
    logits: torch.Tensor, target: torch.Tensor, smooth: float, bce_weight: float, dice_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: returns (loss as float32 0-d, stats (4,) float32 saved for backward)."""
    n = logits.shape[0]
    m = logits.numel() // n
    x, y = _inputs_flat(logits, target)
    nb = triton.cdiv(m, BLOCK * ITERS)
    partials = torch.empty((4, n, nb), dtype=torch.float32, device=logits.device)
    stats = torch.empty((4,), dtype=torch.float32, device=logits.device)
    loss = torch.empty((), dtype=torch.float32, device=logits.device)
    with _on_device(logits.device):
        _dice_bce_fwd_kernel[(nb, n)](x, y, partials, n, m, nb, BLOCK=BLOCK, ITERS=ITERS)
        _dice_bce_reduce_kernel[(1,)](
            partials, stats, loss, n, nb, 1.0 / logits.numel(), smooth, bce_weight, dice_weight,
            RN=REDUCE_N, RB=REDUCE_B,
        )
    return loss, stats


@_dice_bce_fwd.register_fake
def _(logits, target, smooth, bce_weight, dice_weight):
    return (
        logits.new_empty((), dtype=torch.float32),
        logits.new_empty((4,), dtype=torch.float32),
    )


@torch.library.custom_op("brats_unet::dice_bce_bwd", mutates_args=())
def _dice_bce_bwd(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    smooth: float,
    bce_weight: float,
    dice_weight: float,
) -> torch.Tensor:
    """Triton backward: the gradient w.r.t. logits, in their dtype and layout."""
    n = logits.shape[0]
    m = logits.numel() // n
    x, y = _inputs_flat(logits, target)
    grad, g = _grad_like(logits)
    nb = triton.cdiv(m, BLOCK * ITERS)
    go = grad_loss.to(torch.float32).reshape(1)  # stays on device: no .item()
    with _on_device(logits.device):
        _dice_bce_bwd_kernel[(nb, n)](
            x, y, g, stats, go, m, 1.0 / logits.numel(), smooth, bce_weight, dice_weight,
            BLOCK=BLOCK, ITERS=ITERS,
        )
    return grad


@_dice_bce_bwd.register_fake
def _(grad_loss, logits, target, stats, smooth, bce_weight, dice_weight):
    return _grad_like(logits)[0]


def _setup_context(ctx, inputs, output) -> None:
    logits, target, smooth, bce_weight, dice_weight = inputs
    _, stats = output
    ctx.save_for_backward(logits, target, stats)  # the inputs plus 4 floats
    ctx.args = (smooth, bce_weight, dice_weight)


def _backward(ctx, grad_loss, grad_stats):
    logits, target, stats = ctx.saved_tensors
    grad = _dice_bce_bwd(grad_loss, logits, target, stats, *ctx.args)
    return grad, None, None, None, None


_dice_bce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry point


def _validate(logits: torch.Tensor, target: torch.Tensor, backend: str) -> None:
    """Raise ValueError naming the offending argument and what was expected."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits: expected dtype float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 1 or logits.numel() == 0:
        raise ValueError(f"logits: expected a non-empty tensor of shape (N, ...), got {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise ValueError(f"target: expected the same shape as logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    if target.dtype not in TARGET_DTYPES:
        raise ValueError(f"target: expected a float, uint8 or bool dtype, got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"target: expected the same device as logits ({logits.device}), got {target.device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend: 'triton' requested but triton is not installed")
        if logits.device.type != "cuda" and not TRITON_INTERPRET:
            raise ValueError(
                f"logits: backend='triton' expected a CUDA tensor (or TRITON_INTERPRET=1 set before "
                f"importing triton for CPU), got device {logits.device}"
            )
        if logits.shape[0] > MAX_SAMPLES:
            raise ValueError(f"logits: backend='triton' supports at most {MAX_SAMPLES} samples, got {logits.shape[0]}")


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1.0,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Dice+BCE loss on raw logits of shape (N, ...); returns a float32 0-d tensor.

    One Dice over the whole batch; BCE the mean over all elements; bce_weight and dice_weight scale the two terms.
    backend="triton": fused kernels; "torch": the plain reference; "auto": Triton on CUDA tensors.
    """
    _validate(logits, target, backend)
    if backend == "auto":
        backend = "triton" if HAS_TRITON and logits.device.type == "cuda" else "torch"
    if backend == "torch":
        return dice_bce_loss_reference(logits, target, smooth=smooth, bce_weight=bce_weight, dice_weight=dice_weight)
    loss, _ = _dice_bce_fwd(logits, target, float(smooth), float(bce_weight), float(dice_weight))
    return loss
