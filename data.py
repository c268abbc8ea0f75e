"""BraTS slices: read (Kaggle .h5, official NIfTI, synthetic phantoms), preprocess, cache, split by patient.

One canonical channel order everywhere: CHANNELS = (FLAIR, T1, T1Gd, T2), the order of the Kaggle .h5 files
(see README, "Channel order"). Every source becomes volumes of slices taken along the last NIfTI axis (z),
is normalised per volume and per modality, resized with OpenCV, and cached on disk once as compact arrays:
float16 images (S, C, size, size), uint8 label maps (S, size, size) and the uint8 label map at the original
240 x 240 resolution, which every test metric is measured against. The labels are BraTS's (0, 1 necrotic/non-enhancing
core, 2 oedema, 4 enhancing tumour); a model learns regions of them (REGIONS): the whole tumour alone, or BraTS's
three nested regions.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

CHANNELS = ("flair", "t1", "t1ce", "t2")  # T2-FLAIR, T1, T1Gd (contrast-enhanced), T2
FLAIR = CHANNELS.index("flair")
RAW_SIZE = 240  # BraTS in-plane size, both layouts
CACHE_VERSION = 3  # 2: slices cropped to the brain's box before resizing (meta "box"); 3: label maps, not 0/1 masks
SYNTHETIC_VERSION = 1  # the phantoms' own format, independent of the cache's
CROP_MARGIN = 4  # voxels of background kept around the brain's box
KAGGLE_DATASET = "awsaf49/brats2020-training-data"
H5_NAME = re.compile(r"volume_(\d+)_slice_(\d+)\.h5$")
DEFAULT_SYNTHETIC = (12, 40)  # volumes x slices of `--data synthetic`
REGIONS = {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)}  # whole tumour, tumour core, enhancing tumour: their labels
TARGETS = {"wt": ("wt",), "regions": ("wt", "tc", "et")}  # train.py --target: the regions a model learns
INNERMOST_LABEL = {"wt": 2, "tc": 1, "et": 4}  # the label of a voxel whose innermost region is this one


class UserError(Exception):
    """A problem the user must act on (a bad flag, input file or checkpoint, a full disk): its message is the one
    line they see, on stderr, with a non-zero exit and no traceback."""


class DataError(UserError):
    """Bad or missing input data."""


def default_cache_dir() -> Path:
    """The user's cache directory: $BRATS_CACHE, else $XDG_CACHE_HOME/brats-unet, else ~/.cache/brats-unet."""
    if os.environ.get("BRATS_CACHE"):
        return Path(os.environ["BRATS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "brats-unet"


# ----------------------------------------------------------------------------------------------------------
# Readers: each yields (volume id, image (S, 240, 240, 4) float32, label (S, 240, 240) uint8 in {0,1,2,4}).


def h5_folder(root: Path) -> Path:
    """The folder that holds the volume_<V>_slice_<S>.h5 files: ROOT itself or ROOT/BraTS2020_training_data/content/data."""
    nested = root / "BraTS2020_training_data" / "content" / "data"
    return nested if nested.is_dir() else root


def list_h5(root: Path) -> dict[str, list[Path]]:
    """Group the .h5 slices of a Kaggle-layout folder by volume, slices in order."""
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    folder = h5_folder(root)
    volumes: dict[str, list[tuple[int, Path]]] = {}
    for entry in os.scandir(folder):
        m = H5_NAME.match(entry.name)
        if m:
            volumes.setdefault(m.group(1), []).append((int(m.group(2)), Path(entry.path)))
    if not volumes:
        raise DataError(f"no volume_<V>_slice_<S>.h5 files in {folder}")
    return {v: [p for _, p in sorted(files)] for v, files in sorted(volumes.items(), key=lambda kv: int(kv[0]))}


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ('' when it has none), for one-line errors on stderr."""
    return (str(e).splitlines() or [""])[0]


def read_h5_volume(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Read one volume's slices; the one-hot `mask` (labels 1, 2, 4) becomes a label map. Each slice is read
    straight into the volume's array (the Kaggle files may store float64: h5py converts while reading)."""
    import h5py

    image = np.empty((len(files), RAW_SIZE, RAW_SIZE, len(CHANNELS)), np.float32)
    label = np.empty((len(files), RAW_SIZE, RAW_SIZE), np.uint8)
    onehot = np.empty((RAW_SIZE, RAW_SIZE, 3), np.uint8)  # one slice's mask, reused
    for i, path in enumerate(files):
        try:
            with h5py.File(path, "r") as f:
                shapes = f["image"].shape, f["mask"].shape
                if shapes == (image.shape[1:], onehot.shape):
                    f["image"].read_direct(image[i])
                    f["mask"].read_direct(onehot)
        except Exception as e:  # h5py raises OSError, KeyError, ... for damaged files
            raise DataError(f"cannot read {path}: {type(e).__name__}: {first_line(e)}") from None
        if shapes[0] != image.shape[1:]:
            raise DataError(f"{path}: image has shape {shapes[0]}, expected {image.shape[1:]}")
        if shapes[1] != onehot.shape:
            raise DataError(f"{path}: mask has shape {shapes[1]}, expected {onehot.shape}")
        label[i] = onehot_labels(onehot, path)
    return image, label


def onehot_labels(mask: np.ndarray, path: Path) -> np.ndarray:
    """The label map (H, W) uint8 of a uint8 one-hot mask (H, W, 3) of labels 1, 2, 4 (h5py converts the file's
    dtype into it); a DataError naming `path` if the mask holds other values or more than one label per voxel."""
    label = mask[..., 0] | (mask[..., 1] << 1) | (mask[..., 2] << 2)
    valid = mask.max(initial=0) <= 1 and not (label & (label - 1)).any()  # 0/1 entries, sum 0, 1, 2 or 4
    if not valid:
        raise DataError(f"{path}: mask is not a one-hot of labels 1, 2, 4 (values {np.unique(mask)[:8].tolist()})")
    return label


def nifti_file(case_dir: Path, name: str) -> Path | None:
    """`<case>_<name>.nii[.gz]` in a case folder (BraTS 2018-2020 naming), or None."""
    for suffix in (".nii.gz", ".nii"):
        hits = sorted(case_dir.glob(f"*_{name}{suffix}"))
        if hits:
            return hits[0]
    return None


def list_nifti(root: Path) -> dict[str, Path]:
    """Case folders under ROOT that hold a FLAIR file, by case name."""
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    cases = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and nifti_file(d, "flair")}
    if not cases:
        raise DataError(f"no BraTS case folders (<case>/<case>_flair.nii[.gz]) in {root}")
    return cases


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(data, affine, voxel spacing) of one NIfTI file; a damaged file is a DataError naming it."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {first_line(e)}") from None
    return data, img.affine, tuple(float(z) for z in img.header.get_zooms()[:3])


