"""Pictures of a run and of a prediction: training curves, colour-coded overlays of prediction on the scan (true
positives green, false positives red, false negatives blue; with --target regions, label and prediction side by side
in BraTS's label colours), the most wrong slices (per region), and predict.py's outline montages.

Slices are (x, y) arrays, shown as radiologists view BraTS: rows = y, columns = x (hence the transposes).
Every file is written through a temporary name (data.atomic_path).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import data

TP_COLOUR, FP_COLOUR, FN_COLOUR = (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.4, 1.0)
OVERLAY_ALPHA = 0.55  # weight of the colour over the grey scan
PRED_OUTLINE, TRUE_OUTLINE = "red", "lime"
LABEL_COLOURS = {2: (0.1, 0.8, 0.1), 1: (0.9, 0.1, 0.1), 4: (1.0, 0.85, 0.0)}  # oedema, core, enhancing
LABEL_NAMES = {2: "oedema (WT, not TC)", 1: "necrotic / non-enhancing core (TC, not ET)", 4: "enhancing tumour (ET)"}
REGION_OUTLINES = {"wt": "lime", "tc": "red", "et": "yellow"}
MAX_MONTAGE_SLICES = 16


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip("."))
    pyplot().close(fig)


def plot_curves(log: list[dict], path: Path, kept_epoch: int) -> None:
    """Loss, Dice and IoU per epoch, train and validation, the learning rate, and the epoch of the model kept and
    tested (dashed): the best validation epoch, or the last with --select last."""
    import matplotlib.ticker

    plt = pyplot()
    epochs = [r["epoch"] for r in log]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("loss", "dice", "iou"), ("Dice + BCE loss", "Dice", "IoU")):
        ax.plot(epochs, [r[f"train_{key}"] for r in log], "o-", label="train (pooled over batches, augmented)")
        ax.plot(epochs, [r[f"val_{key}"] for r in log], "s-",
                label="validation (per volume, threshold 0.5)" if key != "loss" else "validation (unweighted)")
        ax.set_title(title), ax.set_xlabel("epoch"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].axvline(kept_epoch, color="gray", ls="--", lw=1)
    lr_ax = axes[0].twinx()
    lr_ax.plot(epochs, [r["lr"] for r in log], color="gray", alpha=0.5, lw=1)
    lr_ax.set_ylabel("learning rate", color="gray")
    fig.tight_layout()
    save_figure(fig, path)


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1] of a slice: grey scan (background black), true positives green, false positives
    red, false negatives blue, each blended as (1 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * colour."""
    brain = image != 0
    lo, hi = np.percentile(image[brain], (1, 99)) if brain.any() else (0.0, 1.0)
    grey = np.where(brain, np.clip((image - lo) / (hi - lo + 1e-6), 0, 1), 0)
    rgb = np.stack([grey, grey, grey], -1)
    for mask, colour in ((pred & truth, TP_COLOUR), (pred & ~truth, FP_COLOUR), (~pred & truth, FN_COLOUR)):
        rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * np.array(colour)
    return rgb


