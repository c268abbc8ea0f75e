"""bench/contrast.py: the percentile of each label's median among its brain's voxels, on a hand-made case."""
import subprocess
import sys

import nibabel as nib
import numpy as np

from conftest import ROOT


def write_case(root, name: str = "Brats18_X_1_1") -> None:
    """A 240 x 240 x 2 case whose brain is a 100 x 100 block of slice 0: FLAIR 1..10000 in raster order, T2 the
    reverse, T1 and T1Gd constant; label 1 on FLAIR 9001..10000, 2 on 5001..7000, 4 on 1..20 (under 1 mL)."""
    case = root / name
    case.mkdir(parents=True)
    flair = np.zeros((240, 240, 2), np.int16)
    flair[:100, :100, 0] = np.arange(1, 10001).reshape(100, 100)
    brain = flair > 0
    seg = np.zeros_like(flair, dtype=np.uint8)
    seg[(flair >= 9001)] = 1
    seg[(flair >= 5001) & (flair <= 7000)] = 2
    seg[brain & (flair <= 20)] = 4
    volumes = {"flair": flair, "t1": np.where(brain, 500, 0), "t1ce": np.where(brain, 700, 0),
               "t2": np.where(brain, 10001 - flair, 0), "seg": seg}
    for modality, array in volumes.items():
        nib.save(nib.Nifti1Image(array.astype(np.int16 if modality != "seg" else np.uint8), np.eye(4)),
                 str(case / f"{name}_{modality}.nii"))


def test_contrast_ranks_each_label_median_in_its_brain(tmp_path):
    write_case(tmp_path / "cases")
    out = tmp_path / "runs" / "contrast.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "contrast.py"), str(tmp_path / "cases"), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[1]: line.strip("| \n").split(" | ")[2:] for line in out.read_text().splitlines()[2:]}
    # columns: mL, then flair, t1, t1ce, t2 (data.CHANNELS); below the median: 9500 of 10000 brain voxels for the core
    assert rows["1 core"] == ["1.0", "95.0", "0.0", "0.0", "5.0"]
    assert rows["2 oedema"] == ["2.0", "60.0", "0.0", "0.0", "40.0"]
    assert rows["4 enhancing"] == ["0.0", "–", "–", "–", "–"]
    assert rows["whole"] == ["3.0", "64.9", "0.0", "0.0", "35.1"]  # FLAIR median (6490 + 6491) / 2: 6490 below
    assert done.stdout == out.read_text()


def test_contrast_names_a_missing_folder_in_one_line(tmp_path):
    out = tmp_path / "contrast.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "contrast.py"), str(tmp_path / "nowhere"), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().count("\n") == 0 and "data folder not found" in done.stderr
