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


def load_bench(name: str):
    """bench/NAME.py as a module (its folder on the path, as when it runs as a script)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


KAGGLE_ORDER = ("flair", "t1", "t1ce", "t2")  # the channel order of the Kaggle .h5 files (README, "Channel order")


def read_case_with_nibabel(case_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A case read with nibabel alone, not data.py: image (z, x, y, 4) float32 in KAGGLE_ORDER, label (z, x, y)."""
    import nibabel as nib

    def load(modality: str) -> np.ndarray:
        return np.asarray(nib.load(str(case_dir / f"{case_dir.name}_{modality}.nii.gz")).dataobj).transpose(2, 0, 1)

    return np.stack([load(m) for m in KAGGLE_ORDER], -1).astype(np.float32), load("seg").astype(np.uint8)


@pytest.fixture(scope="session")
def real_h5(sample_dir, tmp_path_factory) -> Path:
    """Kaggle-layout .h5 files written from three real cases read with nibabel (every 4th slice of the middle 64)."""
    root = tmp_path_factory.mktemp("h5real")
    folder = root / "BraTS2020_training_data" / "content" / "data"
    for v, case in enumerate(SAMPLE_CASES, start=1):
        image, label = read_case_with_nibabel(sample_dir / case)
        write_h5_slices(folder, v, image, label, range(45, 109, 4))
    return root


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A tiny checkpoint (base 4, depth 2, 32 px) trained for one epoch on 3 synthetic phantoms (~7 s on a CPU)."""
    import train

    tmp = tmp_path_factory.mktemp("tiny")
    rc = train.cli(["--data", "synthetic:3x6", "--size", "32", "--epochs", "1", "--base", "4", "--depth", "2",
                    "--batch-size", "4", "--device", "cpu", "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "run")])
    assert rc == 0
    path = tmp / "run" / "best.pt"
    assert path.is_file()
    return path