def label_overlay(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1] of a slice: grey scan with each BraTS label blended in its LABEL_COLOURS."""
    rgb = overlay(image, np.zeros(label.shape, bool), np.zeros(label.shape, bool))
    for k, colour in LABEL_COLOURS.items():
        hit = label == k
        rgb[hit] = (1 - OVERLAY_ALPHA) * rgb[hit] + OVERLAY_ALPHA * np.array(colour)
    return rgb


def plot_label_pairs(items: list[dict], path: Path, title: str) -> None:
    """A grid of (label, prediction) pairs in LABEL_COLOURS; each item has image, truth_label, pred_label (240 x
    240), volume, slice and the Dice of each region (dice_wt, ...)."""
    from matplotlib.patches import Patch

    plt = pyplot()
    pairs = min(2, max(1, len(items)))
    rows = max(1, math.ceil(len(items) / pairs))
    fig, axes = plt.subplots(rows, 2 * pairs, figsize=(3.0 * 2 * pairs, 3.4 * rows + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, it in enumerate(items):
        left, right = axes[i // pairs, 2 * (i % pairs)], axes[i // pairs, 2 * (i % pairs) + 1]
        left.imshow(label_overlay(it["image"].T, it["truth_label"].T))
        right.imshow(label_overlay(it["image"].T, it["pred_label"].T))
        left.set_title(f"{it['volume']} z={it['slice']}\nlabel", fontsize=8)
        scores = "  ".join(f"{r.upper()} {it[f'dice_{r}']:.2f}" for r in ("wt", "tc", "et")
                           if f"dice_{r}" in it and not math.isnan(it[f"dice_{r}"]))
        right.set_title(f"prediction\nDice {scores}" if scores else "prediction", fontsize=8)
    fig.legend(handles=[Patch(color=c, label=LABEL_NAMES[k]) for k, c in LABEL_COLOURS.items()], loc="lower center",
               ncol=3, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path)


def plot_slices(items: list[dict], path: Path, title: str) -> None:
    """A grid of overlays; each item has image, pred, truth (240 x 240), volume, slice, dice and wrong (pixels)."""
    from matplotlib.patches import Patch

    plt = pyplot()
    cols = min(4, max(1, len(items)))
    rows = max(1, math.ceil(len(items) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.8 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, it in zip(axes.flat, items):
        ax.imshow(overlay(it["image"].T, it["pred"].T, it["truth"].T))
        score = f"Dice {it['dice']:.3f}" if not math.isnan(it["dice"]) else "none in the label"
        ax.set_title(f"{it['volume']} z={it['slice']}\n{score}, {it['wrong']} px wrong", fontsize=8)
    fig.legend(handles=[Patch(color=TP_COLOUR, label="true positive"), Patch(color=FP_COLOUR, label="false positive"),
                        Patch(color=FN_COLOUR, label="false negative")], loc="lower center", ncol=3, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, path)


def pick_overview(records: list[dict], n: int = 8) -> list[dict]:
    """Slices for the overview: the largest tumour slice of each volume first, then evenly spaced tumour slices.
    records: per-slice rows (volume, slice, dice, area: tumour pixels), NaN Dice where there is no tumour."""
    tumour = [r for r in records if not math.isnan(r["dice"])]
    largest: dict[str, dict] = {}
    for r in tumour:
        if r["volume"] not in largest or r["area"] > largest[r["volume"]]["area"]:
            largest[r["volume"]] = r
    picks = list(largest.values())[:n]
    rest = [r for r in tumour if r not in picks]
    if len(picks) < n and rest:
        picks += rest[:: max(1, len(rest) // (n - len(picks)))][: n - len(picks)]
    return picks


def pick_worst(records: list[dict], n: int = 8, region: str = "wt", per_volume: int = 2) -> list[dict]:
    """The n slices where `region` is most wrong (false positives + false negatives, in pixels at 240 x 240), at
    most per_volume from one patient, so the gallery shows the worst patients' worst slices rather than near copies
    of one slice or the few-pixel edges of tumours the model found. Slices without a wrong pixel are never picked."""
    picks, taken = [], {}
    for r in sorted(records, key=lambda r: -r[f"wrong_{region}"]):
        if len(picks) == n or r[f"wrong_{region}"] == 0:
            break
        if taken.get(r["volume"], 0) < per_volume:
            picks.append(r)
            taken[r["volume"]] = taken.get(r["volume"], 0) + 1
    return picks


def montage_slices(pred: np.ndarray, truth: np.ndarray | None) -> list[int]:
    """Up to MAX_MONTAGE_SLICES evenly spaced slices (z) that hold predicted or labelled tumour."""
    bearing = pred.any((1, 2)) | (truth.any((1, 2)) if truth is not None else False)
    z = np.flatnonzero(bearing)
    if len(z) > MAX_MONTAGE_SLICES:
        z = z[np.unique(np.linspace(0, len(z) - 1, MAX_MONTAGE_SLICES).round().astype(int))]
    return z.tolist()


def draw_outline(ax, mask: np.ndarray, colour: str, style: str = "-") -> None:
    """Draw the outlines (outer and holes) of a 2D boolean mask (rows, columns), also where it touches the border."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    for c in contours:
        pts = np.concatenate([c[:, 0], c[:1, 0]]).astype(np.float32)  # closed (x = column, y = row)
        ax.plot(pts[:, 0], pts[:, 1], color=colour, linewidth=0.9, linestyle=style)


