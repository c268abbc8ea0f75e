"""Segmentation metrics: Dice, IoU, HD95, and the post-processing they are measured after.

Conventions: per slice (MONAI `ignore_empty=True`, nnU-Net) a sample whose target is empty scores NaN, so means
skip it; the slices with an empty target that still get predicted pixels are counted separately as
false-positive slices. Per patient and region (region_scores) the BraTS challenge's: a region absent from label and
prediction scores Dice 1 and HD95 0, absent from one only Dice 0 and HD95 the volume's diagonal, so every patient
counts (an enhancing tumour may be absent). Every test metric is taken at the original 240 x 240 resolution (the
validation metrics logged while training are at the training size).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from scipy import ndimage


def counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample of (N, ...) masks: |A∩B|, |A| and |B| (float64), from which Dice and IoU are computed."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    p = pred.reshape(pred.shape[0], -1).bool()
    t = target.reshape(target.shape[0], -1).bool()
    return (p & t).sum(1).double(), p.sum(1).double(), t.sum(1).double()


def dice_from_counts(inter: torch.Tensor, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Dice = 2|A∩B| / (|A| + |B|) from counts (any shape, summed however the caller wants: per slice, per volume,
    over a batch); NaN where the target is empty. The one Dice formula of the project."""
    return torch.where(true > 0, 2 * inter / (pred + true).clamp_min(1), math.nan)


def iou_from_counts(inter: torch.Tensor, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """IoU = |A∩B| / |A∪B| from counts; NaN where the target is empty. The one IoU formula of the project."""
    return torch.where(true > 0, inter / (pred + true - inter).clamp_min(1), math.nan)


def dice_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice per sample of (N, ...) boolean masks (float32); NaN where the target is empty."""
    return dice_from_counts(*counts(pred, target)).float()


def iou_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU per sample of (N, ...) boolean masks (float32); NaN where the target is empty."""
    return iou_from_counts(*counts(pred, target)).float()


BRATS_LABELS = {1: "core", 2: "oedema", 4: "enhancing"}  # necrotic/non-enhancing core, oedema, enhancing tumour


def recall_per_label(pred: np.ndarray, label: np.ndarray) -> dict[int, tuple[float, int]]:
    """For each of BRATS_LABELS: (the fraction of its voxels inside the predicted whole-tumour mask, its voxel
    count); NaN where the label is absent. Which part of the tumour a miss is: the faint oedema or the core."""
    pred, label = np.asarray(pred, bool), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"pred and label must have the same shape, got {pred.shape} and {label.shape}")
    found = np.bincount(label[pred].ravel().astype(np.int64), minlength=max(BRATS_LABELS) + 1)
    total = np.bincount(label.ravel().astype(np.int64), minlength=max(BRATS_LABELS) + 1)
    return {k: (found[k] / total[k] if total[k] else math.nan, int(total[k])) for k in BRATS_LABELS}


def false_positive_slices(pred: torch.Tensor, target: torch.Tensor) -> int:
    """Number of samples whose target is empty but whose prediction has at least one pixel."""
    _, p, t = counts(pred, target)
    return int(((t == 0) & (p > 0)).sum())


def diagonal_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """The diagonal of a volume in mm (373.13 for BraTS's 240 x 240 x 155 at 1 mm): the HD95 the BraTS challenge
    gives a region present in one of label and prediction only."""
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def hd95(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two boolean volumes.

    NaN when the target is empty; when the prediction is empty but the target is not, the volume's diagonal
    (373.13 mm for BraTS), the convention of the BraTS challenge.
    """
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}")
    if not target.any():
        return math.nan
    if not pred.any():
        return diagonal_mm(pred.shape, spacing)

    def surface(mask: np.ndarray) -> np.ndarray:
        return mask & ~ndimage.binary_erosion(mask, border_value=0)

    # distances only depend on the box around both masks (plus one voxel, so erosion sees the same border)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(pred | target))
    pred, target = pred[box], target[box]
    sp, st = surface(pred), surface(target)
    dist_to_target = ndimage.distance_transform_edt(~st, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(max(np.percentile(dist_to_target[sp], 95), np.percentile(dist_to_pred[st], 95)))


def region_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of one patient's predicted region against its label with BraTS's convention for an empty label: 1 when
    nothing is predicted either, else 0 (region_scores gives IoU and HD95 too)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not truth.any():
        return 0.0 if pred.any() else 1.0
    return dice_score(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None]).item()


def region_scores(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> dict:
    """Dice, IoU and HD95 (mm) of one patient's predicted region against its label, with the BraTS challenge's
    conventions for an empty region (an enhancing tumour may be absent): absent in both, Dice = IoU = 1 and HD95 0;
    absent from the label only, Dice = IoU = 0 and HD95 the volume's diagonal (373.13 mm), as when absent from the
    prediction only (hd95). Never NaN, so every patient counts in a mean."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    dice = region_dice(pred, truth)
    if not truth.any():
        return {"dice": dice, "iou": dice, "hd95_mm": diagonal_mm(pred.shape, spacing) if pred.any() else 0.0}
    iou = iou_score(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None]).item()
    return {"dice": dice, "iou": iou, "hd95_mm": hd95(pred, truth, spacing)}


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected components smaller than `min_size` pixels from each 2D slice of a (..., H, W) mask."""
    mask = np.asarray(mask, bool)
    if min_size <= 1:
        return mask
    out = np.zeros_like(mask)
    flat_in, flat_out = mask.reshape(-1, *mask.shape[-2:]), out.reshape(-1, *mask.shape[-2:])
    for i, m in enumerate(flat_in):
        if not m.any():
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= min_size
        keep[0] = False
        flat_out[i] = keep[labels]
    return out


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest 26-connected 3D component of a (S, H, W) mask (nothing changes when it is empty)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return np.asarray(mask, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def nanmean(values) -> float:
    """Mean that skips NaN; NaN when nothing is left."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan
