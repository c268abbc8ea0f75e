"""Tests for fused_dice: the Triton path against the float64 reference.

The loss has one Dice per channel (dim 1) over the whole batch, averaged over the channels: C = 1 (the binary
model's (N, 1, H, W)), C = 3 (the BraTS regions) and an odd C = 5 are checked, in NCHW and channels_last.

Where the kernels run depends on TRITON_INTERPRET, read once when fused_dice is imported
(tests/conftest.py sets it to 1 unless it is already set):
  TRITON_INTERPRET=1 (default): the `device` fixture gives "cpu" and the kernels run in Triton's CPU
      interpreter on tiny tensors; the realistic-size tests are skipped.
  TRITON_INTERPRET=0 on a CUDA machine: the same tests run on "cuda" tensors with compiled kernels,
      plus the realistic-size tests (logits (64, 1, 240, 240) and 3- and 4-channel ones, default launch sizes):
          TRITON_INTERPRET=0 python -m pytest -q tests/test_fused_dice.py
  TRITON_INTERPRET=0 without CUDA: every test that needs the Triton path is skipped, saying why.
In every case test_kernels_compile_for_hopper compiles each kernel for sm_90 in a child process with
the interpreter off (no GPU needed, only the ptxas shipped in the triton wheel).
"""

import contextlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fused_dice as fd

pytestmark = pytest.mark.skipif(not fd.HAS_TRITON, reason="triton is not installed")

SHAPE = (2, 1, 17, 19)  # 323 elements per sample: not a multiple of any block size below
SHAPE3 = (3, 3, 9, 11)  # 3 channels (the BraTS regions) of 9 x 11: odd sizes, 297 elements per sample
REAL = (64, 1, 240, 240)  # a training batch of train.py's model output at full BraTS size

# the module's launch sizes as shipped, captured before any fixture changes them
DEFAULT_LAUNCH = {k: getattr(fd, k) for k in ("BLOCK", "ITERS", "REDUCE_N", "REDUCE_B")}


@pytest.fixture
def device():
    """Where the Triton path runs: "cpu" under the interpreter, "cuda" with compiled kernels."""
    if fd.TRITON_INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("the Triton path needs TRITON_INTERPRET=1 (CPU interpreter) or, with the interpreter off, a CUDA GPU")


@pytest.fixture
def cuda():
    """For realistic-size tests: compiled kernels on a GPU only (the interpreter would take minutes)."""
    if fd.TRITON_INTERPRET:
        pytest.skip("realistic sizes run only with compiled kernels: set TRITON_INTERPRET=0 on a CUDA machine")
    if not torch.cuda.is_available():
        pytest.skip("realistic sizes need a CUDA GPU (none available)")
    return "cuda"


@pytest.fixture
def default_blocks():
    """Requested by a test: keep the shipped launch sizes (small_blocks then leaves them alone)."""
    got = {k: getattr(fd, k) for k in DEFAULT_LAUNCH}
    assert got == DEFAULT_LAUNCH
    return got


@pytest.fixture(autouse=True)
def small_blocks(request, monkeypatch):
    """Tiny launch sizes so the tiny tensors still span several blocks and reduce-loop trips.

    Applies to every test (interpreter or CUDA) except those that request `default_blocks`.
    """
    if "default_blocks" in request.fixturenames:
        return
    monkeypatch.setattr(fd, "BLOCK", 32)
    monkeypatch.setattr(fd, "ITERS", 2)  # 64 elements per program: 6 blocks per sample of SHAPE
    monkeypatch.setattr(fd, "REDUCE_N", 4)
    monkeypatch.setattr(fd, "REDUCE_B", 4)  # 6 blocks -> two trips of the reduce loop


def run(logits, target, backend="triton", **kw):
    """(loss, grad w.r.t. logits) through the public API."""
    x = logits.detach().clone().requires_grad_()
    loss = fd.dice_bce_loss(x, target, backend=backend, **kw)
    loss.backward()
    return loss.detach(), x.grad


def ref(logits, target, **kw):
    """The one oracle: the reference function, upcast to float64."""
    x = logits.detach().double().requires_grad_()
    loss = fd.dice_bce_loss_reference(x, target.double(), **kw)
    loss.backward()
    return loss.detach(), x.grad


def check(logits, target, rtol=1e-5, atol=1e-7, grad_rtol=1e-4, **kw):
    loss, grad = run(logits, target, **kw)
    want_loss, want_grad = ref(logits, target, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    if fd._sample_major_order(logits) is not None:  # dense logits: the gradient comes back in their layout
        assert same_layout(grad, logits)
    torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=1e-6)
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), want_grad, rtol=grad_rtol, atol=atol + grad_rtol * scale)