def write_montage(flair: np.ndarray, pred: np.ndarray, truth: np.ndarray | None, path: Path, title: str,
                  regions: list[str] = ("wt",)) -> None:
    """PNG of FLAIR slices (z, x, y) with the outlines of the predicted regions (S, R, x, y) and, when given, the
    label's: the whole tumour alone in red (label lime); several regions each in its REGION_OUTLINES colour,
    prediction solid and label dashed. With no tumour anywhere, the middle slice."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    zs = montage_slices(pred[:, 0], truth[:, 0] if truth is not None else None) or [flair.shape[0] // 2]
    brain = flair > flair.min()
    lo, hi = np.percentile(flair[brain], (1, 99)) if brain.any() else (0.0, 1.0)
    cols = min(4, len(zs))
    rows = math.ceil(len(zs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.9 * rows + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    several = len(regions) > 1
    for ax, z in zip(axes.flat, zs):
        ax.imshow(flair[z].T, cmap="gray", vmin=lo, vmax=hi + 1e-6, interpolation="nearest")
        for i, region in enumerate(regions):
            if truth is not None:
                draw_outline(ax, truth[z, i].T, REGION_OUTLINES[region] if several else TRUE_OUTLINE, "--" if several else "-")
            draw_outline(ax, pred[z, i].T, REGION_OUTLINES[region] if several else PRED_OUTLINE)
        ax.set_title(f"z={z}", fontsize=8)
    if several:
        handles = [Line2D([], [], color=REGION_OUTLINES[r], label=r.upper()) for r in regions]
        handles += [Line2D([], [], color="gray", label="prediction")]
        if truth is not None:
            handles.append(Line2D([], [], color="gray", linestyle="--", label="label"))
    else:
        handles = [Line2D([], [], color=PRED_OUTLINE, label="prediction")]
        if truth is not None:
            handles.append(Line2D([], [], color=TRUE_OUTLINE, label="label (whole tumour)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, path)


def figure_items(picks: list[dict], cache: data.Cache, masks: dict[str, np.ndarray], regions: list[str] = ("wt",),
                 region: str = "wt") -> list[dict]:
    """FLAIR, prediction and truth at 240 x 240 of chosen slices, for plot_slices (of `region`) and plot_label_pairs
    (the label maps)."""
    items, i = [], list(regions).index(region)
    for r in picks:
        meta = cache.volume(r["volume"])
        k = meta["slices"].index(r["slice"])
        flair = torch.from_numpy(cache.images(r["volume"], mmap=True)[k:k + 1, data.FLAIR].astype(np.float32))
        label = cache.full_labels(r["volume"])[k]
        items.append({**r, "image": data.uncrop(flair, meta["box"])[0].numpy(), "pred": masks[r["volume"]][k, i],
                      "truth": data.region_masks(label[None], [region])[0, 0], "truth_label": label,
                      "pred_label": data.labels_from_regions(masks[r["volume"]][k:k + 1], regions)[0],
                      "dice": r[f"dice_{region}"], "wrong": r[f"wrong_{region}"]})
    return items


def run_figures(out: Path, cache: data.Cache, log: list[dict], records: list[dict], masks: dict[str, np.ndarray],
                kept_epoch: int, regions: list[str] = ("wt",)) -> None:
    """A run's pictures in `out`: curves.png, overlays.png (an overview of the test slices), failures.png (the
    most wrong whole-tumour slices, pick_worst) and, with several regions, failures_<region>.png for the others,
    from train.py's log and its test evaluation (per-slice records and post-processed masks (S, R, 240, 240))."""
    plot_curves(log, out / "curves.png", kept_epoch)
    if not records:  # --train-on all: no test patient to picture
        return
    if len(regions) > 1:
        plot_label_pairs(figure_items(pick_overview(records), cache, masks, regions), out / "overlays.png",
                         "Test patients: label (left) and prediction (right)")
    else:
        plot_slices(figure_items(pick_overview(records), cache, masks, regions), out / "overlays.png",
                    "Test patients: ground truth vs prediction (green TP, red FP, blue FN)")
    for region in regions:
        name = "failures.png" if region == regions[0] else f"failures_{region}.png"
        plot_slices(figure_items(pick_worst(records, region=region), cache, masks, regions, region), out / name,
                    f"Most wrong test slices, {region.upper()}: at most 2 a patient (green TP, red FP, blue FN)")