def read_nifti_case(case_dir: Path, need_label: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, tuple[float, ...]]:
    """One case folder → image (S, H, W, 4) float32 with slices along z, label (S, H, W) or None, affine, spacing."""
    files = {m: nifti_file(case_dir, m) for m in CHANNELS}
    missing = [m for m, p in files.items() if p is None]
    if missing:
        raise DataError(f"{case_dir}: missing modality {', '.join(missing)} (expected <case>_{missing[0]}.nii[.gz])")
    image, affine, spacing, shape = None, None, None, None
    for c, m in enumerate(CHANNELS):
        data, aff, sp = load_nifti(files[m])
        if data.ndim != 3 or (shape is not None and data.shape != shape):
            raise DataError(f"{files[m]}: shape {data.shape}, expected a 3D volume {shape or '(240, 240, 155)'}")
        if image is None:
            shape, affine, spacing = data.shape, aff, sp
            image = np.empty((shape[2], shape[0], shape[1], len(CHANNELS)), np.float32)
        image[..., c] = data.transpose(2, 0, 1)  # (x, y, z) -> (z, x, y), cast to float32; one contiguous volume
        del data
    if shape[:2] != (RAW_SIZE, RAW_SIZE):
        raise DataError(f"{files['flair']}: in-plane shape {shape[:2]}, expected ({RAW_SIZE}, {RAW_SIZE})")
    label = None
    seg = nifti_file(case_dir, "seg")
    if seg is None and need_label:
        raise DataError(f"{case_dir}: missing label file <case>_seg.nii[.gz]")
    if seg is not None:
        data, _, _ = load_nifti(seg)
        if data.shape != shape:
            raise DataError(f"{seg}: shape {data.shape}, expected {shape} like the images")
        if not labels_are_brats(data):
            bad = sorted(set(np.unique(data).tolist()) - {0, 1, 2, 4})
            raise DataError(f"{seg}: labels {bad[:5]} outside {{0, 1, 2, 4}}")
        label = data.astype(np.uint8).transpose(2, 0, 1)
    return image, label, affine, spacing


