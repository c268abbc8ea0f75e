"""Faults in data.py and predict.py that no other test names: half-built caches, non-finite voxels, overlapping
labels, the preprocessing constants and geometry against float64 references written here, and one unreadable
case in a predict.py run. Every expected value is computed by hand or by numpy in this file, never by the code."""
from __future__ import annotations

import contextlib
import io
import json
import math
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import predict
import train
from conftest import SAMPLE_CASES, write_h5_slices


# ----------------------------------------------------------------------------------------------------------
# helpers


def snapshot(cache: data.Cache) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every .npy file of a cache folder, by name: its dtype, shape and raw bytes."""
    arrays = {p.name: np.load(p) for p in sorted(cache.root.glob("*.npy"))}
    return {name: (a.dtype.str, a.shape, a.tobytes()) for name, a in arrays.items()}


def small_h5_source(folder: Path, volumes: int = 3, slices: int = 3, seed: int = 1) -> Path:
    """A Kaggle-layout source of `volumes` synthetic phantoms of `slices` slices."""
    rng = np.random.default_rng(seed)
    for v in range(1, volumes + 1):
        image, label = data.synthetic_volume(rng, slices)
        write_h5_slices(folder, v, image, label, range(slices))
    return folder


def write_raw_h5(path: Path, image: np.ndarray, onehot: np.ndarray) -> None:
    """One Kaggle-layout slice written as given: image (240, 240, 4), mask (240, 240, 3), no conversion."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("mask", data=onehot)


# ----------------------------------------------------------------------------------------------------------
# 1. a half-built cache folder is never taken as a finished cache


def test_cache_folder_without_meta_json_is_rebuilt(tmp_path: Path) -> None:
    """A folder holding some volume files but no meta.json (a build interrupted in volume 3) is built again: the
    next prepare restores every file with the values of the first, complete build, and writes meta.json."""
    src = small_h5_source(tmp_path / "h5")
    first = data.prepare(f"h5:{src}", 16, tmp_path / "cache", workers=1)
    files, meta = snapshot(first), first.meta
    assert len(files) == 9
    (first.root / "meta.json").unlink()
    (first.root / "images_3.npy").unlink()  # volume 3 had written full_ and masks_ but not images_
    again = data.prepare(f"h5:{src}", 16, tmp_path / "cache", workers=1)
    assert again.root == first.root and again.meta == meta
    assert json.loads((again.root / "meta.json").read_text()) == meta
    assert snapshot(again) == files
    assert again.images("3").shape == (len(meta["volumes"][2]["slices"]), 4, 16, 16)


