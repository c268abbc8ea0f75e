"""Fused Dice + BCE loss for segmentation with C sigmoid channels (overlapping regions), on raw logits.

    loss = bce_weight * BCE + dice_weight * (1 - mean over channels c of Dice_c)

Logits have shape (N, C, ...): dim 1 is the channel (a 1-D input (N,) is one channel). BCE is the mean over
all elements. Dice_c is one soft Dice per channel over the whole batch (every sample and every spatial
element of channel c in one sum), with `smooth` added to its numerator and denominator; the Dice term is
their mean over channels, as nnU-Net and MONAI train the BraTS regions. With C = 1 (the binary model's
(N, 1, H, W)) this is one Dice over the whole batch.

Three pieces side by side, like Liger-Kernel's fused losses:
  1. `dice_bce_loss_reference`: plain PyTorch, the one oracle for tests (float64 in, float64 out).
  2. Triton kernels: a forward that reads logits and targets once and writes partial sums per
     (channel, sample, block), a fixed-order reduce (no float atomics, so bit-identical run to run)
     into per-channel totals that also computes the scalar loss, and a backward that reads the inputs
     once more and writes one gradient, each element using its own channel's totals.
  3. `torch.library.custom_op` wrappers with fake impls and `register_autograd`, so
     `torch.compile` sees the loss as one opaque op with no graph break.

`dice_bce_loss` is the public entry point; it validates arguments and picks the backend.
All arithmetic is float32 whatever the input dtype; the gradient comes back in the logits' dtype
and memory layout (channels-last stays channels-last; any dense sample-major layout is read zero-copy,
each element's channel taken from the layout). Kernels launch on the logits' device, whichever CUDA
device is current. The Triton path takes at most MAX_CHANNELS channels and MAX_SAMPLES samples.
"""

from __future__ import annotations

import contextlib
import math
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
MAX_CHANNELS = 16  # the kernels do O(C) selects per element (C padded to a power of two): keep C small


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
    """Plain-PyTorch Dice+BCE; the oracle. Computes in float32, or float64 when logits are float64.

    One Dice per channel (dim 1) over the whole batch, then their mean; BCE the mean over all elements.
    """
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dt)
    y = target.to(dt)
    bce = F.binary_cross_entropy_with_logits(x, y, reduction="mean")
    p = torch.sigmoid(x)
    dims = [d for d in range(x.dim()) if d != 1]  # every dim but the channel: sums per channel over the batch
    dice = (2.0 * (p * y).sum(dims) + smooth) / (p.sum(dims) + y.sum(dims) + smooth)  # (C,); () for 1-D logits
    return bce_weight * bce + dice_weight * (1.0 - dice.mean())


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels
#
# Layout: each sample is a dense run of M = numel / N elements in storage (see _sample_major_order),
# so program (blk, n) owns elements [blk * VEC * STEPS, (blk + 1) * VEC * STEPS) of sample n.
# Channels: in that dense order the channel dim has some stride S_C (H * W for NCHW, 1 for channels_last),
# so the channel of in-sample offset o is (o // S_C) % C, whatever the layout. Programs stay on one
# sample's contiguous run; each keeps a [CP, VEC] accumulator per sum (CP = C padded to a power of two)
# and adds every element to its channel's row. The launch takes VEC = BLOCK // CP and STEPS = ITERS * CP,
# so a program still owns BLOCK * ITERS elements and holds 4 * BLOCK float32 accumulators whatever C.
# For C = 1 (CP = 1, VEC = BLOCK, STEPS = ITERS) the kernels do the same arithmetic in the same order as
# the single-Dice kernels they replace. Partials are per (channel, sample, block); the reduce adds them in
# a fixed order. Blocks go on grid axis 0 (limit 2^31 - 1), samples on axis 1 (limit 65535).