def randn(*shape, seed=0, scale=2.0, device="cpu"):
    """Seeded on the CPU, so every device sees the same values."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device)


def mask(*shape, seed=1, p=0.3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < p).float().to(device)


def regions(*shape, seed=1, device="cpu"):
    """A mask of shape (N, C, ...) whose channels differ: channel 0 empty, the others ~10% to ~70% foreground
    (one channel: ~30%)."""
    c = shape[1]
    p = torch.tensor([0.0] + [0.1 + 0.6 * k / max(c - 2, 1) for k in range(c - 1)] if c > 1 else [0.3])
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(*shape, generator=g)
    return (u < p.view(1, c, *[1] * (len(shape) - 2))).float().to(device)


def layout(t, name):
    """`t` in the named memory layout (same values)."""
    return t.contiguous(memory_format=torch.channels_last) if name == "channels_last" else t.contiguous()


# ---------------------------------------------------------------------------------------------
# exact values


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_exact_hand_value(backend, device):
    # logits 0 -> p = 1/2 everywhere; target all ones on a 2x2 image.
    # BCE = ln 2; I = 2, P = 2, Y = 4: Dice = (2*2 + 1) / (2 + 4 + 1) = 5/7.
    # dL/dx = (p - y)/4 - dD/dp * p(1 - p) = -1/8 - (2*7 - 5)/49 * 1/4 = -1/8 - 9/196.
    logits = torch.zeros(1, 1, 2, 2, device=device)
    target = torch.ones(1, 1, 2, 2, device=device)
    loss, grad = run(logits, target, backend=backend)
    assert loss.item() == pytest.approx(math.log(2) + 2 / 7, rel=1e-6)
    torch.testing.assert_close(grad, torch.full_like(logits, -1 / 8 - 9 / 196))


# ---------------------------------------------------------------------------------------------
# against the float64 reference


@pytest.mark.parametrize("shape", [SHAPE, (1, 1, 17, 19), (5, 2, 3, 7), (6,), (4, 3)])
def test_matches_reference(shape, device):
    # (5, 2, 3, 7): more samples than REDUCE_N, two channels; (6,): one element per sample, one channel;
    # (4, 3): three channels of one element each
    check(randn(*shape, device=device), mask(*shape, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
@pytest.mark.parametrize("c", [1, 3, 5])
def test_channels_match_reference(c, memory, dtype, device):
    # channels_last puts the channel innermost (S_C = 1), NCHW outermost in a sample (S_C = 35); the target stays
    # contiguous. With small_blocks, a program owns 64 elements (C = 3: 8 lanes x 8 steps; C = 5: 4 lanes x 16
    # steps): blocks cross channel boundaries (NCHW) and every step holds several channels (channels_last).
    shape = (2, c, 7, 5)
    logits = layout(randn(*shape, device=device).to(dtype), memory)
    check(logits, regions(*shape, device=device), grad_rtol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("tdtype", fd.TARGET_DTYPES)
def test_channels_target_dtypes(tdtype, device):
    shape = (2, 3, 7, 5)
    logits = layout(randn(*shape, device=device), "channels_last")
    check(logits, regions(*shape, device=device).to(tdtype))


def test_most_channels_and_too_many(device):
    shape = (1, fd.MAX_CHANNELS, 3, 1)
    check(randn(*shape, device=device), regions(*shape, device=device))
    shape = (2, fd.MAX_CHANNELS + 1, 3)
    with pytest.raises(ValueError, match=rf"^logits: backend='triton' supports at most {fd.MAX_CHANNELS} channels"):
        fd.dice_bce_loss(torch.zeros(shape, device=device), torch.zeros(shape, device=device), backend="triton")
    assert torch.isfinite(fd.dice_bce_loss(torch.zeros(shape), torch.zeros(shape), backend="torch"))  # no limit there


def test_term_weights_smooth_and_soft_targets(device):
    target = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)).to(device)
    check(randn(*SHAPE, device=device), target, smooth=1e-3, bce_weight=0.25, dice_weight=2.0)


@pytest.mark.parametrize("fill", [0.0, 1.0], ids=["empty_mask", "full_mask"])
def test_empty_and_full_masks(fill, device):
    check(randn(*SHAPE, device=device), torch.full(SHAPE, fill, device=device))


def test_one_empty_sample(device):
    target = mask(*SHAPE, device=device)
    target[0] = 0
    check(randn(*SHAPE, device=device), target)


def test_saturated_logits(device):
    logits = torch.where(randn(*SHAPE, device=device) > 0, 80.0, -80.0)
    target = mask(*SHAPE, p=0.5, device=device)
    loss, grad = run(logits, target)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    check(logits, target)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype, device):
    # The interpreter runs both dtypes on this torch/triton; math is float32 inside, so the loss
    # matches tightly and the gradient is off only by its final rounding to the logits' dtype.
    logits = randn(*SHAPE, device=device).to(dtype)
    check(logits, mask(*SHAPE, device=device), grad_rtol=1e-2)


@pytest.mark.parametrize("tdtype", [torch.bool, torch.uint8, torch.float16])
def test_target_dtypes(tdtype, device):  # C = 1; C = 3 in test_channels_target_dtypes
    target = mask(*SHAPE, device=device).to(tdtype)
    check(randn(*SHAPE, device=device), target)
    loss_a, grad_a = run(randn(*SHAPE, device=device), target)
    loss_b, grad_b = run(randn(*SHAPE, device=device), mask(*SHAPE, device=device))
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)


def test_grad_output_scaling(device):
    x = randn(*SHAPE, device=device).requires_grad_()
    (3.0 * fd.dice_bce_loss(x, mask(*SHAPE, device=device), backend="triton")).backward()
    _, grad = ref(randn(*SHAPE, device=device), mask(*SHAPE, device=device))
    torch.testing.assert_close(x.grad.double(), 3.0 * grad, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# N > 1, C > 1: one Dice per channel over the whole batch, then their mean, on independent float64 values.
# The checks above compare with the reference, so a mistake made in both the reference and the kernels
# (e.g. a Dice per sample, then the mean; or one Dice over all channels) would pass them; these would not.


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_two_samples_exact(backend, device):
    # logits 0 -> p = 1/2 everywhere; sample 0 has an empty target, sample 1 a full one, 2 pixels
    # each, so numel = 4 and BCE = ln 2. Over the batch: I = 1, P = 2, Y = 2 -> Dice = (2 + 1) / (2 + 2 + 1) = 3/5
    # (a Dice per sample would give (1/2 + 3/4) / 2 = 5/8).
    # dL/dx = (p - y)/4 - dD/dp * p(1 - p), dD/dp = (2y S - (2I + 1)) / S^2, S = P + Y + 1 = 5:
    #   y=0: 1/8 + 3/25 * 1/4 = 31/200;   y=1: -1/8 - 7/25 * 1/4 = -39/200
    logits = torch.zeros(2, 1, 1, 2, device=device)
    target = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device).reshape(2, 1, 1, 2)
    loss, grad = run(logits, target, backend=backend)
    assert loss.item() == pytest.approx(math.log(2) + 1 - 3 / 5, rel=1e-6)
    torch.testing.assert_close(grad[0], torch.full_like(grad[0], 31 / 200))
    torch.testing.assert_close(grad[1], torch.full_like(grad[1], -39 / 200))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_three_channels_exact(backend, device):
    # logits 0 -> p = 1/2 everywhere; 2 samples x 3 channels x 1 pixel, numel = 6, BCE = ln 2. Targets
    # (sample 0, sample 1): channel 0 (1, 1), channel 1 (0, 0) (empty), channel 2 (1, 0). Per channel, over
    # the batch, with S = P + Y + 1:
    #   c0: I = 1,   P = 1, Y = 2, S = 4 -> Dice (2 + 1) / 4 = 3/4
    #   c1: I = 0,   P = 1, Y = 0, S = 2 -> Dice (0 + 1) / 2 = 1/2
    #   c2: I = 1/2, P = 1, Y = 1, S = 3 -> Dice (1 + 1) / 3 = 2/3
    # mean 23/36, loss ln 2 + 13/36 (one Dice over all channels would give ln 2 + 3/7, one per sample ln 2 + 0.381).
    # dL/dx = (p - y)/6 - (1/3) dD_c/dp * p(1 - p), dD_c/dp = (2y S - (2I + 1)) / S^2, p(1 - p) = 1/4:
    #   c0, y=1: -1/12 - (1/3)(5/16)(1/4) = -7/64      c1, y=0: 1/12 + (1/3)(1/4)(1/4) = 5/48
    #   c2, y=1: -1/12 - (1/3)(4/9)(1/4) = -13/108     c2, y=0: 1/12 + (1/3)(2/9)(1/4) = 11/108
    logits = torch.zeros(2, 3, 1, 1, device=device)
    target = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]], device=device).reshape(2, 3, 1, 1)
    loss, grad = run(logits, target, backend=backend)
    assert loss.item() == pytest.approx(math.log(2) + 13 / 36, rel=1e-6)
    want = torch.tensor([[-7 / 64, 5 / 48, -13 / 108], [-7 / 64, 5 / 48, 11 / 108]], device=device)
    torch.testing.assert_close(grad, want.reshape(2, 3, 1, 1))


def dice_bce_float64(x: np.ndarray, y: np.ndarray, smooth: float = 1.0, bce_weight: float = 1.0,
                     dice_weight: float = 1.0) -> float:
    """Dice+BCE from the textbook formulas in float64 numpy: BCE = -mean(y log p + (1 - y) log(1 - p)),
    one Dice per channel (axis 1; a 1-D x is one channel) over all N * M / C elements of that channel, then
    the mean of the C Dice."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    bce = -np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    c = x.shape[1] if x.ndim > 1 else 1
    pc = np.moveaxis(p.reshape(x.shape[0], c, -1), 1, 0).reshape(c, -1)  # (C, N * spatial)
    yc = np.moveaxis(y.reshape(x.shape[0], c, -1), 1, 0).reshape(c, -1)
    dice = [(2.0 * (pc[k] * yc[k]).sum() + smooth) / (pc[k].sum() + yc[k].sum() + smooth) for k in range(c)]
    return float(bce_weight * bce + dice_weight * (1.0 - sum(dice) / c))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_every_argument_against_the_float64_formula(backend, device):
    """smooth, bce_weight and dice_weight at values far from their defaults, loss and gradient against the float64
    formula and its finite differences: an argument a backend ignores (or two it swaps) shows."""
    logits, target = uneven_batch(device)
    x, y = logits.cpu().numpy(), target.cpu().numpy()
    args = {"smooth": 25.0, "bce_weight": 0.3, "dice_weight": 1.7}
    loss, grad = run(logits, target, backend=backend, **args)
    assert loss.item() == pytest.approx(dice_bce_float64(x, y, **args), rel=1e-5)
    for changed in ({**args, "smooth": 1.0}, {**args, "bce_weight": 1.7, "dice_weight": 0.3}):
        assert abs(dice_bce_float64(x, y, **changed) - loss.item()) > 1e-3  # the inputs tell each argument apart
    want = torch.from_numpy(finite_difference_grad(lambda v: dice_bce_float64(v, y, **args), x))
    torch.testing.assert_close(grad.cpu().double(), want, rtol=1e-3, atol=1e-7)


