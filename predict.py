"""Segment the brain tumour in BraTS case folders with trained checkpoints; write NIfTI masks and montages.

    python predict.py --ckpt runs/latest/best.pt --out preds ../shared/data/brats-sample/Brats18_2013_11_1
    python predict.py --ckpt runs/f0/best.pt runs/f1/best.pt --tta on --out preds CASE_DIR [CASE_DIR ...]

Each CASE_DIR holds <case>_{flair,t1,t1ce,t2}.nii[.gz] (BraTS 2018-2020 naming). The checkpoint's own
preprocessing (size, crop, channels, context) and post-processing (threshold, minimum component size, and the
largest 3D component when the checkpoint asks for it) are applied, exactly as in train.py's evaluation. Several
checkpoints (e.g. the folds of a cross-validation) are an ensemble: their probabilities are averaged; --tta on
also averages the four flips of each slice. Per case:
OUT/<case>.nii.gz (the whole tumour, uint8 0/1, the FLAIR's shape, affine and header), with a --target regions
checkpoint also OUT/<case>_labels.nii.gz (a BraTS label map: 4 enhancing, 1 core without enhancing, 2 the rest of
the whole tumour; it opens over the scan in ITK-SNAP or 3D Slicer), and OUT/<case>.png (FLAIR slices with the
predicted outlines, and the label's when a <case>_seg file is present, in which case Dice, IoU and HD95 of the
whole tumour (and of each region, with BraTS's conventions for an empty region) are printed too, and the share of
each BraTS label (core, oedema, enhancing) the whole-tumour mask covers). A bad
case is one line on stderr and the others still run; exit 1 if any case failed, 2 for a bad checkpoint or bad
arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import figures
import inference
import metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("cases", nargs="+", type=Path, metavar="CASE_DIR", help="BraTS case folders")
    p.add_argument("--ckpt", type=Path, nargs="+", required=True,
                   help="checkpoint(s) written by train.py (RUN/best.pt); several are averaged as an ensemble")
    p.add_argument("--out", type=Path, required=True, help="output folder for <case>.nii.gz and <case>.png")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
    p.add_argument("--tta", default="off", choices=["on", "off"], help="also average over flipped slices (4x the work)")
    p.add_argument("--threshold", type=float, default=None,
                   help="override the checkpoint's probability threshold (of every region)")
    p.add_argument("--min-component", type=int, default=None,
                   help="override the checkpoint's minimum 2D component size (of every region)")
    p.add_argument("--largest-3d", default=None, choices=["on", "off"],
                   help="override the checkpoint's largest-3D rule (of every region)")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        raise data.UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise data.UserError(f"--threshold must be between 0 and 1 (a probability), got {args.threshold}")
    if args.min_component is not None and args.min_component < 0:
        raise data.UserError(f"--min-component must not be negative, got {args.min_component}")
    return args


def load_predictor(args: argparse.Namespace) -> inference.Predictor:
    """The checkpoint(s) with their post-processing, or what the command line overrides (in every region)."""
    predictor = inference.Predictor.from_checkpoints(args.ckpt, inference.resolve_device(args.device), args.batch_size,
                                                     tta=args.tta == "on")
    overrides = {k: v for k, v in (("threshold", args.threshold), ("min_component", args.min_component),
                                   ("largest_3d", None if args.largest_3d is None else args.largest_3d == "on"))
                 if v is not None}
    if predictor.unchosen:
        print(f"predict.py: note: {', '.join(predictor.unchosen)}: its run stopped before its test phase chose the "
              f"post-processing, so threshold 0.5 and no clean-up apply unless given (finish the run with --resume)",
              file=sys.stderr)
    return dataclasses.replace(predictor, post={r: {**p, **overrides} for r, p in predictor.post.items()})


def case_name(case_dir: Path) -> str:
    """The case's name: its folder's name (`Brats18_TCIA01_201_1`, `BraTS20_Training_001`)."""
    return Path(os.path.abspath(case_dir)).name


def write_nifti(mask_xyz: np.ndarray, case_dir: Path, affine: np.ndarray, path: Path) -> None:
    """Write a uint8 mask or label map in NIfTI order (x, y, z) with the FLAIR's affine and header, atomically."""
    import nibabel as nib

    src = nib.load(str(data.nifti_file(case_dir, "flair")))
    header = src.header.copy()
    header.set_data_dtype(np.uint8)
    img = type(src)(mask_xyz.astype(np.uint8), affine, header)
    img.header.set_slope_inter(1, 0)  # never rescale the labels
    img.set_data_dtype(np.uint8)
    with data.atomic_path(path) as tmp:  # keeps the .nii.gz suffix: nibabel picks compression by extension
        nib.save(img, str(tmp))


