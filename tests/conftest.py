import os
import sys

# Triton kernels run on the CPU in the interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Make the flat top-level modules (fused_dice.py, ...) importable however pytest is invoked.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "brats-sample"
# three real cases, small to large tumours, used wherever a test needs real anatomy
SAMPLE_CASES = ("Brats18_CBICA_ABM_1", "Brats18_2013_3_1", "Brats18_TCIA02_135_1")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not SAMPLE.is_dir():
        pytest.skip(f"real BraTS sample not found at {SAMPLE}")
    return SAMPLE


@pytest.fixture(scope="session")
def sample_subset(sample_dir, tmp_path_factory) -> Path:
    """A folder of links to three real cases, so NIfTI tests read less."""
    root = tmp_path_factory.mktemp("nifti3")
    for c in SAMPLE_CASES:
        (root / c).symlink_to(sample_dir / c)
    return root


def write_h5_slices(folder: Path, volume: int, image: np.ndarray, label: np.ndarray, slices) -> None:
    """Write slices of one volume in the Kaggle layout: image (240, 240, 4), mask (240, 240, 3) one-hot of 1, 2, 4."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    for s in slices:
        with h5py.File(folder / f"volume_{volume}_slice_{s}.h5", "w") as f:
            f.create_dataset("image", data=image[s])
            f.create_dataset("mask", data=np.stack([label[s] == 1, label[s] == 2, label[s] == 4], -1).astype(np.uint8))


@pytest.fixture(scope="session")
def real_h5(sample_dir, tmp_path_factory) -> Path:
    """Kaggle-layout .h5 files written from three real NIfTI cases (every 4th slice of the middle 64)."""
    import data

    root = tmp_path_factory.mktemp("h5real")
    folder = root / "BraTS2020_training_data" / "content" / "data"
    for v, case in enumerate(SAMPLE_CASES, start=1):
        image, label, _, _ = data.read_nifti_case(sample_dir / case)
        write_h5_slices(folder, v, image, label, range(45, 109, 4))
    return root