def test_meta_json_cut_short_by_a_full_disk_is_never_left_behind(tmp_path: Path, monkeypatch) -> None:
    """meta.json is written atomically: a write that fails half-way (disk full) leaves no meta.json and no
    temporary file, so the next prepare rebuilds and returns the same cache as a build that never failed."""
    src = small_h5_source(tmp_path / "h5")
    reference = data.prepare(f"h5:{src}", 16, tmp_path / "reference", workers=1)
    real_write_text = pathlib.Path.write_text

    def disk_full(self: Path, text: str, *args, **kwargs) -> int:
        if "meta.json" not in self.name:
            return real_write_text(self, text, *args, **kwargs)
        with open(self, "w") as f:
            f.write(text[:len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        data.prepare(f"h5:{src}", 16, tmp_path / "cache", workers=1)
    monkeypatch.undo()
    [folder] = list((tmp_path / "cache").iterdir())
    assert not (folder / "meta.json").exists() and not list(folder.glob(".tmp*"))
    again = data.prepare(f"h5:{src}", 16, tmp_path / "cache", workers=1)
    assert again.root == folder and again.meta["volumes"] == reference.meta["volumes"]
    assert snapshot(again) == snapshot(reference)


def test_atomic_path_publishes_only_a_finished_write(tmp_path: Path) -> None:
    """A block that raises leaves neither the target nor its temporary file; one that succeeds leaves the target
    with the whole content (and no temporary file), replacing an older version."""
    target = tmp_path / "meta.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with data.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
    with data.atomic_path(target) as tmp:
        assert tmp != target and tmp.name.endswith(".json")
        tmp.write_text("new, complete")
    assert target.read_text() == "new, complete" and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_half_written_synthetic_source_is_written_again(tmp_path: Path) -> None:
    """The synthetic phantoms are complete only once their `complete` marker exists: a folder with some of the
    .h5 slices and no marker (an interrupted first run) is written again in full, and gives the same cache."""
    first = data.prepare("synthetic:2x4", 16, tmp_path / "a", workers=1)
    inner = Path("synthetic-v1-2x4") / "BraTS2020_training_data" / "content" / "data"
    complete, half = tmp_path / "a" / inner, tmp_path / "b" / inner
    half.mkdir(parents=True)
    for s in range(2):  # volume 1's first two slices, then the run stopped
        (half / f"volume_1_slice_{s}.h5").write_bytes((complete / f"volume_1_slice_{s}.h5").read_bytes())
    again = data.prepare("synthetic:2x4", 16, tmp_path / "b", workers=1)
    folder = tmp_path / "b" / "synthetic-v1-2x4"
    assert sorted(p.name for p in half.glob("*.h5")) == sorted(p.name for p in complete.glob("*.h5"))
    assert len(list(half.glob("*.h5"))) == 8
    assert (folder / "complete").exists()
    assert again.volume_ids == ["1", "2"] and [v["depth"] for v in again.meta["volumes"]] == [4, 4]
    assert again.meta["volumes"] == first.meta["volumes"] and snapshot(again) == snapshot(first)


def test_truncated_meta_json_is_rebuilt_not_a_traceback(tmp_path: Path) -> None:
    """A meta.json cut short (written by an older, non-atomic version, or a copy interrupted) is rebuilt."""
    src = small_h5_source(tmp_path / "h5")
    first = data.prepare(f"h5:{src}", 16, tmp_path / "cache", workers=1)
    files, meta = snapshot(first), first.meta
    text = (first.root / "meta.json").read_text()
    (first.root / "meta.json").write_text(text[:len(text) // 2])
    again = data.prepare(f"h5:{src}", 16, tmp_path / "cache", workers=1)
    assert again.meta == meta and snapshot(again) == files


def test_cache_missing_a_volume_file_is_rebuilt(tmp_path: Path) -> None:
    """A finished cache folder from which one volume's .npy file went missing is rebuilt, not returned broken."""
    src = small_h5_source(tmp_path / "h5")
    first = data.prepare(f"h5:{src}", 16, tmp_path / "cache", workers=1)
    files = snapshot(first)
    (first.root / "masks_2.npy").unlink()
    again = data.prepare(f"h5:{src}", 16, tmp_path / "cache", workers=1)
    assert snapshot(again) == files


# ----------------------------------------------------------------------------------------------------------
# 2. non-finite voxels are refused


def h5_source_with(tmp_path: Path, bad: float, at: tuple[int, int, int]) -> Path:
    """Two volumes of two slices, a brain square of random values; volume 2, slice 1 holds `bad` at (x, y, c)."""
    rng = np.random.default_rng(0)
    image = np.zeros((2, 240, 240, 4), np.float32)
    image[:, 80:160, 70:170] = rng.uniform(100, 900, (2, 80, 100, 4))
    label = np.zeros((2, 240, 240), np.uint8)
    src = tmp_path / "h5"
    write_h5_slices(src, 1, image, label, range(2))
    image[(1, *at)] = bad
    write_h5_slices(src, 2, image, label, range(2))
    return src


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("at", [(120, 120, 2), (5, 230, 3)], ids=["brain", "background"])
def test_non_finite_voxels_are_refused_naming_the_volume(tmp_path: Path, bad: float, at: tuple[int, int, int]) -> None:
    """NaN, +inf and -inf, in the brain or in the background of any channel, stop the build with a DataError that
    names the volume and its folder; nothing is cached."""
    src = h5_source_with(tmp_path, bad, at)
    with pytest.raises(data.DataError) as caught:
        data.prepare(f"h5:{src}", 16, tmp_path / "cache", workers=1)
    message = str(caught.value)
    assert message.startswith(f"volume 2 in {src}") and "NaN or infinite" in message
    assert not list((tmp_path / "cache").glob("*/meta.json"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
def test_normalise_refuses_each_non_finite_value(bad: float) -> None:
    """normalise_volume itself refuses a single NaN, +inf or -inf voxel (here in the last channel of a slice)."""
    image = np.random.default_rng(3).uniform(1, 2, (3, 20, 20, 4)).astype(np.float32)
    image[2, 7, 9, 3] = bad
    with pytest.raises(data.DataError, match="NaN or infinite"):
        data.normalise_volume(image)


def test_normalise_refuses_a_volume_without_brain() -> None:
    """An all-zero volume (and one constant per slice: every voxel at its background) has no brain to normalise
    over: a DataError, not numpy's IndexError from percentiles of nothing."""
    for image in (np.zeros((3, 20, 20, 4), np.float32), np.full((3, 20, 20, 4), 7.0, np.float32)):
        with pytest.raises(data.DataError, match="image has no brain"):
            data.normalise_volume(image)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="gap: non-finite voxels are refused only after reading, in normalise_volume, so the "
                          "message names the volume and its folder but not the .h5 slice file")
def test_non_finite_voxel_message_names_the_slice_file(tmp_path: Path) -> None:
    """The DataError for a +inf voxel names the .h5 file that holds it."""
    src = h5_source_with(tmp_path, np.inf, (120, 120, 2))
    with pytest.raises(data.DataError, match="volume_2_slice_1.h5"):
        data.prepare(f"h5:{src}", 16, tmp_path / "cache", workers=1)


# ----------------------------------------------------------------------------------------------------------
# 3. a one-hot mask with two labels on a voxel (or a value other than 0/1) is refused


def test_one_hot_mask_decodes_to_exact_labels(tmp_path: Path) -> None:
    """Channels 0, 1, 2 of the mask are labels 1, 2, 4, at the pixels where they are set."""
    onehot = np.zeros((240, 240, 3), np.uint8)
    onehot[3, 4, 0] = onehot[10, 20, 1] = onehot[200, 100, 2] = 1
    path = tmp_path / "volume_1_slice_0.h5"
    write_raw_h5(path, np.ones((240, 240, 4), np.float32), onehot)
    _, label = data.read_h5_volume([path])
    expected = np.zeros((1, 240, 240), np.uint8)
    expected[0, 3, 4], expected[0, 10, 20], expected[0, 200, 100] = 1, 2, 4
    np.testing.assert_array_equal(label, expected)


@pytest.mark.parametrize("channels,value", [((0, 1), 1), ((0, 2), 1), ((1, 2), 1), ((0, 1, 2), 1), ((0,), 2), ((1,), 2)],
                         ids=["1+2", "1+4", "2+4", "all", "value2-ch0", "value2-ch1"])
def test_mask_with_two_labels_on_a_voxel_is_refused(tmp_path: Path, channels: tuple[int, ...], value: int) -> None:
    """A voxel set in two or three channels, or a channel holding 2, is a DataError naming the slice file."""
    onehot = np.zeros((240, 240, 3), np.uint8)
    onehot[50:60, 50:60, 1] = 1  # a valid oedema patch elsewhere
    for c in channels:
        onehot[130, 140, c] = value
    good, bad = tmp_path / "volume_1_slice_0.h5", tmp_path / "volume_1_slice_1.h5"
    write_raw_h5(good, np.ones((240, 240, 4), np.float32), np.zeros((240, 240, 3), np.uint8))
    write_raw_h5(bad, np.ones((240, 240, 4), np.float32), onehot)
    with pytest.raises(data.DataError, match="volume_1_slice_1.h5: mask is not a one-hot"):
        data.read_h5_volume([good, bad])


# ----------------------------------------------------------------------------------------------------------
# 4. preprocessing constants and geometry against float64 references


def normalise_reference(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """README/docstring recipe in float64: per slice and channel move the minimum to 0; brain = any channel > 0;
    per channel over the brain, clip to the 0.5-99.5th percentile, z-score (population std); 0 outside."""
    x = image.astype(np.float64)
    x = x - x.min(axis=(1, 2), keepdims=True)
    brain = (x > 0).any(-1)
    out = np.zeros_like(x)
    for c in range(x.shape[-1]):
        v = np.clip(x[..., c][brain], *np.percentile(x[..., c][brain], [0.5, 99.5]))
        out[..., c][brain] = (v - v.mean()) / v.std()
    return out, brain


def volume_with_outliers(rng: np.random.Generator, shape=(4, 32, 32, 4)) -> np.ndarray:
    """Slices 1-3 hold a brain of normal(500, 100) with 1% high outliers (up to 30000) and 1% low ones, over a
    negative background that differs per slice and channel (as in the Kaggle files); slice 0 has no brain; in one
    patch only channel 0 is above the background."""
    s, h, w, c = shape
    image = np.empty(shape, np.float64)
    image[:] = -rng.uniform(0.5, 3.0, (s, 1, 1, c))
    inside = (slice(1, s), slice(6, 26), slice(4, 28))
    values = rng.normal(500, 100, image[inside].shape)
    u = rng.uniform(size=values.shape)
    values[u < 0.01] = rng.uniform(5000, 30000, (u < 0.01).sum())
    values[u > 0.99] = rng.uniform(1, 20, (u > 0.99).sum())
    image[inside] = values
    image[2, 8:12, 6:10, 1:] = image[2, 0, 0, 1:]  # background in channels 1-3, brain by channel 0 alone
    return image.astype(np.float32)


def test_normalise_matches_a_float64_reference_with_outliers() -> None:
    """Clip range, brain definition, per-slice background and z-score (population std) as the reference says;
    a changed percentile, a one-sided clip or ddof=1 moves the values far beyond the tolerance."""
    image = volume_with_outliers(np.random.default_rng(7))
    norm, brain = data.normalise_volume(image)
    ref, ref_brain = normalise_reference(image)
    np.testing.assert_array_equal(brain, ref_brain)
    assert ref_brain.sum() == 3 * 20 * 24 and not ref_brain[0].any() and ref_brain[2, 8:12, 6:10].all()
    assert norm.dtype == np.float32 and norm.shape == image.shape
    np.testing.assert_allclose(norm, ref, rtol=0, atol=2e-5)
    assert (norm[~brain] == 0).all()


def test_preprocess_crops_the_brain_box_and_area_averages() -> None:
    """preprocess_volume end to end: the brain's box (rows 100-171, columns 40-111, margin 4 → box (96, 36, 80)),
    cut from the float64 reference normalisation and averaged over 5 x 5 blocks down to 16 px, channels first."""
    rng = np.random.default_rng(5)
    image = np.zeros((4, 240, 240, 4), np.float32)
    image[:3, 100:172, 40:112] = rng.uniform(100, 900, (3, 72, 72, 4))
    keep, out, box = data.preprocess_volume(image, 16, crop_to_brain=True)
    assert keep.tolist() == [0, 1, 2] and box == (96, 36, 80)
    ref, _ = normalise_reference(image)
    crop = ref[:3, 96:176, 36:116]  # (3, 80, 80, 4)
    expected = crop.reshape(3, 16, 5, 16, 5, 4).mean((2, 4)).transpose(0, 3, 1, 2)
    assert out.shape == (3, 4, 16, 16) and out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=2e-3, atol=2e-3)


def test_resize_slices_area_for_images_and_blocks_kept_for_masks() -> None:
    """Images: 5x downsizing is the mean of each 5 x 5 block (INTER_AREA). Masks made of 5 x 5 blocks keep each
    block's value at its place (nearest), stay 0/1 and uint8."""
    rng = np.random.default_rng(2)
    x = rng.uniform(-3, 3, (2, 80, 80, 4)).astype(np.float32)
    out = data.resize_slices(x, 16, nearest=False)
    np.testing.assert_allclose(out, x.astype(np.float64).reshape(2, 16, 5, 16, 5, 4).mean((2, 4)), rtol=0, atol=1e-5)
    blocks = (rng.uniform(size=(2, 16, 16)) > 0.6).astype(np.uint8)
    masks = data.resize_slices(np.repeat(np.repeat(blocks, 5, 1), 5, 2), 16, nearest=True)
    assert masks.dtype == np.uint8
    np.testing.assert_array_equal(masks, blocks)


def box_mask(rows: tuple[int, int], cols: tuple[int, int], frame: int = 240, slices: int = 3) -> np.ndarray:
    """A brain mask whose rows (axis 1) and columns (axis 2) span rows[0]..rows[1] and cols[0]..cols[1] inclusive,
    spread over the slices: each slice holds part of it, so the box must be the union."""
    brain = np.zeros((slices, frame, frame), bool)
    brain[0, rows[0], cols[0]] = True
    brain[1, rows[0]:rows[1] + 1, (cols[0] + cols[1]) // 2] = True
    brain[slices - 1, rows[1], cols[1]] = True
    return brain


@pytest.mark.parametrize("rows,cols,expected", [
    ((100, 139), (50, 109), (86, 46, 68)),   # 40 x 60: side 60 + 8, centred
    ((100, 140), (50, 108), (87, 46, 67)),   # odd spans 41 x 59: side 58 + 1 + 8 = 67
    ((100, 141), (50, 108), (87, 46, 67)),   # 42 rows in 67: (100 + 141 + 1 - 67) // 2 = 87, floor
    ((0, 59), (200, 239), (0, 172, 68)),     # touches the top and the right edge: clipped into the frame
    ((230, 239), (0, 9), (222, 0, 18)),      # bottom-left corner, small brain: side 18
    ((2, 237), (60, 180), (0, 0, 240)),      # 236 + 8 > 240: the whole frame
    ((120, 120), (33, 33), (116, 29, 9)),    # one voxel: side 1 + 8, 4 on each side
])
def test_brain_box_exact_coordinates(rows: tuple[int, int], cols: tuple[int, int],
                                     expected: tuple[int, int, int]) -> None:
    """(x0, y0, side): side = largest span + 1 + 2 * CROP_MARGIN (4), at most 240; centred with floor; clipped in."""
    box = data.brain_box(box_mask(rows, cols))
    assert box == expected and all(type(v) is int for v in box)
    x0, y0, side = box
    assert x0 <= rows[0] and rows[1] < x0 + side <= 240 and y0 <= cols[0] and cols[1] < y0 + side <= 240


def test_brain_box_of_an_empty_volume_is_the_frame() -> None:
    assert data.brain_box(np.zeros((2, 240, 240), bool)) == (0, 0, 240)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a half-pixel-centred bilinear resize (cv2 INTER_LINEAR, torch align_corners=False):
    output pixel i samples the input at (i + 0.5) * n_in / n_out - 0.5, clamped to the first and last pixel."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w[i, i0] += 1 - (src - i0)
        w[i, i1] += src - i0
    return w


@pytest.mark.parametrize("size,box", [(48, (17, 60, 96)), (48, (150, 3, 30)), (60, (0, 0, 240))],
                         ids=["up-2x", "down", "whole-frame-4x"])
def test_uncrop_resizes_bilinear_with_half_pixel_centres(size: int, box: tuple[int, int, int]) -> None:
    """Values at `size` land in the box as the float64 half-pixel bilinear resize puts them (also cv2's
    INTER_LINEAR, checked here), `fill` everywhere else; align_corners=True or nearest is off by far more."""
    import cv2

    x0, y0, side = box
    values = np.random.default_rng(4).normal(0, 1, (2, size, size))
    wx = bilinear_matrix(size, side)
    resized = np.einsum("ia,sab,jb->sij", wx, values, wx)
    for s in range(2):  # the reference agrees with OpenCV's bilinear resize
        np.testing.assert_allclose(cv2.resize(values[s].astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR),
                                   resized[s], atol=1e-5)
    expected = np.full((2, 240, 240), -7.0)
    expected[:, x0:x0 + side, y0:y0 + side] = resized
    out = data.uncrop(torch.from_numpy(values).float(), box, fill=-7.0)
    assert out.shape == (2, 240, 240)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)


def test_uncrop_at_the_box_size_places_values_exactly() -> None:
    """No resize when the values already have the box's side: a box of side 240 is the identity, and a box of side
    96 at (17, 60) holds the values at exactly rows 17-112 and columns 60-155 (fill -inf elsewhere)."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 240, 240, generator=g)
    assert torch.equal(data.uncrop(full, (0, 0, 240)), full)
    part = torch.randn(3, 96, 96, generator=g)
    out = data.uncrop(part, (17, 60, 96), fill=-math.inf)
    assert torch.equal(out[:, 17:113, 60:156], part)
    outside = torch.ones(240, 240, dtype=torch.bool)
    outside[17:113, 60:156] = False
    assert torch.isneginf(out[:, outside]).all()


# ----------------------------------------------------------------------------------------------------------
# 5. one unreadable case does not abort a predict.py run


def test_a_truncated_nifti_fails_its_case_only(ckpt: Path, sample_dir: Path, tmp_path: Path) -> None:
    """Case 1's T1 is a .nii.gz cut in half (nibabel raises EOFError while reading it); case 2 is a real case.
    The run prints one stderr line for case 1 naming the file, still writes case 2's mask and montage, and exits 1."""
    bad_name, good_name = SAMPLE_CASES[1], SAMPLE_CASES[0]
    bad = tmp_path / "cases" / bad_name
    bad.mkdir(parents=True)
    for f in (sample_dir / bad_name).iterdir():
        if "_t1." in f.name:
            raw = f.read_bytes()
            (bad / f.name).write_bytes(raw[:len(raw) // 2])
        else:
            (bad / f.name).symlink_to(f)
    good = tmp_path / "cases" / good_name
    good.symlink_to(sample_dir / good_name)
    out, stdout, stderr = tmp_path / "out", io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = predict.cli(["--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", str(bad), str(good)])
    errors = [line for line in stderr.getvalue().splitlines() if line.strip()]
    assert rc == 1
    assert len(errors) == 1 and errors[0].startswith(f"predict.py: error: case {bad_name} failed:")
    assert f"{bad_name}_t1.nii.gz" in errors[0] and "EOFError" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == [f"{good_name}.nii.gz", f"{good_name}.png"]
    assert "1 of 2 cases failed" in stdout.getvalue() and f"{good_name}: wrote" in stdout.getvalue()
