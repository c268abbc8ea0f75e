"""Train a 2D U-Net to segment the whole brain tumour on BraTS slices, then evaluate it on unseen patients.

    python train.py                                          # Kaggle BraTS 2020 (.h5 slices), needs the network
    python train.py --data nifti:../shared/data/brats-sample # official BraTS case folders
    python train.py --data synthetic --size 64 --epochs 2 --device cpu --out runs/smoke
    torchrun --nproc_per_node=8 train.py ...                 # DistributedDataParallel, one process per GPU

Top to bottom: config → data (cached, split by patient, resident on the device) → model → training loop
(Dice + BCE, AdamW, warm-up + cosine, early stopping on validation Dice) → threshold and minimum component
size chosen on validation → one evaluation on the test patients at 240 x 240 → figures. Everything lands in --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import metrics
from fused_dice import dice_bce_loss
from unet import UNet, UNetConfig, count_parameters

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_COMPONENTS = (0, 10, 25, 50, 100, 200, 400)  # pixels at 240 x 240


@dataclass
class TrainConfig:
    data: str = "kaggle"             # kaggle | synthetic[:VxS] | h5:DIR | nifti:DIR
    channel: int | None = None       # None: all four modalities; else one index of data.CHANNELS (0 = FLAIR)
    size: int = 240                  # slices are resized to size x size for training
    epochs: int = 40
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 1.0              # epochs of linear warm-up before the cosine decay
    patience: int = 8                # epochs without a better validation Dice before stopping
    base: int = 32                   # U-Net width at the first level
    depth: int = 4
    norm: str = "batch"
    loss_mode: str = "batch"         # Dice over the whole batch, or per image then averaged
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    augment: bool = True             # flips, 90° rotations, intensity scale/shift
    affine: bool = False             # plus a small random rotation and zoom (grid_sample)
    intensity: float = 0.1           # brain intensities scaled by 1 ± intensity and shifted by ± intensity
    # the fast path: each trick is one flag, so bench/train.py can ablate them
    resident: bool = True            # dataset in device memory; False: a DataLoader over the disk cache
    workers: int = 2                 # DataLoader workers when not resident
    channels_last: str = "auto"      # auto (on for CUDA) | on | off
    amp: str = "auto"                # auto (bf16 on CUDA if supported, else fp16) | bf16 | fp16 | off
    compile: str = "auto"            # auto (on for CUDA) | on | off
    loss_backend: str = "auto"       # auto (Triton on CUDA) | triton | torch
    device: str = "auto"
    seed: int = 0
    out: str = "runs/latest"
    cache_dir: str | None = None


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif f.name == "channel":
            p.add_argument(flag, type=int, default=None, help=f"one modality only, index into {data.CHANNELS}")
        elif f.name == "cache_dir":
            p.add_argument(flag, default=None, help=f"default {data.default_cache_dir()}")
        else:
            choices = {"device": ["auto", "cpu", "cuda"], "norm": ["batch", "instance", "group", "none"],
                       "loss_mode": ["batch", "image"], "amp": ["auto", "bf16", "fp16", "off"],
                       "compile": ["auto", "on", "off"], "channels_last": ["auto", "on", "off"],
                       "loss_backend": ["auto", "triton", "torch"]}.get(f.name)
            p.add_argument(flag, type=type(value), default=value, choices=choices)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    for name in ("size", "epochs", "batch_size", "base", "depth", "patience"):
        if getattr(cfg, name) <= 0:
            raise data.DataError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise data.DataError(f"--lr must be positive, got {cfg.lr}")
    if cfg.channel is not None and not 0 <= cfg.channel < len(data.CHANNELS):
        raise data.DataError(f"--channel must be in 0..{len(data.CHANNELS) - 1} ({', '.join(data.CHANNELS)}), got {cfg.channel}")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Pieces shared with predict.py and bench/train.py


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise data.DataError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where the device supports it, fp16 (with a GradScaler) otherwise, None for fp32."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def channel_list(channel: int | None) -> list[int]:
    return list(range(len(data.CHANNELS))) if channel is None else [channel]


def build_model(cfg: TrainConfig) -> UNet:
    return UNet(UNetConfig(in_channels=len(channel_list(cfg.channel)), base=cfg.base, depth=cfg.depth, norm=cfg.norm))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, total_steps: int,
                   warmup_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused on CUDA) and a per-step schedule: linear warm-up, then cosine decay to 1% of --lr."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def make_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig,
                    device: torch.device, dtype: torch.dtype | None, channels_last: bool, use_compile: bool):
    """One optimisation step `step(x, y) -> (loss, detached logits)` with the fast-path tricks the flags ask for:
    channels_last input, autocast (fp16 adds a GradScaler), torch.compile of forward + loss (the fused loss is one
    custom op inside the graph). No host synchronisation: loss and logits stay on the device."""
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = dice_bce_loss(logits, y, mode=cfg.loss_mode, bce_weight=cfg.bce_weight,
                             dice_weight=cfg.dice_weight, backend=cfg.loss_backend)
        return loss, logits.detach()

    forward = torch.compile(forward_loss) if use_compile else forward_loss

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, logits = forward(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss, logits

    return step


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int,
                   dtype: torch.dtype | None, channels_last: bool, out_size: int | None = None) -> torch.Tensor:
    """Logits (N, H, W) of float16 slices (N, C, H, W), batched on `device`; bilinearly resized to out_size if given."""
    model.eval()
    outs = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device, non_blocking=True).float()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x).float()
        if out_size is not None and logits.shape[-1] != out_size:
            logits = F.interpolate(logits, size=(out_size, out_size), mode="bilinear", align_corners=False)
        outs.append(logits[:, 0])
    return torch.cat(outs) if outs else torch.zeros(0, device=device)


def postprocess(probs: np.ndarray, threshold: float, min_component: int, largest_3d: bool = False) -> np.ndarray:
    """Binary mask of a volume's stacked slices (S, H, W) from probabilities: threshold, drop 2D components under
    min_component pixels and, if asked, keep only the largest 3D component (one tumour per patient)."""
    mask = metrics.remove_small_components(probs >= threshold, min_component)
    return metrics.keep_largest_component(mask) if largest_3d else mask


def save_atomic(obj, path: Path) -> None:
    with data.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path, device: torch.device) -> tuple[UNet, dict]:
    """Model (eval mode, on device) and the checkpoint dict (config, channels, size, threshold, ...)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = UNet(UNetConfig(**ckpt["unet"]))
        model.load_state_dict(ckpt["model"])
    except FileNotFoundError:
        raise data.DataError(f"checkpoint not found: {path}") from None
    except Exception as e:
        raise data.DataError(f"cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------------------
# Evaluation at the original resolution


def slice_probs(model, images: torch.Tensor, device, batch_size: int, dtype, cl) -> np.ndarray:
    """Tumour probability of each slice of (N, C, H, W) float16 images at 240 x 240, float16 on the host:
    what evaluation (here) and predict.py threshold."""
    logits = predict_logits(model, images, device, batch_size, dtype, cl, out_size=data.RAW_SIZE)
    return torch.sigmoid(logits).half().cpu().numpy()


def volume_probs(model, cache: data.Cache, ids: list[str], channels: list[int], device, cfg_batch, dtype, cl) -> dict[str, np.ndarray]:
    """Per volume: slice_probs of its kept slices."""
    return {vid: slice_probs(model, torch.from_numpy(np.ascontiguousarray(cache.images(vid, mmap=True)[:, channels])),
                             device, cfg_batch, dtype, cl) for vid in ids}


def choose_postprocessing(probs: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> tuple[dict, float]:
    """The post-processing (threshold, minimum component size, largest 3D component or not) with the best mean
    per-volume Dice on these volumes, and that Dice.

    Components are labelled once per threshold; every size cut is then a sum over component areas.
    """
    import cv2

    best = (0.5, 0, -1.0)
    for th in THRESHOLDS:
        inter = np.zeros((len(probs), len(MIN_COMPONENTS)))
        pred = np.zeros_like(inter)
        true = np.array([t.sum() for t in truth.values()], np.float64)
        for v, vid in enumerate(probs):
            for p, t in zip(probs[vid] >= th, truth[vid].astype(bool)):
                if not p.any():
                    continue
                n, labels, stats, _ = cv2.connectedComponentsWithStats(p.astype(np.uint8), connectivity=8)
                area = stats[1:, cv2.CC_STAT_AREA]
                hit = np.bincount(labels[t], minlength=n)[1:]
                for j, m in enumerate(MIN_COMPONENTS):
                    keep = area >= m
                    inter[v, j] += hit[keep].sum()
                    pred[v, j] += area[keep].sum()
        dice = np.where(true[:, None] > 0, 2 * inter / np.maximum(pred + true[:, None], 1), np.nan)
        for j, m in enumerate(MIN_COMPONENTS):
            score = metrics.nanmean(dice[:, j])
            if score > best[2] + 1e-9:
                best = (th, m, score)
    th, m, score = best
    volume_dice = []
    for vid in probs:
        pred = torch.from_numpy(postprocess(probs[vid].astype(np.float32), th, m, largest_3d=True))[None]
        volume_dice.append(metrics.dice_score(pred, torch.from_numpy(truth[vid].astype(bool))[None]).item())
    largest = metrics.nanmean(volume_dice) > score + 1e-9
    return {"threshold": th, "min_component": m, "largest_3d": largest}, max(score, metrics.nanmean(volume_dice))


def evaluate(probs: dict[str, np.ndarray], cache: data.Cache, post: dict) -> tuple[dict, list[dict], dict]:
    """Test metrics at 240 x 240: per-slice and per-volume Dice/IoU, HD95 (mm) per volume, false-positive slices.

    Returns (summary, per-slice records, post-processed masks per volume) — the last two feed the figures.
    """
    per_volume, slice_dice, slice_iou, fp, empty, records, masks = [], [], [], 0, 0, [], {}
    for vid, p in probs.items():
        meta, truth = cache.volume(vid), torch.from_numpy(cache.full_masks(vid).astype(bool))
        pred = torch.from_numpy(postprocess(p.astype(np.float32), **post))
        masks[vid] = pred.numpy()
        d, j = metrics.dice_score(pred, truth), metrics.iou_score(pred, truth)
        slice_dice += d.tolist()
        slice_iou += j.tolist()
        fp += metrics.false_positive_slices(pred, truth)
        empty += int((truth.flatten(1).sum(1) == 0).sum())
        full_pred = np.zeros((meta["depth"], data.RAW_SIZE, data.RAW_SIZE), bool)
        full_true = np.zeros_like(full_pred)
        full_pred[meta["slices"]], full_true[meta["slices"]] = pred.numpy(), truth.numpy()
        vd = metrics.dice_score(torch.from_numpy(full_pred)[None], torch.from_numpy(full_true)[None]).item()
        vi = metrics.iou_score(torch.from_numpy(full_pred)[None], torch.from_numpy(full_true)[None]).item()
        # volumes are stacked (z, x, y): spacing follows
        sp = meta["spacing"]
        h = metrics.hd95(full_pred, full_true, spacing=(sp[2], sp[0], sp[1]))
        per_volume.append({"id": vid, "dice": vd, "iou": vi, "hd95_mm": h, "tumour_voxels": int(full_true.sum())})
        records += [{"volume": vid, "slice": s, "dice": dd} for s, dd in zip(meta["slices"], d.tolist())]
    vols = [v["dice"] for v in per_volume]
    summary = {
        "volumes": len(per_volume),
        "volume_dice": metrics.nanmean(vols),
        "volume_dice_std": float(np.nanstd(vols)) if len(vols) else math.nan,
        "volume_dice_min": float(np.nanmin(vols)) if len(vols) else math.nan,
        "volume_iou": metrics.nanmean([v["iou"] for v in per_volume]),
        "hd95_mm": metrics.nanmean([v["hd95_mm"] for v in per_volume]),
        "slice_dice": metrics.nanmean(slice_dice),
        "slice_iou": metrics.nanmean(slice_iou),
        "tumour_slices": int(np.sum(~np.isnan(slice_dice))),
        "empty_slices": empty,
        "false_positive_slices": fp,
        "per_volume": per_volume,
    }
    return summary, records, masks


# ----------------------------------------------------------------------------------------------------------
# Figures


def plot_curves(log: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ep = [r["epoch"] for r in log]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("loss", "dice", "iou"), ("Dice + BCE loss", "Dice", "IoU")):
        ax.plot(ep, [r[f"train_{key}"] for r in log], "o-", label="train (pooled over batches, augmented)")
        ax.plot(ep, [r[f"val_{key}"] for r in log], "s-", label="validation (per volume, threshold 0.5)" if key != "loss" else "validation")
        ax.set_title(title), ax.set_xlabel("epoch"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    best = max(log, key=lambda r: r["val_dice"])
    axes[1].axvline(best["epoch"], color="gray", ls="--", lw=1)
    lr_ax = axes[0].twinx()
    lr_ax.plot(ep, [r["lr"] for r in log], color="gray", alpha=0.5, lw=1)
    lr_ax.set_ylabel("learning rate", color="gray")
    fig.tight_layout()
    save_figure(fig, path)


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB picture of a slice with true positives green, false positives red, false negatives blue."""
    brain = image != 0
    lo, hi = np.percentile(image[brain], (1, 99)) if brain.any() else (0.0, 1.0)
    g = np.where(brain, np.clip((image - lo) / (hi - lo + 1e-6), 0, 1), 0)
    rgb = np.stack([g, g, g], -1)
    for mask, colour in ((pred & truth, (0, 1, 0)), (pred & ~truth, (1, 0, 0)), (~pred & truth, (0, 0.4, 1))):
        rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array(colour)
    return rgb


def plot_slices(items: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cols = min(4, max(1, len(items)))
    rows = max(1, math.ceil(len(items) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.8 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, it in zip(axes.flat, items):
        ax.imshow(overlay(it["image"].T, it["pred"].T, it["truth"].T))  # rows = y: the radiological view
        d = it["dice"]
        ax.set_title(f"{it['volume']} z={it['slice']}\nDice {d:.3f}" if not math.isnan(d) else
                     f"{it['volume']} z={it['slice']}\nno tumour", fontsize=8)
    fig.legend(handles=[Patch(color=(0, 1, 0), label="true positive"), Patch(color=(1, 0, 0), label="false positive"),
                        Patch(color=(0, 0.4, 1), label="false negative")], loc="lower center", ncol=3, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip("."))
    plt.close(fig)


def slice_items(picks: list[dict], cache: data.Cache, masks: dict[str, np.ndarray]) -> list[dict]:
    """Image (FLAIR, or the one channel trained on), prediction and truth at 240 x 240 for chosen slices."""
    import cv2

    items = []
    for r in picks:
        meta = cache.volume(r["volume"])
        k = meta["slices"].index(r["slice"])
        img = cache.images(r["volume"], mmap=True)[k, data.FLAIR].astype(np.float32)
        img = cv2.resize(img, (data.RAW_SIZE, data.RAW_SIZE), interpolation=cv2.INTER_LINEAR)
        items.append({**r, "image": img, "pred": masks[r["volume"]][k], "truth": cache.full_masks(r["volume"])[k].astype(bool)})
    return items


# ----------------------------------------------------------------------------------------------------------


def main(cfg: TrainConfig) -> None:
    # --- distributed set-up: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain run is rank 0 of 1
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = resolve_device(cfg.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    torch.manual_seed(cfg.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = amp_dtype(cfg.amp, device)
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    out = Path(cfg.out)
    if master:
        print(json.dumps(asdict(cfg)))

    # --- data: the cache is built once (by rank 0), split by patient, and the training set moved to the device
    if master:
        cache = data.prepare(cfg.data, cfg.size, cfg.cache_dir)
    if ddp:
        dist.barrier()
    if not master:
        cache = data.prepare(cfg.data, cfg.size, cfg.cache_dir)
    split = data.split_volumes(cache.volume_ids, cfg.seed)
    channels = channel_list(cfg.channel)
    if master:  # the run folder is written only once the data is known to be good
        out.mkdir(parents=True, exist_ok=True)
        data.atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))
        data.atomic_write_text(out / "split.json", json.dumps(split, indent=2))
        print(f"data: {len(cache.volume_ids)} volumes, {cache.meta['kept']} slices with brain "
              f"({cache.meta['dropped']} without brain dropped); split by patient {len(split['train'])}/"
              f"{len(split['val'])}/{len(split['test'])} volumes; channels {[data.CHANNELS[c] for c in channels]}")
    val_set = data.load_slices(cache, split["val"], channels, device)
    if cfg.resident:
        train_set = data.load_slices(cache, split["train"], channels, device)
        n_train = len(train_set)
    else:
        disk_set = data.DiskSlices(cache, split["train"], channels)
        n_train = len(disk_set)
    if n_train == 0 or len(val_set) == 0:
        raise data.DataError("no slices with brain in the training or validation volumes")
    batch_size = min(cfg.batch_size, n_train)
    if cfg.resident:
        batches_per_epoch = max(1, n_train // (batch_size * world))
    else:
        sampler = torch.utils.data.DistributedSampler(disk_set, seed=cfg.seed) if ddp else None
        loader = torch.utils.data.DataLoader(
            disk_set, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
            num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0)
        batches_per_epoch = len(loader)

    # --- model, optimiser, schedule
    model = build_model(cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if master:
        print(f"model: {model.cfg}, {count_parameters(model) / 1e6:.2f} M parameters; device {device}, amp {dtype}, "
              f"channels_last {channels_last}, compile {use_compile}, world {world}")
    train_model = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    total_steps = cfg.epochs * batches_per_epoch
    optimizer, scheduler = make_optimizer(model, cfg, device, total_steps, max(1, int(cfg.warmup * batches_per_epoch)))
    step = make_train_step(train_model, optimizer, scheduler, cfg, device, dtype, channels_last, use_compile)
    eval_model = torch.compile(model) if use_compile else model
    # the same shuffling seed on every rank (each takes its own share of the permutation), its own augmentations
    generator = torch.Generator(device=train_set.images.device).manual_seed(cfg.seed * 1000) if cfg.resident else None
    aug_generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)

    def batches():
        if cfg.resident:
            stream = data.iterate_batches(train_set, batch_size, generator, device, rank=rank, world=world)
            for _, b in zip(range(batches_per_epoch), stream):
                yield b
        else:
            if sampler is not None:
                sampler.set_epoch(epoch)
            for x, y in loader:
                yield x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True).unsqueeze(1).float()

    # --- training loop
    log, best_dice, best_epoch, stale = [], -1.0, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        train_model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(5, device=device)  # loss, intersection, predicted, true, batches
        bar = tqdm(total=batches_per_epoch * batch_size * world, desc=f"epoch {epoch}/{cfg.epochs}", unit="slice",
                   disable=None if master else True, dynamic_ncols=True)  # None: only on a terminal
        for x, y in batches():
            if cfg.augment:
                x, y = data.augment(x, y, aug_generator, affine=cfg.affine, intensity=cfg.intensity)
            loss, logits = step(x, y)
            pred = logits > 0
            sums += torch.stack([loss.detach().float(), (pred & (y > 0.5)).sum().float(), pred.sum().float(),
                                 (y > 0.5).sum().float(), torch.ones((), device=device)])
            bar.update(x.shape[0] * world)
        if ddp:
            dist.all_reduce(sums)
        train_loss, inter, psum, tsum, nb = sums.tolist()  # the one host synchronisation of the epoch
        seconds = time.perf_counter() - t0

        # validation: every rank computes it (it is small and resident) so all agree on early stopping
        with torch.inference_mode():
            logits = predict_logits(eval_model, val_set.images, device, 2 * batch_size, dtype, channels_last)
            y = val_set.masks.to(device).float().unsqueeze(1)
            val_loss = dice_bce_loss(logits.unsqueeze(1), y, mode=cfg.loss_mode, bce_weight=cfg.bce_weight,
                                     dice_weight=cfg.dice_weight, backend="torch").item()
            pred, truth = logits.unsqueeze(1) > 0, y > 0.5
            vol = val_set.volume.to(device)
            nv = len(val_set.volume_ids)
            v_inter = torch.zeros(nv, device=device).index_add_(0, vol, (pred & truth).flatten(1).sum(1).float())
            v_pred = torch.zeros(nv, device=device).index_add_(0, vol, pred.flatten(1).sum(1).float())
            v_true = torch.zeros(nv, device=device).index_add_(0, vol, truth.flatten(1).sum(1).float())
            val_dice = metrics.nanmean(torch.where(v_true > 0, 2 * v_inter / (v_pred + v_true).clamp_min(1), math.nan).tolist())
            val_iou = metrics.nanmean(torch.where(v_true > 0, v_inter / (v_pred + v_true - v_inter).clamp_min(1), math.nan).tolist())
        if ddp:  # BatchNorm statistics differ per rank: rank 0's validation decides, so all ranks stop together
            agreed = torch.tensor([val_loss, val_dice, val_iou], dtype=torch.float64, device=device)
            dist.broadcast(agreed, 0)
            val_loss, val_dice, val_iou = agreed.tolist()
        record = {"epoch": epoch, "train_loss": train_loss / nb, "train_dice": 2 * inter / max(psum + tsum, 1),
                  "train_iou": inter / max(psum + tsum - inter, 1), "val_loss": val_loss, "val_dice": val_dice,
                  "val_iou": val_iou, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                  "slices_per_s": nb * batch_size / seconds}
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_dice=f"{val_dice:.3f}", slices_s=f"{record['slices_per_s']:.0f}")
        bar.close()
        if bar.disable and master:  # no terminal: one plain line per epoch instead of the bar
            print(f"epoch {epoch}/{cfg.epochs}: loss {record['train_loss']:.4f}, val loss {val_loss:.4f}, val Dice "
                  f"{val_dice:.4f}, val IoU {val_iou:.4f}, {record['slices_per_s']:.0f} slices/s", flush=True)
        improved = val_dice > best_dice
        if improved:
            best_dice, best_epoch, stale = val_dice, epoch, 0
        else:
            stale += 1
        if master:
            log.append(record)
            with open(out / "log.jsonl", "a" if epoch > 1 else "w") as f:
                f.write(json.dumps(record) + "\n")
            if improved:
                save_atomic({"model": model.state_dict(), "unet": asdict(model.cfg), "config": asdict(cfg),
                             "channels": channels, "size": cfg.size, "epoch": epoch, "val_dice": val_dice,
                             "threshold": 0.5, "min_component": 0, "largest_3d": False}, out / "best.pt")
        if stale >= cfg.patience:
            if master:
                print(f"early stop: no better validation Dice for {cfg.patience} epochs (best {best_dice:.4f} at epoch {best_epoch})")
            break
    if ddp:
        dist.destroy_process_group()
    if not master:
        return

    # --- post-processing chosen on validation, then one look at the test patients, all at 240 x 240
    model, ckpt = load_checkpoint(out / "best.pt", device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    val_probs = volume_probs(model, cache, split["val"], channels, device, 2 * batch_size, dtype, channels_last)
    val_truth = {v: cache.full_masks(v) for v in split["val"]}
    post, val_best = choose_postprocessing(val_probs, val_truth)
    ckpt.update(post)
    save_atomic(ckpt, out / "best.pt")
    test_probs = volume_probs(model, cache, split["test"], channels, device, 2 * batch_size, dtype, channels_last)
    test, records, test_masks = evaluate(test_probs, cache, post)
    result = {"test": test, **post,
              "val_volume_dice_at_choice": val_best, "best_epoch": best_epoch, "epochs_run": len(log),
              "data": cfg.data, "channels": [data.CHANNELS[c] for c in channels], "size": cfg.size}
    data.atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    print(f"test ({test['volumes']} unseen patients, 240x240): volume Dice {test['volume_dice']:.4f} "
          f"± {test['volume_dice_std']:.4f}, IoU {test['volume_iou']:.4f}, HD95 {test['hd95_mm']:.2f} mm; slice Dice "
          f"{test['slice_dice']:.4f} on {test['tumour_slices']} tumour slices; {test['false_positive_slices']} of "
          f"{test['empty_slices']} empty slices with false positives ({post})")

    # --- figures
    plot_curves(log, out / "curves.png")
    tumour = [r for r in records if not math.isnan(r["dice"])]
    largest = {}  # per test volume, the slice with the most tumour
    for r in tumour:
        k = cache.volume(r["volume"])["slices"].index(r["slice"])
        area = int(cache.full_masks(r["volume"])[k].sum())
        if area > largest.get(r["volume"], (None, -1))[1]:
            largest[r["volume"]] = (r, area)
    picks = [r for r, _ in largest.values()][:8]
    if len(picks) < 8:  # fill with evenly spaced tumour slices
        rest = [r for r in tumour if r not in picks]
        picks += rest[:: max(1, len(rest) // (8 - len(picks)))][: 8 - len(picks)]
    plot_slices(slice_items(picks, cache, test_masks), out / "overlays.png",
                "Test patients: ground truth vs prediction (green TP, red FP, blue FN)")
    worst = sorted(tumour, key=lambda r: r["dice"])[:8]
    plot_slices(slice_items(worst, cache, test_masks), out / "failures.png",
                "Worst test slices by Dice")
    print(f"wrote {out}/: config.json split.json log.jsonl best.pt metrics.json curves.png overlays.png failures.png")


def cli(argv: list[str] | None = None) -> int:
    try:
        main(parse_args(argv))
    except data.DataError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