def finite_difference_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f at x, one element at a time, in float64."""
    x = x.astype(np.float64)
    grad = np.empty_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (f(up) - f(down)) / (2 * h)
    return grad


def uneven_batch(device="cpu"):
    """Four samples of (1, 9, 11) with 0, 4, 49 and 97 foreground pixels of 99, and logits that
    mostly agree with the mask: per-sample Dice runs from ~0.1 to ~0.97, the batch Dice is ~0.81."""
    g = torch.Generator().manual_seed(5)
    u = torch.rand(4, 1, 9, 11, generator=g)
    target = torch.stack([(u[i] < q).float() for i, q in enumerate([0.0, 0.03, 0.5, 0.97])])
    logits = 2.5 * (2 * target - 1) + 1.5 * torch.randn(4, 1, 9, 11, generator=g)
    return logits.to(device), target.to(device)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_against_float64_formula(backend, device):
    logits, target = uneven_batch(device)
    x, y = logits.cpu().numpy(), target.cpu().numpy()
    assert [int(v) for v in y.reshape(4, -1).sum(1)] == [0, 4, 49, 97]
    # the inputs tell the batch Dice from the mean of per-sample Dice by far more than any tolerance below
    p, yy = 1.0 / (1.0 + np.exp(-x.reshape(4, -1).astype(np.float64))), y.reshape(4, -1)
    per_sample = np.mean((2.0 * (p * yy).sum(1) + 1.0) / (p.sum(1) + yy.sum(1) + 1.0))
    batch = (2.0 * (p * yy).sum() + 1.0) / (p.sum() + yy.sum() + 1.0)
    assert abs(per_sample - batch) > 0.2
    loss, grad = run(logits, target, backend=backend)
    assert loss.item() == pytest.approx(dice_bce_float64(x, y), rel=1e-5)
    want = torch.from_numpy(finite_difference_grad(lambda v: dice_bce_float64(v, y), x))
    scale = want.abs().max().item()
    torch.testing.assert_close(grad.cpu().double(), want, rtol=1e-4, atol=1e-4 * scale)


def uneven_channels(device="cpu"):
    """Two samples of 3 channels x 4 x 5: an empty target in channel 0, 2 and 29 foreground pixels of 40 in
    channels 1 and 2, with logits that mostly agree with the mask."""
    target = regions(2, 3, 4, 5, seed=7)
    g = torch.Generator().manual_seed(8)
    logits = 2.5 * (2 * target - 1) + 1.5 * torch.randn(2, 3, 4, 5, generator=g)
    return logits.to(device), target.to(device)


@pytest.mark.parametrize("backend, memory", [("triton", "contiguous"), ("triton", "channels_last"),
                                             ("torch", "contiguous")])
def test_channels_against_float64_formula(backend, memory, device):
    logits, target = uneven_channels(device)
    x, y = logits.cpu().numpy(), target.cpu().numpy()
    assert [int(v) for v in y.sum((0, 2, 3))] == [0, 2, 29]
    # the inputs tell the mean of per-channel Dice from one Dice over all channels and from the mean of
    # per-sample Dice by far more than any tolerance below
    p = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    per_channel = np.mean((2.0 * (p * y).sum((0, 2, 3)) + 1.0) / (p.sum((0, 2, 3)) + y.sum((0, 2, 3)) + 1.0))
    one = (2.0 * (p * y).sum() + 1.0) / (p.sum() + y.sum() + 1.0)
    per_sample = np.mean((2.0 * (p * y).sum((1, 2, 3)) + 1.0) / (p.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1.0))
    assert abs(per_channel - one) > 0.1 and abs(per_channel - per_sample) > 0.1
    args = {"smooth": 0.5, "bce_weight": 0.3, "dice_weight": 1.7}
    loss, grad = run(layout(logits, memory), target, backend=backend, **args)
    assert loss.item() == pytest.approx(dice_bce_float64(x, y, **args), rel=1e-5)
    want = torch.from_numpy(finite_difference_grad(lambda v: dice_bce_float64(v, y, **args), x))
    scale = want.abs().max().item()
    torch.testing.assert_close(grad.cpu().double().contiguous(), want, rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------------------------------------
# determinism, layout, saved memory


@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_deterministic(memory, device):
    logits, target = layout(randn(5, 3, 3, 7, device=device), memory), regions(5, 3, 3, 7, device=device)
    loss_a, grad_a = run(logits, target)
    loss_b, grad_b = run(logits, target)
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(grad_a, grad_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last(dtype, device):
    shape = (2, 3, 5, 7)
    logits = randn(*shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    target = mask(*shape, device=device)  # contiguous: laid out differently from the logits
    x = logits.clone().requires_grad_()
    loss = fd.dice_bce_loss(x, target, backend="triton")
    loss.backward()
    assert x.grad.stride() == logits.stride()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    _, grad_torch = run(logits, target, backend="torch")
    assert grad_torch.stride() == logits.stride()
    check(logits, target, grad_rtol=1e-2 if dtype == torch.bfloat16 else 1e-4)
    # same numbers as the contiguous layout, up to float32 summation order
    loss_c, grad_c = run(logits.contiguous(), target)
    torch.testing.assert_close(loss, loss_c)
    torch.testing.assert_close(x.grad.contiguous(), grad_c, rtol=1e-2, atol=1e-6)


def test_non_dense_logits(device):
    base = randn(2, 1, 17, 40, device=device)
    logits = base[..., ::2]  # strided view: no dense order, goes through .contiguous()
    check(logits, mask(2, 1, 17, 20, device=device))


@pytest.mark.parametrize("c", [1, 3])
def test_saves_only_inputs_and_small_stats(c, device):
    shape = (3, c, 5, 7)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = randn(*shape, device=device).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fd.dice_bce_loss(x, mask(*shape, device=device), backend="triton")
    assert sorted(saved) == sorted([shape, shape, (4, c)])


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile


def test_opcheck(device):
    x = randn(*SHAPE, device=device).requires_grad_()
    y = mask(*SHAPE, device=device)
    torch.library.opcheck(fd._dice_bce_fwd, (x, y, 1.0, 1.0, 1.0))
    # C = 3 (stats (4, 3)), channels_last logits (the fake must give the gradient the real one's strides), a bool
    # target, other scalars
    shape = (2, 3, 5, 7)
    x = randn(*shape, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(fd._dice_bce_fwd, (x, mask(*shape, device=device).bool(), 1e-3, 0.25, 2.0))


@pytest.mark.parametrize("shape, memory", [(SHAPE, "contiguous"), (SHAPE3, "channels_last")], ids=["C1", "C3"])
def test_no_graph_break(shape, memory, device):
    def fn(x, y):
        return fd.dice_bce_loss(x, y, backend="triton")

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(layout(randn(*shape, device=device), memory), regions(*shape, device=device))
    assert explained.graph_break_count == 0
    assert explained.graph_count == 1


@pytest.mark.parametrize("shape", [SHAPE, SHAPE3], ids=["C1", "C3"])
def test_compiled_training_step_fullgraph(shape, device, monkeypatch):
    # Inductor on CPU: the loss stays one extern op (fake impls trace it, the interpreter runs it),
    # and AOTAutograd puts the backward op in the compiled backward graph. On CUDA the same with
    # compiled kernels; cuDNN's TF32 convolutions are switched off so eager and compiled convs agree.
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(shape[1], shape[1], 3, padding=1).to(device)
    x, y = randn(*shape, device=device), regions(*shape, device=device).bool()

    def step(x, y):
        return fd.dice_bce_loss(conv(x), y, backend="triton")

    loss = torch.compile(step, fullgraph=True)(x, y)
    loss.backward()
    got = conv.weight.grad.clone()
    conv.weight.grad = None
    want = fd.dice_bce_loss(conv(x), y, backend="torch")
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, conv.weight.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# launch device: Triton launches on the *current* CUDA device, so every launch must happen inside
# fd._on_device(logits.device). No CPU tensor can be on cuda:1, so the chain is checked in two links:
# every launch sits inside _on_device(logits.device), and _on_device enters torch.cuda.device(that device).


def test_every_launch_inside_the_logits_device(device, monkeypatch):
    entered = []  # devices of the _on_device contexts open now, innermost last
    launches = []  # (kernel, device of the innermost open context, or None)

    @contextlib.contextmanager
    def recording_on_device(dev):
        entered.append(dev)
        try:
            yield
        finally:
            entered.pop()

    class Spy:
        """Stands in for a kernel: kernel[grid](...) records where it launched, then launches."""

        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, entered[-1] if entered else None))
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(fd, "_on_device", recording_on_device)
    for name in ("fwd", "reduce", "bwd"):
        attr = f"_dice_bce_{name}_kernel"
        monkeypatch.setattr(fd, attr, Spy(name, getattr(fd, attr)))
    logits = randn(*SHAPE, device=device)
    loss, grad = run(logits, mask(*SHAPE, device=device))
    assert launches == [("fwd", logits.device), ("reduce", logits.device), ("bwd", logits.device)]
    assert torch.isfinite(loss) and torch.isfinite(grad).all()  # the spies did launch the kernels


def test_on_device_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    class RecordingDevice:
        """Stands in for torch.cuda.device (whose __enter__ needs a GPU): records what it is entered with."""

        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(self.dev)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    with fd._on_device(torch.device("cuda", 1)):
        pass
    with fd._on_device(torch.device("cpu")):  # no CUDA call at all off CUDA (the interpreter runs on CPU)
        pass
    assert entered == [torch.device("cuda", 1)]


def test_cuda_logits_on_a_device_that_is_not_current(cuda):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (logits on cuda:1 while cuda:0 is current)")
    with torch.cuda.device(0):
        logits, target = randn(*SHAPE, device="cuda:1"), mask(*SHAPE, device="cuda:1")
        check(logits, target)
        loss, grad = run(logits, target)
        assert loss.device == grad.device == torch.device("cuda", 1)
        assert torch.cuda.current_device() == 0


# ---------------------------------------------------------------------------------------------
# The kernels compile for Hopper (sm_90) without a GPU. Under TRITON_INTERPRET=1 the kernels run as
# Python, which accepts code the compiler rejects (a loop-carried variable changing type, a
# non-constexpr block size, ...), so a child process with the interpreter off compiles each kernel
# with triton.compile for a CUDA target down to PTX and, with the ptxas in the triton wheel, a cubin.

TL_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
            torch.uint8: "u8"}

# Run in a child process with TRITON_INTERPRET=0. Reads a JSON list of cases on stdin; prints one JSON
# line per case. Each argument is given as the JIT would see it at launch: "*fp32"-style strings for
# (16-byte aligned) tensors, Python ints and floats for scalars; like the JIT, an int equal to 1
# becomes a constexpr and a multiple of 16 gets a divisibility hint. The same ASTSource call works
# on triton 3.6 and 3.9 (signature by argument name, constexprs by name, attrs by argument index).
COMPILE_SCRIPT = r"""
import json, sys, time
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fused_dice as fd

