"""Segment the whole brain tumour in BraTS case folders with a trained checkpoint; write NIfTI masks and montages.

    python predict.py --ckpt runs/latest/best.pt --out preds ../shared/data/brats-sample/Brats18_2013_11_1
    python predict.py --ckpt runs/latest/best.pt --out preds --device cpu --batch-size 16 CASE_DIR [CASE_DIR ...]

Each CASE_DIR holds <case>_{flair,t1,t1ce,t2}.nii[.gz] (BraTS 2018-2020 naming). The checkpoint's own
preprocessing (size, channels) and post-processing (threshold, minimum component size, and the largest 3D
component when the checkpoint asks for it) are applied, exactly as in train.py's evaluation. Per case:
OUT/<case>.nii.gz (uint8 0/1, the FLAIR's shape, affine and header) and OUT/<case>.png (FLAIR slices with the
predicted outline, and the label's when a <case>_seg file is present, in which case Dice, IoU and HD95 of the
whole tumour are printed too). A bad case is one line on stderr and the others still run; exit 1 if any case
failed, 2 for a bad checkpoint or bad arguments.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import metrics
import train

MAX_MONTAGE_SLICES = 16
PRED_COLOUR, TRUE_COLOUR = "red", "lime"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("cases", nargs="+", type=Path, metavar="CASE_DIR", help="BraTS case folders")
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint written by train.py (RUN/best.pt)")
    p.add_argument("--out", type=Path, required=True, help="output folder for <case>.nii.gz and <case>.png")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        raise data.DataError(f"--batch-size must be positive, got {args.batch_size}")
    return args


@dataclass
class Predictor:
    """A loaded checkpoint and everything needed to run it the way train.py evaluated it."""

    model: torch.nn.Module
    ckpt: dict
    device: torch.device
    batch_size: int
    dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def load(cls, path: Path, device: torch.device, batch_size: int) -> "Predictor":
        """Load the checkpoint (a data.DataError when it is missing, damaged or lacks the keys predict needs)."""
        model, ckpt = train.load_checkpoint(path, device)
        missing = [k for k in ("channels", "size", "threshold", "min_component") if k not in ckpt]
        if missing:
            raise data.DataError(f"checkpoint {path} lacks {', '.join(missing)}: not a train.py best.pt?")
        channels_last = device.type == "cuda"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return cls(model, ckpt, device, batch_size, train.amp_dtype("auto", device), channels_last)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Image (S, 240, 240, 4) → boolean whole-tumour mask (S, 240, 240); slices without brain are empty."""
        keep, images = data.preprocess_volume(image, int(self.ckpt["size"]))
        mask = np.zeros(image.shape[:3], bool)
        if len(keep):
            x = torch.from_numpy(np.ascontiguousarray(images[:, list(self.ckpt["channels"])]))
            # the same float16 probabilities as train.py's evaluation, so the same masks
            probs = train.slice_probs(self.model, x, self.device, self.batch_size, self.dtype,
                                      self.channels_last).astype(np.float32)
            mask[keep] = train.postprocess(probs, float(self.ckpt["threshold"]), int(self.ckpt["min_component"]),
                                           bool(self.ckpt.get("largest_3d", False)))
        return mask


def case_name(case_dir: Path) -> str:
    """The case's name: its folder's name (`Brats18_TCIA01_201_1`, `BraTS20_Training_001`)."""
    return Path(os.path.abspath(case_dir)).name


def write_nifti(mask_xyz: np.ndarray, case_dir: Path, affine: np.ndarray, path: Path) -> None:
    """Write a 0/1 uint8 mask in NIfTI order (x, y, z) with the FLAIR's affine and header, atomically."""
    import nibabel as nib

    src = nib.load(str(data.nifti_file(case_dir, "flair")))
    header = src.header.copy()
    header.set_data_dtype(np.uint8)
    img = type(src)(mask_xyz.astype(np.uint8), affine, header)
    img.header.set_slope_inter(1, 0)  # never rescale the labels
    img.set_data_dtype(np.uint8)
    with data.atomic_path(path) as tmp:  # keeps the .nii.gz suffix: nibabel picks compression by extension
        nib.save(img, str(tmp))


def montage_slices(pred: np.ndarray, truth: np.ndarray | None) -> list[int]:
    """Up to MAX_MONTAGE_SLICES evenly spaced slices (z) that hold predicted or labelled tumour."""
    bearing = pred.any((1, 2)) | (truth.any((1, 2)) if truth is not None else False)
    z = np.flatnonzero(bearing)
    if len(z) > MAX_MONTAGE_SLICES:
        z = z[np.unique(np.linspace(0, len(z) - 1, MAX_MONTAGE_SLICES).round().astype(int))]
    return z.tolist()


