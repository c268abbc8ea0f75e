"""How bright each tumour label is against its own brain: per patient, label and modality, the percentile of the
label's median intensity among the brain's voxels.

    python bench/contrast.py ../shared/data/brats-sample                       # table on stdout
    python bench/contrast.py ../shared/data/brats-sample --out runs/contrast.md

A rank, so no per-volume normalisation (the z-score of data.py or any other monotone one) can change it: a lesion
that sits at the 85th percentile of its brain's FLAIR is faint for every preprocessing, where a typical core or
oedema sits above the 95th. Read it beside the per-patient Dice of bench/cv.py: it tells a tumour missed for its
contrast from one missed for its shape or place. The brain is data.py's (voxels where any modality is above its
background); labels under 1 mL are left out (a median of a few voxels says little).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
import metrics  # noqa: E402

LABELS = tuple((f"{k} {name}", (k,)) for k, name in metrics.BRATS_LABELS.items()) + (("whole", tuple(metrics.BRATS_LABELS)),)
MIN_ML = 1.0


def label_percentiles(image: np.ndarray, label: np.ndarray, spacing: tuple[float, ...]) -> list[tuple[str, float, list[float] | None]]:
    """For each of LABELS: (name, volume mL, the percentile (0-100) of the label's median among the brain's voxels per
    modality in data.CHANNELS' order, or None under MIN_ML). image (S, H, W, C) raw, label (S, H, W) in {0, 1, 2, 4}."""
    normalised, brain = data.normalise_volume(image)
    in_brain = normalised[brain]  # (brain voxels, C), gathered once for every label
    rows = []
    for name, values in LABELS:
        inside = np.isin(label, values) & brain
        ml = float(inside.sum() * np.prod(spacing) / 1000)
        if ml < MIN_ML:
            rows.append((name, ml, None))
            continue
        medians = np.median(normalised[inside], axis=0)
        rows.append((name, ml, (100 * (in_brain < medians).mean(0)).tolist()))
    return rows


def table(root: Path) -> str:
    """The markdown table of every case folder under root."""
    cases = data.list_nifti(root)
    lines = ["| patient | label | mL | " + " | ".join(f"{m} pct" for m in data.CHANNELS) + " |",
             "|---|---|---:|" + "---:|" * len(data.CHANNELS)]
    for vid, case_dir in tqdm(cases.items(), desc="cases", unit="case", file=sys.stderr):
        image, label, _, spacing = data.read_nifti_case(case_dir)
        for name, ml, ranks in label_percentiles(image, label, spacing):
            cells = [f"{r:.1f}" for r in ranks] if ranks else ["–"] * len(data.CHANNELS)
            lines.append(f"| {vid} | {name} | {ml:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("root", type=Path, help="a folder of BraTS case folders (NIfTI, with their _seg files)")
    p.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = p.parse_args()
    try:
        text = table(args.root)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with data.atomic_path(args.out) as tmp:
                tmp.write_text(text)
    except (data.UserError, OSError) as e:
        print(f"bench/contrast.py: error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