def predict_case(predictor: inference.Predictor, case_dir: Path, out: Path) -> list[str]:
    """Segment one case, write its mask and montage; return the lines to print."""
    name = case_name(case_dir)
    if not case_dir.is_dir():
        raise data.DataError(f"{case_dir}: not a folder")
    image, label, affine, spacing = data.read_nifti_case(case_dir, need_label=False)
    regions = predictor.regions
    pred_regions = predictor.segment(image)  # (z, R, x, y), nested
    pred = pred_regions[:, 0]  # the whole tumour
    voxel_ml = float(np.prod(spacing[:3])) / 1000.0
    nii, png = out / f"{name}.nii.gz", out / f"{name}.png"
    labels = out / f"{name}_labels.nii.gz" if len(regions) > 1 else None
    written = f"{nii}" + (f", {labels.name}" if labels else "")
    lines = [f"{name}: wrote {written} and {png.name}; tumour {pred.sum() * voxel_ml:.2f} mL ({int(pred.sum())} voxels)"]
    title = f"{name}: predicted tumour {pred.sum() * voxel_ml:.1f} mL"
    truth_regions = None
    if label is not None:
        truth_regions = data.region_masks(label, regions)
        truth = truth_regions[:, 0]
        p, t = torch.from_numpy(pred)[None], torch.from_numpy(truth)[None]
        dice, iou = metrics.dice_score(p, t).item(), metrics.iou_score(p, t).item()
        h = metrics.hd95(pred.transpose(1, 2, 0), truth.transpose(1, 2, 0), spacing=tuple(spacing[:3]))
        lines.append(f"{name}: whole tumour vs label ({truth.sum() * voxel_ml:.2f} mL): Dice {dice:.4f}  "
                     f"IoU {iou:.4f}  HD95 {h:.2f} mm")
        title += f", label {truth.sum() * voxel_ml:.1f} mL, Dice {dice:.3f}"
        if len(regions) > 1:
            scores = [(r, metrics.region_scores(pred_regions[:, i].transpose(1, 2, 0),
                                                truth_regions[:, i].transpose(1, 2, 0), tuple(spacing[:3])))
                      for i, r in enumerate(regions)]
            lines.append(f"{name}: per region: " + "; ".join(
                f"{r.upper()} Dice {m['dice']:.4f} IoU {m['iou']:.4f} HD95 {m['hd95_mm']:.2f} mm" for r, m in scores))
        found = [f"{k} {metrics.BRATS_LABELS[k]} " + (f"{100 * r:.1f}% of {n * voxel_ml:.2f} mL" if n else "absent")
                 for k, (r, n) in metrics.recall_per_label(pred, label).items()]
        lines.append(f"{name}: found per label: " + ", ".join(found))
    try:  # a case gets all its files or none: a montage that fails takes the case's masks with it
        write_nifti(pred.transpose(1, 2, 0), case_dir, affine, nii)
        if labels:
            write_nifti(data.labels_from_regions(pred_regions, regions).transpose(1, 2, 0), case_dir, affine, labels)
        figures.write_montage(image[..., data.FLAIR], pred_regions, truth_regions, png, title, regions)
    except BaseException:
        for path in (nii, labels, png):
            if path:
                path.unlink(missing_ok=True)
        raise
    return lines


def main(args: argparse.Namespace) -> int:
    """Predict every case; return the number of cases that failed (a bad checkpoint raises data.UserError)."""
    predictor = load_predictor(args)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise data.UserError(f"cannot create output folder {args.out}: {e.strerror or e}") from None
    failed, seen = 0, set()
    for case_dir in tqdm(args.cases, desc="predicting", unit="case", disable=None, dynamic_ncols=True):
        name = case_name(case_dir)
        try:
            if name in seen:
                raise data.DataError(f"{case_dir}: another case named {name} was already written to {args.out}")
            seen.add(name)
            for line in predict_case(predictor, case_dir, args.out):
                tqdm.write(line, file=sys.stdout)
        except Exception as e:  # noqa: BLE001 -- one case's failure, whatever it is, must not stop the others
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
    except data.UserError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