def draw_outline(ax, mask: np.ndarray, colour: str) -> None:
    """Draw the outlines (outer and holes) of a 2D boolean mask, also where it touches the image border."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    for c in contours:
        pts = np.concatenate([c[:, 0], c[:1, 0]]).astype(np.float32)  # closed (x = column, y = row)
        ax.plot(pts[:, 0], pts[:, 1], color=colour, linewidth=0.9)


def write_montage(flair: np.ndarray, pred: np.ndarray, truth: np.ndarray | None, path: Path, title: str) -> None:
    """PNG of FLAIR slices (z, x, y) with the predicted outline (and the label's), shown as radiologists view
    BraTS (rows = y, columns = x); with no tumour anywhere, the middle slice."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    zs = montage_slices(pred, truth) or [flair.shape[0] // 2]
    brain = flair > flair.min()
    lo, hi = np.percentile(flair[brain], (1, 99)) if brain.any() else (0.0, 1.0)
    cols = min(4, len(zs))
    rows = math.ceil(len(zs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.9 * rows + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, z in zip(axes.flat, zs):
        ax.imshow(flair[z].T, cmap="gray", vmin=lo, vmax=hi + 1e-6, interpolation="nearest")
        for mask, colour in ((truth, TRUE_COLOUR), (pred, PRED_COLOUR)):
            if mask is not None:
                draw_outline(ax, mask[z].T, colour)
        ax.set_title(f"z={z}", fontsize=8)
    handles = [Line2D([], [], color=PRED_COLOUR, label="prediction")]
    if truth is not None:
        handles.append(Line2D([], [], color=TRUE_COLOUR, label="label (whole tumour)"))
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    train.save_figure(fig, path)


def predict_case(predictor: Predictor, case_dir: Path, out: Path) -> list[str]:
    """Segment one case, write its mask and montage; return the lines to print."""
    name = case_name(case_dir)
    if not case_dir.is_dir():
        raise data.DataError(f"{case_dir}: not a folder")
    image, label, affine, spacing = data.read_nifti_case(case_dir, need_label=False)
    pred = predictor(image)  # (z, x, y)
    voxel_ml = float(np.prod(spacing[:3])) / 1000.0
    nii, png = out / f"{name}.nii.gz", out / f"{name}.png"
    write_nifti(pred.transpose(1, 2, 0), case_dir, affine, nii)
    lines = [f"{name}: wrote {nii} and {png.name}; tumour {pred.sum() * voxel_ml:.2f} mL ({int(pred.sum())} voxels)"]
    title = f"{name}: predicted tumour {pred.sum() * voxel_ml:.1f} mL"
    truth = None
    if label is not None:
        truth = label > 0
        p, t = torch.from_numpy(pred)[None], torch.from_numpy(truth)[None]
        dice, iou = metrics.dice_score(p, t).item(), metrics.iou_score(p, t).item()
        h = metrics.hd95(pred.transpose(1, 2, 0), truth.transpose(1, 2, 0), spacing=tuple(spacing[:3]))
        lines.append(f"{name}: whole tumour vs label ({truth.sum() * voxel_ml:.2f} mL): Dice {dice:.4f}  "
                     f"IoU {iou:.4f}  HD95 {h:.2f} mm")
        title += f", label {truth.sum() * voxel_ml:.1f} mL, Dice {dice:.3f}"
    write_montage(image[..., data.FLAIR], pred, truth, png, title)
    return lines


def main(args: argparse.Namespace) -> int:
    """Predict every case; return the number of cases that failed (a bad checkpoint raises data.DataError)."""
    device = train.resolve_device(args.device)
    predictor = Predictor.load(args.ckpt, device, args.batch_size)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise data.DataError(f"cannot create output folder {args.out}: {e.strerror or e}") from None
    failed, seen = 0, set()
    for case_dir in tqdm(args.cases, desc="predicting", unit="case", disable=None, dynamic_ncols=True):
        name = case_name(case_dir)
        try:
            if name in seen:
                raise data.DataError(f"{case_dir}: another case named {name} was already written to {args.out}")
            seen.add(name)
            for line in predict_case(predictor, case_dir, args.out):
                tqdm.write(line, file=sys.stdout)
        except (data.DataError, OSError) as e:
            failed += 1
            msg = str(e) if isinstance(e, data.DataError) else f"{type(e).__name__}: {e}"
            msg = msg if name in msg else f"{case_dir}: {msg}"
            tqdm.write(f"predict.py: error: case {name} failed: {msg}", file=sys.stderr)
    if failed:
        tqdm.write(f"predict.py: {failed} of {len(args.cases)} cases failed", file=sys.stdout)
    return failed


def cli(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return 1 if main(args) else 0
    except SystemExit as e:  # argparse: usage errors (2) and --help (0)
        return e.code if isinstance(e.code, int) else 2
    except data.DataError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