def labels_are_brats(seg: np.ndarray) -> bool:
    """Are all labels in {0, 1, 2, 4}? For integers, a range and a "no 3" test: 5x faster than np.isin."""
    if seg.dtype.kind in "iub" and seg.min(initial=0) >= 0 and seg.max(initial=0) <= 4:
        return not (seg == 3).any()
    return bool(np.isin(seg, (0, 1, 2, 4)).all())


# ----------------------------------------------------------------------------------------------------------
# Synthetic phantoms, written in the Kaggle .h5 layout so that the offline path runs the real reader.


def synthetic_volume(rng: np.random.Generator, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like phantom: an ellipsoid head with cortex, white matter and ventricles, and a nested
    tumour (necrotic core 1 ⊂ enhancing rim 4 ⊂ oedema 2) of random size and place; four contrasts that differ."""
    n = RAW_SIZE
    z, y, x = np.meshgrid(np.linspace(-1, 1, n_slices), np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    a, b, c = rng.uniform(0.62, 0.78), rng.uniform(0.75, 0.88), rng.uniform(0.85, 1.0)
    r_brain = (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2
    brain = r_brain < 1
    wm = r_brain < 0.55
    vent = ((np.abs(x) - 0.12) / 0.08) ** 2 + (y / 0.3) ** 2 + (z / 0.35) ** 2 < 1
    # tumour: an ellipsoid inside the brain, radius from tiny to large
    centre = rng.uniform(-0.45, 0.45, 3) * np.array([a, b, c * 0.6])
    radius = rng.uniform(0.08, 0.4) * rng.uniform(0.8, 1.2, 3)
    r_tumour = sum(((g - m) / s) ** 2 for g, m, s in zip((x, y, z), centre, radius))
    warp = 0.15 * np.sin(7 * x + rng.uniform(0, 6)) * np.sin(5 * y + rng.uniform(0, 6))
    r_tumour = r_tumour + warp
    oedema = brain & (r_tumour < 1.0)
    enhancing = brain & (r_tumour < 0.35)
    necrotic = brain & (r_tumour < 0.15)
    label = np.zeros(brain.shape, np.uint8)
    label[oedema], label[enhancing], label[necrotic] = 2, 4, 1
    # tissue intensities per contrast: (background, cortex, white matter, CSF, oedema, enhancing, necrosis)
    table = {
        "flair": (0, 0.55, 0.45, 0.1, 1.0, 0.8, 0.6),
        "t1": (0, 0.55, 0.75, 0.15, 0.45, 0.5, 0.25),
        "t1ce": (0, 0.55, 0.72, 0.15, 0.45, 1.0, 0.2),
        "t2": (0, 0.6, 0.45, 1.0, 0.85, 0.7, 0.95),
    }
    tissue = np.zeros(brain.shape, np.uint8)
    tissue[brain], tissue[wm], tissue[vent & brain] = 1, 2, 3
    tissue[label == 2], tissue[label == 4], tissue[label == 1] = 4, 5, 6
    bias = 1 + 0.15 * x * rng.uniform(-1, 1) + 0.15 * y * rng.uniform(-1, 1)
    image = np.empty((n_slices, n, n, len(CHANNELS)), np.float32)
    for i, m in enumerate(CHANNELS):
        contrast = np.asarray(table[m], np.float32)[tissue] * bias
        contrast += rng.normal(0, 0.04, contrast.shape).astype(np.float32)
        image[..., i] = np.where(brain, np.clip(contrast, 0.01, None) * rng.uniform(300, 1200), 0)
    return image, label


def write_synthetic(folder: Path, n_volumes: int, n_slices: int, seed: int = 0) -> Path:
    """Write phantoms as Kaggle-layout .h5 slices (image (240, 240, 4) float32, mask (240, 240, 3) one-hot) once."""
    import h5py

    data = folder / "BraTS2020_training_data" / "content" / "data"
    done = folder / "complete"
    if done.exists():
        return folder
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for v in tqdm(range(1, n_volumes + 1), desc="writing synthetic phantoms", unit="vol", disable=None):
        image, label = synthetic_volume(rng, n_slices)
        onehot = np.stack([label == 1, label == 2, label == 4], -1).astype(np.uint8)
        for s in range(n_slices):
            with atomic_path(data / f"volume_{v}_slice_{s}.h5") as tmp, h5py.File(tmp, "w") as f:
                f.create_dataset("image", data=image[s], compression="lzf")
                f.create_dataset("mask", data=onehot[s], compression="lzf")
    done.write_text(f"{n_volumes}x{n_slices} seed {seed}\n")
    return folder


def kaggle_download() -> Path:
    """Download the Kaggle .h5 slices with kagglehub (or reuse its local copy); fail fast, in one line, offline."""
    cached = Path(os.environ.get("KAGGLEHUB_CACHE", Path.home() / ".cache" / "kagglehub")) / "datasets" / KAGGLE_DATASET / "versions"
    versions = sorted((p for p in cached.glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
    if versions and any(versions[-1].iterdir()):
        return versions[-1]
    if not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        try:  # kagglehub retries for minutes without a network: ask the network first
            socket.create_connection(("www.kaggle.com", 443), timeout=5).close()
        except OSError as e:
            raise DataError(f"cannot reach Kaggle to download {KAGGLE_DATASET} ({e.__class__.__name__}: {e}); "
                            "offline, use --data nifti:DIR (official BraTS folders) or --data synthetic") from None
    try:
        import kagglehub

        return Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as e:
        raise DataError(f"kagglehub could not download {KAGGLE_DATASET} ({type(e).__name__}: {first_line(e)}); check Kaggle "
                        "credentials (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY), or use --data nifti:DIR "
                        "or --data synthetic") from None


# ----------------------------------------------------------------------------------------------------------
# Preprocessing


def normalise_volume(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score each modality over the brain voxels of its volume, after clipping to the 0.5-99.5th percentile.

    Each slice's background value (its minimum, per modality) is first moved to 0: raw BraTS already has a 0
    background, while the Kaggle .h5 slices were z-scored one slice at a time, background included, which
    leaves a negative constant background that differs per slice. Brain = voxels where any modality is above
    its background. Statistics are per volume, not per slice, so intensities stay comparable within a
    patient; percentiles tame rare scanner outliers (one sample case peaks at 32767 against ~600 elsewhere).
    Returns the normalised image (S, H, W, C) float32, 0 outside the brain, and the brain (S, H, W).
    The work is done channel-first: numpy's reductions over a trailing axis of 4 are ~10x slower.
    """
    x = np.ascontiguousarray(np.moveaxis(np.asarray(image, np.float32), -1, 0))  # (C, S, H, W)
    per_slice = x.reshape(x.shape[0], x.shape[1], -1)
    background = per_slice.min(-1, keepdims=True)  # min and max propagate NaN
    if not (np.isfinite(background).all() and np.isfinite(per_slice.max(-1)).all()):
        raise DataError("image has NaN or infinite voxels")
    per_slice -= background
    brain = (x > 0).any(0)
    if not brain.any():
        raise DataError("image has no brain: every voxel is at its slice's background value")
    values = x[:, brain]  # (C, brain voxels)
    for v in values:
        lo, hi = np.percentile(v, (0.5, 99.5))
        np.clip(v, lo, hi, out=v)
        v -= v.mean()
        v /= max(float(v.std()), 1e-6)
    x[:] = 0
    x[:, brain] = values
    return np.moveaxis(x, 0, -1), brain


def resize_slices(x: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """Resize (S, H, W[, C]) slices to size x size: area averaging for images, nearest for masks."""
    if x.shape[1:3] == (size, size):
        return x.copy()
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return np.stack([cv2.resize(s, (size, size), interpolation=interp) for s in x]) if len(x) else \
        np.zeros((0, size, size, *x.shape[3:]), x.dtype)


def brain_box(brain: np.ndarray, margin: int = CROP_MARGIN) -> tuple[int, int, int]:
    """The square in-plane box (x0, y0, side) around the brain of a volume's (S, H, W) mask, plus a margin,
    inside the frame. One box per volume, so every slice of a patient keeps the same scale."""
    frame = brain.shape[1]
    if not brain.any():
        return 0, 0, frame
    xs, ys = np.flatnonzero(brain.any((0, 2))), np.flatnonzero(brain.any((0, 1)))
    side = int(min(frame, max(xs[-1] - xs[0], ys[-1] - ys[0]) + 1 + 2 * margin))
    x0 = int(np.clip((xs[0] + xs[-1] + 1 - side) // 2, 0, frame - side))
    y0 = int(np.clip((ys[0] + ys[-1] + 1 - side) // 2, 0, frame - side))
    return x0, y0, side


def crop(x: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    """The box (x0, y0, side) of (S, H, W, ...) slices."""
    x0, y0, side = box
    return x[:, x0:x0 + side, y0:y0 + side]


def uncrop(values: torch.Tensor, box: tuple[int, int, int], frame: int = RAW_SIZE, fill: float = 0.0) -> torch.Tensor:
    """Values (..., size, size) computed on a cropped box (e.g. logits (S, R, size, size)), back in the full frame
    (..., frame, frame): bilinear resize to the box, `fill` outside it."""
    x0, y0, side = box
    lead = values.shape[:-2]
    if values.shape[-1] != side:
        flat = values.reshape(-1, 1, *values.shape[-2:]).float()
        values = F.interpolate(flat, size=(side, side), mode="bilinear", align_corners=False).reshape(*lead, side, side)
    out = values.new_full((*lead, frame, frame), fill)
    out[..., x0:x0 + side, y0:y0 + side] = values
    return out


def preprocess_volume(image: np.ndarray, size: int, crop_to_brain: bool = True
                      ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Image (S, 240, 240, 4) → kept slice indices, normalised float16 images (S', 4, size, size) and the box
    (x0, y0, side) they were resized from: the brain's box (`crop_to_brain`) or the whole frame.

    Slices with no brain are dropped: nothing to segment, and they would only teach the model the background.
    Cropping to the brain spends the pixels of `size` on the brain instead of the empty frame around it.
    """
    norm, brain = normalise_volume(image)
    keep = np.flatnonzero(brain.any((1, 2)))
    box = brain_box(brain) if crop_to_brain else (0, 0, image.shape[1])
    with one_thread():
        images = resize_slices(crop(norm[keep], box), size, nearest=False)
    return keep, np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float16), box


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch and OpenCV on one thread inside the block, as before it afterwards. Preprocessing calls them once per
    slice on small arrays: their thread pools gain nothing there and, on cores busy with other work, make every
    call wait for a busy core (preprocess_volume measured 7x slower with torch's 2 threads on the shared 2-core
    machine)."""
    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])


# ----------------------------------------------------------------------------------------------------------
# The on-disk cache: one folder per (source, size, format version); three .npy files per volume; meta.json last.


def parse_source(spec: str) -> tuple[str, str]:
    """`kaggle`, `synthetic[:VxS]`, `h5:DIR` or `nifti:DIR` → (kind, argument)."""
    kind, _, arg = spec.partition(":")
    if kind not in ("kaggle", "synthetic", "h5", "nifti"):
        raise DataError(f"unknown --data source {spec!r}: use kaggle, synthetic[:VOLUMESxSLICES], h5:DIR or nifti:DIR")
    if kind in ("h5", "nifti") and not arg:
        raise DataError(f"--data {kind}: needs a folder, e.g. --data {kind}:/path/to/data")
    if kind == "synthetic" and arg and not re.fullmatch(r"\d+x\d+", arg):
        raise DataError(f"--data synthetic:{arg}: expected synthetic:VOLUMESxSLICES, e.g. synthetic:12x40")
    return kind, arg


def fingerprint(files: list[Path]) -> str:
    """A hash of the files' resolved paths, sizes and modification times: the cache key of a source.

    Resolving each path component by component costs ~10 system calls a file (57,195 files: seconds, on every
    start); a folder is resolved once instead, and a file itself only when it is a link. Same hash as p.resolve().
    """
    import stat

    h, folders = hashlib.sha1(), {}
    for p in files:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            resolved, st = p.resolve(), p.stat()
        else:
            if p.parent not in folders:
                folders[p.parent] = p.parent.resolve()
            resolved = folders[p.parent] / p.name
        h.update(f"{resolved}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed to `path` only if the block succeeds, removed otherwise.

    The name keeps `path`'s suffixes (writers such as nibabel pick the format from them) and is unique to the process.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Cache:
    """A finished cache folder and its meta.json (volumes in order, their slices and spacing)."""

    root: Path
    meta: dict

    @property
    def volume_ids(self) -> list[str]:
        return [v["id"] for v in self.meta["volumes"]]

    def volume(self, vid: str) -> dict:
        return next(v for v in self.meta["volumes"] if v["id"] == vid)

    def images(self, vid: str, mmap: bool = False) -> np.ndarray:
        return np.load(self.root / f"images_{vid}.npy", mmap_mode="r" if mmap else None)

    def masks(self, vid: str, mmap: bool = False) -> np.ndarray:
        """The label maps (S, size, size) of the kept slices at the training size."""
        return np.load(self.root / f"masks_{vid}.npy", mmap_mode="r" if mmap else None)

    def full_labels(self, vid: str) -> np.ndarray:
        """The label maps (S, 240, 240) of the kept slices at the original resolution."""
        return np.load(self.root / f"full_{vid}.npy")


def region_masks(label, regions: tuple[str, ...] | list[str]):
    """Label maps (S, H, W) (numpy or torch) → boolean masks (S, R, H, W) of the regions (REGIONS), which overlap:
    an enhancing voxel is in all three."""
    stack = torch.stack if isinstance(label, torch.Tensor) else np.stack
    masks = []
    for region in regions:
        first, *rest = REGIONS[region]
        mask = label == first
        for k in rest:
            mask = mask | (label == k)
        masks.append(mask)
    return stack(masks, 1)


def labels_from_regions(masks: np.ndarray, regions: tuple[str, ...] | list[str]) -> np.ndarray:
    """Boolean region masks (S, R, H, W) → a BraTS label map (S, H, W) uint8: each voxel gets the label of the
    innermost region that holds it (ET → 4, TC without ET → 1, WT without TC → 2), so a region predicted outside
    its outer one widens the outer one, as in nnU-Net's BraTS export. region_masks of the result: the nested masks."""
    order = sorted(range(len(regions)), key=lambda i: len(REGIONS[regions[i]]), reverse=True)  # outer first
    label = np.zeros((masks.shape[0], *masks.shape[2:]), np.uint8)
    for i in order:
        label[masks[:, i]] = INNERMOST_LABEL[regions[i]]
    return label


def read_volume(kind: str, source: list[Path] | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One volume of a source: its .h5 slice files (kind "h5") or its case folder (kind "nifti") → image, label, spacing."""
    if kind == "h5":
        return (*read_h5_volume(source), (1.0, 1.0, 1.0))
    image, label, _, spacing = read_nifti_case(source)
    return image, label, spacing


def build_volume(folder: Path, vid: str, kind: str, source: list[Path] | Path, size: int, crop_to_brain: bool,
                 root: Path) -> dict:
    """Read and preprocess one volume, write its three .npy files into the cache folder (each atomically) and
    return its entry of meta.json. Runs in the caller's process or in a worker process of prepare."""
    image, label, spacing = read_volume(kind, source)
    try:
        keep, images, box = preprocess_volume(image, size, crop_to_brain)
    except DataError as e:
        raise DataError(f"volume {vid} in {root}: {e}") from None
    labels = np.ascontiguousarray(label[keep], dtype=np.uint8)
    with one_thread():
        masks = resize_slices(crop(labels, box), size, nearest=True)
    for name, array in (("full", labels), ("masks", masks), ("images", images)):
        with atomic_path(folder / f"{name}_{vid}.npy") as tmp:
            np.save(tmp, array)
    return {"id": vid, "depth": int(image.shape[0]), "slices": keep.tolist(), "box": list(box),
            "dropped": int(image.shape[0] - len(keep)), "spacing": list(spacing)}


def build_workers(slices: int) -> int:
    """Default number of build processes: the CPUs this process may use, at most 8 (each worker holds one volume,
    ~0.6 GiB at 240 x 240 in bench/cache.py; more than 8 was never measured), and 1 for a source under 1,000
    slices, where starting the workers (each imports torch, 2-4 s) would cost more than it saves."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return 1 if slices < 1000 else max(1, min(8, cpus))


def finished_cache(folder: Path) -> Cache | None:
    """The cache in `folder` if its build finished: meta.json readable and every volume's three files there; None
    for a build to (re)do: never started, interrupted, or damaged since (a truncated meta.json, a file removed)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        ids = [v["id"] for v in meta["volumes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all((folder / f"{part}_{vid}.npy").is_file() for vid in ids for part in ("images", "masks", "full")):
        return None
    return Cache(folder, meta)


def prepare(spec: str, size: int, cache_dir: Path | None = None, crop_to_brain: bool = True,
            workers: int | None = None) -> Cache:
    """Resolve a --data source, build its preprocessed cache once, and return it.

    Volumes are built in `workers` processes (default: build_workers), each holding one volume at a time, or in
    this process when workers is 1 or there is one volume. Workers are started with "spawn", so a caller that
    has already initialised CUDA is safe; like any spawned pool, they import the caller's main script, so a
    script that calls prepare needs the `if __name__ == "__main__":` guard. The cache is the same whatever the
    number of workers; meta.json is written last, in volume order, so an interrupted or failed build never looks
    finished. A DataError in any volume stops the build and reaches the caller with its message.
    """
    if size <= 0:
        raise DataError(f"--size must be positive, got {size}")
    kind, arg = parse_source(spec)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache folder {cache_dir} (--cache-dir): {e.strerror or e}") from None
    if kind == "synthetic":
        n_vol, n_sl = (int(t) for t in arg.split("x")) if arg else DEFAULT_SYNTHETIC
        if n_vol < 1 or n_sl < 1:
            raise DataError(f"--data synthetic:{arg}: needs at least one volume and one slice")
        kind, root = "h5", write_synthetic(cache_dir / f"synthetic-v{SYNTHETIC_VERSION}-{n_vol}x{n_sl}", n_vol, n_sl)
    elif kind == "kaggle":
        kind, root = "h5", kaggle_download()
    else:
        root = Path(arg).expanduser()

    if kind == "h5":
        sources: dict[str, list[Path] | Path] = dict(list_h5(root))
        files = [p for fs in sources.values() for p in fs]
        slices = len(files)
    else:
        sources = dict(list_nifti(root))
        files = sorted(p for d in sources.values() for p in d.iterdir() if ".nii" in p.name)
        slices = 155 * len(sources)  # BraTS depth; only sizes the default number of workers

    key = hashlib.sha1(json.dumps([CACHE_VERSION, kind, str(root.resolve()), fingerprint(files), size, crop_to_brain]
                                  ).encode()).hexdigest()[:16]
    folder = cache_dir / f"{kind}-{size}{'-crop' if crop_to_brain else ''}-{key}"
    cached = finished_cache(folder)
    if cached is not None:
        return cached
    for vid in sources:
        if not re.fullmatch(r"[\w.-]+", vid):
            raise DataError(f"volume name {vid!r} has characters that cannot name a cache file")
    folder.mkdir(parents=True, exist_ok=True)
    workers = min(build_workers(slices) if workers is None else max(1, workers), len(sources))
    args = {vid: (folder, vid, kind, src, size, crop_to_brain, root) for vid, src in sources.items()}
    built: dict[str, dict] = {}
    with tqdm(total=len(args), desc=f"caching {kind} at {size}px", unit="vol", disable=None) as bar:
        if workers == 1:
            for vid, a in args.items():
                built[vid] = build_volume(*a)
                bar.update()
        else:
            build_in_workers(args, workers, built, bar)
    volumes = [built[vid] for vid in sources]
    meta = {"version": CACHE_VERSION, "source": spec, "root": str(root), "size": size, "crop": crop_to_brain,
            "channels": list(CHANNELS),
            "volumes": volumes, "kept": sum(len(v["slices"]) for v in volumes),
            "dropped": sum(v["dropped"] for v in volumes)}
    with atomic_path(folder / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta))
    return Cache(folder, meta)


def build_in_workers(args: dict[str, tuple], workers: int, built: dict[str, dict], bar: tqdm) -> None:
    """build_volume(*args[vid]) for every volume in `workers` spawned processes, the entries into `built`.

    Only volume descriptions go out and meta entries come back, so the parent stays small. On the first error
    (or an interrupt) the volumes not yet started are cancelled and the running ones finish, so no .tmp file is
    left behind; then the error of the first failed volume in volume order is raised here, as a sequential build
    would raise it (a DataError without the worker's traceback: its message is the one line the user sees).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {vid: pool.submit(build_volume, *a) for vid, a in args.items()}
        for future in as_completed(futures.values()):
            if future.exception() is not None:
                break
            entry = future.result()
            built[entry["id"]] = entry
            bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for future in futures.values():
        error = None if future.cancelled() else future.exception()
        if isinstance(error, DataError):
            raise error from None
        if error is not None:
            raise error


# ----------------------------------------------------------------------------------------------------------
# Split by patient


def site_of(volume_id: str) -> str:
    """The acquiring site in a BraTS 2017-19 case name (Brats18_<site>_<id>_1: '2013', 'CBICA', 'TCIA01', ...); '' for
    names without one (BraTS20_Training_NNN, the Kaggle volumes): then every case is of one site."""
    match = re.match(r"Brats1[789]_([A-Za-z0-9]+)_", volume_id)
    return match.group(1) if match else ""


def split_volumes(volume_ids: list[str], seed: int, folds: int = 0, fold: int = 0) -> dict[str, list[str]]:
    """Seeded split of volumes (patients) into train / val / test.

    folds == 0: 70 / 15 / 15, val and test at least one volume each.
    folds == K: K-fold cross-validation by patient, stratified by site (site_of): the seeded order, grouped by site,
    is dealt round the K folds, so each site's cases spread evenly over the folds; fold `fold` is the test set and
    the next fold the validation set, so over fold = 0..K-1 every patient is tested once.
    """
    n = len(volume_ids)
    if n < 3:
        raise DataError(f"need at least 3 volumes to split by patient into train/val/test, found {n}")
    ids = [volume_ids[i] for i in np.random.default_rng(seed).permutation(n)]
    if folds:
        if not 3 <= folds <= n:
            raise DataError(f"--folds must be between 3 and the number of volumes ({n}), got {folds}")
        if not 0 <= fold < folds:
            raise DataError(f"--fold must be in 0..{folds - 1}, got {fold}")
        ids.sort(key=site_of)  # stable: the seeded order within each site
        parts = [ids[i::folds] for i in range(folds)]
        test, val = parts[fold], parts[(fold + 1) % folds]
        return {"train": sorted(set(ids) - set(test) - set(val)), "val": sorted(val), "test": sorted(test)}
    n_val, n_test = max(1, round(0.15 * n)), max(1, round(0.15 * n))
    return {"train": sorted(ids[n_val + n_test:]), "val": sorted(ids[:n_val]), "test": sorted(ids[n_val:n_val + n_test])}