assert not fd.TRITON_INTERPRET, "the child must compile, not interpret"
DIV16 = [["tt.divisibility", 16]]
target = GPUTarget("cuda", 90, 32)
for case in json.load(sys.stdin):
    fn = getattr(fd, case["kernel"])
    args, constexprs = case["args"], dict(case["constexprs"])
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args.get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(v, str):  # a tensor: pointer to its element type
            signature[name], attrs[(i,)] = v, DIV16
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif v == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = DIV16
    out = {"name": case["name"]}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), target=target)
        out.update(ptx=len(k.asm.get("ptx", "")), cubin=len(k.asm.get("cubin", b"")), target=k.metadata.target.arch)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e).strip()[-1500:]}"
    out["s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out), flush=True)
"""


def ptxas_path():
    """The ptxas Triton would call (TRITON_PTXAS_PATH, else the one in the triton wheel), or None."""
    if os.environ.get("TRITON_PTXAS_PATH"):
        return os.environ["TRITON_PTXAS_PATH"] if os.path.isfile(os.environ["TRITON_PTXAS_PATH"]) else None
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    return path if os.path.isfile(path) else None


def hopper_cases(launch):
    """Every kernel specialisation the public API can launch: logits dtype x target dtype (bool is
    viewed as uint8), at train.py's launch (64 samples of 1 x 240 x 240) with the shipped launch sizes;
    3 channels (the BraTS regions, C padded to 4) as NCHW (S_C = 240 * 240) and as channels_last (S_C = 1);
    plus one 64 x 64 sample, where N = NB = 1 become constexprs. Launch sizes come from fd._launch, as in the API."""
    assert {k: getattr(fd, k) for k in launch} == launch
    reduce_tiles = {"RN": launch["REDUCE_N"], "RB": launch["REDUCE_B"]}
    scalars = {"inv_n_total": 1e-6, "smooth": 1.0, "bce_weight": 1.0, "dice_weight": 1.0}
    target_dtypes = sorted({torch.uint8 if d == torch.bool else d for d in fd.TARGET_DTYPES}, key=str)

    def kernels(tag, n, m, x, y, c=1, s_c=1):
        cp, vec, steps, nb = fd._launch(c, m)
        blocks = {"VEC": vec, "STEPS": steps, "CP": cp}
        yield {"name": f"fwd {tag}", "kernel": "_dice_bce_fwd_kernel", "constexprs": blocks,
               "args": {"x_ptr": x, "y_ptr": y, "part_ptr": "*fp32", "N": n, "M": m, "NB": nb, "C": c, "S_C": s_c}}
        yield {"name": f"bwd {tag}", "kernel": "_dice_bce_bwd_kernel", "constexprs": blocks,
               "args": {"x_ptr": x, "y_ptr": y, "g_ptr": x, "stats_ptr": "*fp32", "go_ptr": "*fp32", "M": m,
                        "C": c, "S_C": s_c, **scalars}}

    def reduces(tag, n, m, c=1):
        nb = fd._launch(c, m)[3]
        yield {"name": f"reduce {tag}", "kernel": "_dice_bce_reduce_kernel", "constexprs": reduce_tiles,
               "args": {"part_ptr": "*fp32", "stats_ptr": "*fp32", "loss_ptr": "*fp32", "N": n, "NB": nb, "C": c,
                        **scalars}}

    n, m = REAL[0], math.prod(REAL[1:])
    for xd in fd.LOGITS_DTYPES:
        for yd in target_dtypes:
            x, y = "*" + TL_TYPES[xd], "*" + TL_TYPES[yd]
            yield from kernels(f"x={TL_TYPES[xd]} y={TL_TYPES[yd]}", n, m, x, y)
    yield from reduces("N=64", n, m)
    for layout, s_c in (("NCHW", 240 * 240), ("channels_last", 1)):
        yield from kernels(f"x=bf16 y=u8 C=3 {layout}", n, 3 * m, "*bf16", "*u8", c=3, s_c=s_c)
    yield from reduces("N=64 C=3", n, 3 * m, c=3)
    yield from kernels("x=fp32 y=u8 N=1", 1, 64 * 64, "*fp32", "*u8")
    yield from reduces("N=1", 1, 64 * 64)


def test_kernels_compile_for_hopper(default_blocks, tmp_path):
    if ptxas_path() is None:
        pytest.skip("no ptxas: neither TRITON_PTXAS_PATH nor triton/backends/nvidia/bin/ptxas exists")
    cases = list(hopper_cases(default_blocks))
    # (fwd + bwd) per dtype pair, 1 reduce, (fwd + bwd) x 2 layouts + 1 reduce at C = 3, 3 with N = 1
    assert len(cases) == 3 * 5 * 2 + 1 + 5 + 3
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="",  # compile only: no GPU used
               TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),  # fresh: every kernel really compiles
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], input=json.dumps(cases), env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in results] == [c["name"] for c in cases]
    failed = [f"{r['name']}: {r['error']}" for r in results if "error" in r]
    assert not failed, f"{len(failed)} of {len(cases)} failed to compile for sm_90:\n" + "\n".join(failed)
    for r in results:
        assert r["target"] == 90 and r["ptx"] > 1000 and r["cubin"] > 1000, r


# ---------------------------------------------------------------------------------------------
# CUDA only: realistic size with the shipped launch sizes (skipped under the interpreter)


def real_inputs(dtype, shape=REAL, device="cuda"):
    """Logits in [-9, 9]-ish and a sparse uint8 mask (~10% foreground, as a tumour), one empty sample."""
    logits = randn(*shape, seed=10, scale=3.0, device=device).to(dtype)
    target = mask(*shape, seed=11, p=0.1, device=device).to(torch.uint8)
    target[3] = 0  # slices without tumour are common in BraTS
    return logits, target


def same_layout(a, b):
    """Equal strides on every dim of size > 1 (size-1 dims have no meaningful stride)."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_realistic_matches_reference(cuda, default_blocks, dtype):
    # 57,600 elements per sample: 15 programs of BLOCK * ITERS (the last one partial), 4 trips of
    # the reduce over samples. atol=0: the gradient tolerance scales with its own largest value
    # (each element is ~1/numel, so the default absolute 1e-7 would hide errors).
    logits, target = real_inputs(dtype)
    check(logits, target, atol=0.0, grad_rtol=1e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_realistic_deterministic(cuda, default_blocks, dtype):
    logits, target = real_inputs(dtype)
    loss_a, grad_a = run(logits, target)
    loss_b, grad_b = run(logits, target)
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(grad_a, grad_b)


@pytest.mark.parametrize("shape", [REAL, (32, 3, 240, 240), (16, 4, 240, 240)], ids=["C1", "C3", "C4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_realistic_channels_last(cuda, default_blocks, shape, dtype):
    # C1: train.py's model output in channels_last (same bytes as contiguous); C3 (the BraTS regions), C4: a
    # layout that really differs, so the kernels walk a permuted order (channel innermost, one Dice per channel)
    # and the target (contiguous) is copied.
    logits, target = real_inputs(dtype, shape)
    logits = logits.contiguous(memory_format=torch.channels_last)
    x = logits.clone().requires_grad_()
    loss = fd.dice_bce_loss(x, target, backend="triton")
    loss.backward()
    assert same_layout(x.grad, logits)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    check(logits, target, atol=0.0, grad_rtol=1e-2 if dtype == torch.bfloat16 else 1e-4)
    # same numbers as the contiguous layout, up to float32 summation order (and bf16 rounding)
    loss_c, grad_c = run(logits.contiguous(), target)
    torch.testing.assert_close(loss, loss_c)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    scale = grad_c.abs().max().item()
    torch.testing.assert_close(x.grad.contiguous(), grad_c, rtol=tol, atol=tol * scale)


def test_cuda_auto_uses_triton(cuda):
    logits, target = randn(*SHAPE, device=cuda), mask(*SHAPE, device=cuda)
    loss_auto, grad_auto = run(logits, target, backend="auto")
    loss_tri, grad_tri = run(logits, target, backend="triton")
    assert torch.equal(loss_auto, loss_tri) and torch.equal(grad_auto, grad_tri)


# ---------------------------------------------------------------------------------------------
# backend selection and validation


def test_auto_uses_reference_on_cpu():
    logits, target = randn(*SHAPE), mask(*SHAPE)
    loss_auto, grad_auto = run(logits, target, backend="auto")
    loss_ref, grad_ref = run(logits, target, backend="torch")
    assert torch.equal(loss_auto, loss_ref) and torch.equal(grad_auto, grad_ref)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "logits, target, kwargs, argname, expected",
    [
        (torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 8), {}, "target", "same shape as logits (2, 1, 8, 8)"),
        (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4), {}, "logits", "float32, bfloat16 or float16"),
        (torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 4), {}, "logits", "float32"),
        (torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.int32), {}, "target", "float, uint8 or bool"),
        (torch.zeros(2, 4), torch.zeros(2, 4, device="meta"), {}, "target", "same device as logits"),
        (torch.zeros(0, 4), torch.zeros(0, 4), {}, "logits", "non-empty"),
        (torch.zeros(()), torch.zeros(()), {}, "logits", "shape (N, ...)"),
        ([0.0, 1.0], torch.zeros(2), {}, "logits", "torch.Tensor"),
        (torch.zeros(2, 4), [0.0] * 8, {}, "target", "torch.Tensor"),
    ],
)
def test_value_errors(backend, logits, target, kwargs, argname, expected):
    with pytest.raises(ValueError) as err:
        fd.dice_bce_loss(logits, target, backend=backend, **kwargs)
    assert str(err.value).startswith(argname + ":")
    assert expected in str(err.value)