if HAS_TRITON:

    @triton.jit
    def _channel_of(offs, S_C, C):
        """Channel of in-sample offsets in a dense sample-major order where the channel dim has stride S_C."""
        return (offs // S_C) % C

    @triton.jit
    def _dice_bce_fwd_kernel(
        x_ptr, y_ptr, part_ptr,  # logits, targets (N*M each), partials (4, C, N, NB) float32
        N, M, NB, C, S_C,
        VEC: tl.constexpr, STEPS: tl.constexpr, CP: tl.constexpr,
    ):
        """Per-program, per-channel partial sums of BCE, p*y, p and y over VEC * STEPS elements of a sample."""
        blk = tl.program_id(0)
        n = tl.program_id(1)
        base = n.to(tl.int64) * M
        start = blk * (VEC * STEPS)
        cidx = tl.arange(0, CP)
        acc_bce = tl.zeros([CP, VEC], dtype=tl.float32)
        acc_py = tl.zeros([CP, VEC], dtype=tl.float32)
        acc_p = tl.zeros([CP, VEC], dtype=tl.float32)
        acc_y = tl.zeros([CP, VEC], dtype=tl.float32)
        for it in range(STEPS):
            offs = start + it * VEC + tl.arange(0, VEC)
            mask = offs < M
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + base + offs, mask=mask, other=0).to(tl.float32)
            p = tl.sigmoid(x)
            # stable BCE with logits: max(x, 0) - x*y + log(1 + exp(-|x|))
            bce = tl.maximum(x, 0.0) - x * y + tl.log(1.0 + tl.exp(-tl.abs(x)))
            ch = _channel_of(offs, S_C, C)
            hit = (ch[None, :] == cidx[:, None]) & mask[None, :]  # [CP, VEC]: the element's channel, in range
            acc_bce += tl.where(hit, bce[None, :], 0.0)
            acc_py += tl.where(hit, (p * y)[None, :], 0.0)
            acc_p += tl.where(hit, p[None, :], 0.0)
            acc_y += tl.where(hit, y[None, :], 0.0)
        out = cidx * (N * NB) + n * NB + blk
        stride_q = C * N * NB
        cmask = cidx < C
        tl.store(part_ptr + out, tl.sum(acc_bce, axis=1), mask=cmask)
        tl.store(part_ptr + stride_q + out, tl.sum(acc_py, axis=1), mask=cmask)
        tl.store(part_ptr + 2 * stride_q + out, tl.sum(acc_p, axis=1), mask=cmask)
        tl.store(part_ptr + 3 * stride_q + out, tl.sum(acc_y, axis=1), mask=cmask)

    @triton.jit
    def _dice_bce_reduce_kernel(
        part_ptr, stats_ptr, loss_ptr,  # partials (4, C, N, NB); stats (4, C); loss ()
        N, NB, C, inv_n_total, smooth, bce_weight, dice_weight,
        RN: tl.constexpr, RB: tl.constexpr,
    ):
        """One program: for each channel in turn, sums the partials in a fixed order (no atomics: bit-identical
        run to run) into stats[:, c] = [bce_sum, sum p*y, sum p, sum y] over the whole batch; then the loss with
        the mean of the per-channel Dice."""
        stride_c = N * NB
        stride_q = C * stride_c
        zero = tl.sum(tl.zeros([RN], dtype=tl.float32), axis=0)
        bce_all = zero
        dice_sum = zero
        for c in range(C):
            cbase = c * stride_c
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
                    offs = cbase + rn[:, None] * NB + rb[None, :]
                    s_bce += tl.sum(tl.load(part_ptr + offs, mask=m, other=0.0), axis=1)
                    s_py += tl.sum(tl.load(part_ptr + stride_q + offs, mask=m, other=0.0), axis=1)
                    s_p += tl.sum(tl.load(part_ptr + 2 * stride_q + offs, mask=m, other=0.0), axis=1)
                    s_y += tl.sum(tl.load(part_ptr + 3 * stride_q + offs, mask=m, other=0.0), axis=1)
                tot_bce += tl.sum(s_bce, axis=0)
                tot_py += tl.sum(s_py, axis=0)
                tot_p += tl.sum(s_p, axis=0)
                tot_y += tl.sum(s_y, axis=0)
            tl.store(stats_ptr + c, tot_bce)
            tl.store(stats_ptr + C + c, tot_py)
            tl.store(stats_ptr + 2 * C + c, tot_p)
            tl.store(stats_ptr + 3 * C + c, tot_y)
            bce_all += tot_bce
            dice_sum += (2.0 * tot_py + smooth) / (tot_p + tot_y + smooth)
        loss = bce_weight * (bce_all * inv_n_total) + dice_weight * (1.0 - dice_sum / C)
        tl.store(loss_ptr, loss)

    @triton.jit
    def _dice_bce_bwd_kernel(
        x_ptr, y_ptr, g_ptr, stats_ptr, go_ptr,  # logits, targets, grad out (N*M each), stats (4, C), d loss
        M, C, S_C, inv_n_total, smooth, bce_weight, dice_weight,
        VEC: tl.constexpr, STEPS: tl.constexpr, CP: tl.constexpr,
    ):
        """dL/dx = go * [bce_w (p - y) / n_total - (dice_w / C) * dD_c/dp * p (1 - p)], sigmoid recomputed,
        c the element's channel.

        With I = sum p*y, P = sum p, Y = sum y (over channel c of the batch), S = P + Y + smooth,
        D_c = (2I + smooth) / S: dD_c/dp = (2y S - (2I + smooth)) / S^2, i.e. -(dice_w / C) * dD_c/dp = a_c*y + b_c.
        """
        blk = tl.program_id(0)
        n = tl.program_id(1)
        cidx = tl.arange(0, CP)
        cmask = cidx < C
        s_py = tl.load(stats_ptr + C + cidx, mask=cmask, other=0.0)
        s_p = tl.load(stats_ptr + 2 * C + cidx, mask=cmask, other=1.0)  # padding channels: never selected, den > 0
        s_y = tl.load(stats_ptr + 3 * C + cidx, mask=cmask, other=0.0)
        go = tl.load(go_ptr).to(tl.float32)
        dice_w = dice_weight / C  # the Dice term is the mean over C channels
        den = s_p + s_y + smooth
        c_bce = go * bce_weight * inv_n_total
        a_c = -go * dice_w * 2.0 / den
        b_c = go * dice_w * (2.0 * s_py + smooth) / (den * den)
        base = n.to(tl.int64) * M
        start = blk * (VEC * STEPS)
        for it in range(STEPS):
            offs = start + it * VEC + tl.arange(0, VEC)
            mask = offs < M
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + base + offs, mask=mask, other=0).to(tl.float32)
            p = tl.sigmoid(x)
            ch = _channel_of(offs, S_C, C)
            hit = ch[None, :] == cidx[:, None]  # [CP, VEC]: select each element's channel's coefficients
            a = tl.sum(tl.where(hit, a_c[:, None], 0.0), axis=0)
            b = tl.sum(tl.where(hit, b_c[:, None], 0.0), axis=0)
            g = c_bce * (p - y) + (a * y + b) * (p * (1.0 - p))
            tl.store(g_ptr + base + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Layout helpers (shared by the real and the fake impls, so their strides always agree)


def _sample_major_order(t: torch.Tensor) -> list[int] | None:
    """A dim order starting with the batch dim in which `t` is dense, or None.

    The loss sums over every element of a sample, so any memory order inside a sample works
    (e.g. channels_last) as long as the gradient is written in the same order and each element's
    channel is read from that order (see _channel_layout).
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


def _channels(t: torch.Tensor) -> int:
    """C: the size of the channel dim (dim 1); a 1-D tensor (N,) is one channel."""
    return t.shape[1] if t.dim() > 1 else 1


def _channel_layout(t: torch.Tensor, order: list[int]) -> tuple[int, int]:
    """(C, S_C): the channel count and the channel dim's stride when `t` is flattened in `order`.

    The channel of in-sample flat offset o is then (o // S_C) % C: S_C = H * W for NCHW, 1 for channels_last.
    With one channel every element is channel 0, and S_C = 1 (one kernel specialisation, whatever the layout).
    """
    c = _channels(t)
    if c == 1:
        return 1, 1
    return c, math.prod(t.shape[d] for d in order[order.index(1) + 1:])


def _inputs_flat(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(logits, targets as 1-D tensors in one shared sample-major order, C, S_C); zero-copy when possible."""
    order = _sample_major_order(logits) or list(range(logits.dim()))
    x = _flat(logits, order)
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)  # same bytes; Triton loads it as an integer
    return x, _flat(target, order), *_channel_layout(logits, order)


def _launch(c: int, m: int) -> tuple[int, int, int, int]:
    """(CP, VEC, STEPS, NB) for C channels and M elements per sample: C padded to a power of two, the vector
    width and steps per program (VEC * STEPS = BLOCK * ITERS elements, 4 * BLOCK accumulators, whatever C),
    and the programs per sample."""
    cp = triton.next_power_of_2(c)
    vec = max(BLOCK // cp, 1)
    steps = BLOCK * ITERS // vec
    return cp, vec, steps, triton.cdiv(m, vec * steps)


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


# The op names changed with the per-channel Dice (stats (4,) became (4, C)): Inductor's on-disk caches key a
# compiled graph on the op's name, not on its fake impl, so code compiled for the old op would be reused and fail.
@torch.library.custom_op("brats_unet::channel_dice_bce_fwd", mutates_args=())
def _dice_bce_fwd(
    logits: torch.Tensor, target: torch.Tensor, smooth: float, bce_weight: float, dice_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: returns (loss as float32 0-d, stats (4, C) float32 saved for backward)."""
    n = logits.shape[0]
    m = logits.numel() // n
    x, y, c, s_c = _inputs_flat(logits, target)
    cp, vec, steps, nb = _launch(c, m)
    partials = torch.empty((4, c, n, nb), dtype=torch.float32, device=logits.device)
    stats = torch.empty((4, c), dtype=torch.float32, device=logits.device)
    loss = torch.empty((), dtype=torch.float32, device=logits.device)
    with _on_device(logits.device):
        _dice_bce_fwd_kernel[(nb, n)](x, y, partials, n, m, nb, c, s_c, VEC=vec, STEPS=steps, CP=cp)
        _dice_bce_reduce_kernel[(1,)](
            partials, stats, loss, n, nb, c, 1.0 / logits.numel(), smooth, bce_weight, dice_weight,
            RN=REDUCE_N, RB=REDUCE_B,
        )
    return loss, stats


@_dice_bce_fwd.register_fake
def _(logits, target, smooth, bce_weight, dice_weight):
    return (
        logits.new_empty((), dtype=torch.float32),
        logits.new_empty((4, _channels(logits)), dtype=torch.float32),
    )


@torch.library.custom_op("brats_unet::channel_dice_bce_bwd", mutates_args=())
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
    x, y, c, s_c = _inputs_flat(logits, target)
    grad, g = _grad_like(logits)
    cp, vec, steps, nb = _launch(c, m)
    go = grad_loss.to(torch.float32).reshape(1)  # stays on device: no .item()
    with _on_device(logits.device):
        _dice_bce_bwd_kernel[(nb, n)](
            x, y, g, stats, go, m, c, s_c, 1.0 / logits.numel(), smooth, bce_weight, dice_weight,
            VEC=vec, STEPS=steps, CP=cp,
        )
    return grad


@_dice_bce_bwd.register_fake
def _(grad_loss, logits, target, stats, smooth, bce_weight, dice_weight):
    return _grad_like(logits)[0]


def _setup_context(ctx, inputs, output) -> None:
    logits, target, smooth, bce_weight, dice_weight = inputs
    _, stats = output
    ctx.save_for_backward(logits, target, stats)  # the inputs plus 4 * C floats
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
        if _channels(logits) > MAX_CHANNELS:
            raise ValueError(
                f"logits: backend='triton' supports at most {MAX_CHANNELS} channels (dim 1), got {_channels(logits)}"
            )


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1.0,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Dice+BCE loss on raw logits of shape (N, C, ...) or (N,); returns a float32 0-d tensor.

    loss = bce_weight * BCE + dice_weight * (1 - mean_c Dice_c): one soft Dice per channel c (dim 1) over the
    whole batch, `smooth` added to its numerator and denominator, averaged over the C channels (one channel for
    (N,) or (N, 1, ...): one Dice over the whole batch); BCE the mean over all elements.
    backend="triton": fused kernels (at most MAX_CHANNELS channels); "torch": the plain reference;
    "auto": Triton on CUDA tensors.
    """
    _validate(logits, target, backend)
    if backend == "auto":
        backend = "triton" if HAS_TRITON and logits.device.type == "cuda" else "torch"
    if backend == "torch":
        return dice_bce_loss_reference(logits, target, smooth=smooth, bce_weight=bce_weight, dice_weight=dice_weight)
    loss, _ = _dice_bce_fwd(logits, target, float(smooth), float(bce_weight), float(dice_weight))
    return loss