@pytest.mark.parametrize("kwargs", [{"mode": "image"}, {"weight": torch.ones(2, 4)}], ids=["mode", "weight"])
def test_removed_arguments_are_refused(kwargs):
    # per-sample Dice and per-element BCE weights are gone: a caller still passing them must fail, not be ignored
    for fn in (fd.dice_bce_loss, fd.dice_bce_loss_reference):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            fn(torch.zeros(2, 4), torch.zeros(2, 4), **kwargs)


def test_bad_backend():
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        fd.dice_bce_loss(torch.zeros(2, 4), torch.zeros(2, 4), backend="cuda")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(fd, "TRITON_INTERPRET", False)
    with pytest.raises(ValueError, match=r"^logits: backend='triton' expected a CUDA tensor"):
        fd.dice_bce_loss(torch.zeros(2, 4), torch.zeros(2, 4), backend="triton")


def test_bench_loss_runs_and_agrees():
    """bench/loss.py on the CPU at a tiny size: it exits 0 (it exits 1 when Triton disagrees with the eager
    reference), prints a triton and an eager row per channel count and logits dtype, and their losses agree."""
    if not fd.TRITON_INTERPRET:  # the GPU run (bench/gpu.sh step f) keeps its time for the compiled kernels
        pytest.skip("with TRITON_INTERPRET=0 bench/gpu.sh runs bench/loss.py itself (step c)")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "loss.py"),
           "--device", "cpu", "--batches", "2", "--hw", "12", "--channels", "1,3", "--repeats", "1", "--no-compile"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| 2 |")]
    losses = {tuple(r[:4]): float(r[-1]) for r in rows}
    losses = {k: v for k, v in losses.items() if k[3] != "monai"}  # an optional, similar-not-equal loss: no verdict
    assert set(losses) == {("2", c, dt, impl) for c in ("1", "3") for dt in ("bfloat16", "float32")
                           for impl in ("triton", "eager")}
    for (b, c, dt, impl), loss in losses.items():
        assert 1.0 < loss < 3.5  # ~1.4 (BCE of logits 3 N(0, 1)) + ~0.8 (1 - Dice of a 10% mask): the loss, not a time
        assert loss == pytest.approx(losses[b, c, dt, "eager"], rel=1e-5)
