"""Readers and preprocessing checked against anatomy and the raw files, not against data.py itself.

Oracles: facts about the three real sample cases recorded once from the raw NIfTI files with nibabel alone (the
tumour's centroid), MRI physics (contrast enhances the active tumour in T1Gd and not in T1; T1 and T1Gd are the
same sequence, T2 is the least like T1; FLAIR's brightest voxels are the oedema), and the raw files themselves
read with nibabel in the test.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

import data
from conftest import SAMPLE_CASES

# centroid (x, y, z) in voxels of seg > 0, from nibabel alone: np.argwhere(seg > 0).mean(0)
LABEL_CENTROIDS = {"Brats18_CBICA_ABM_1": (162.9, 146.2, 59.5), "Brats18_2013_3_1": (81.1, 129.6, 67.9),
                   "Brats18_TCIA02_135_1": (96.7, 162.9, 97.6)}
MODALITY = {name: i for i, name in enumerate(data.CHANNELS)}


@pytest.fixture(scope="module", params=SAMPLE_CASES)
def case(request, sample_dir):
    """(name, reader image (z, x, y, c), reader label (z, x, y), spacing)."""
    image, label, _, spacing = data.read_nifti_case(sample_dir / request.param)
    return request.param, image, label, spacing


def test_reader_axes_put_the_tumour_where_the_raw_file_has_it(case):
    name, image, label, _ = case
    z, x, y = np.argwhere(label > 0).mean(0)
    assert (x, y, z) == pytest.approx(LABEL_CENTROIDS[name], abs=0.06)
    assert image.shape == (155, 240, 240, 4) and label.shape == (155, 240, 240)


def test_reader_channels_are_the_files_of_their_names(case, sample_dir):
    name, image, _, _ = case
    for modality, c in MODALITY.items():
        raw = np.asarray(nib.load(str(sample_dir / name / f"{name}_{modality}.nii.gz")).dataobj)  # (x, y, z)
        np.testing.assert_array_equal(image[..., c], raw.transpose(2, 0, 1).astype(np.float32), err_msg=modality)


def test_reader_channel_order_by_modality_statistics(case):
    """Which channel is which, told by the images alone."""
    _, image, label, _ = case
    brain = (image > 0).any(-1)
    v = image[brain]  # (voxels, 4)
    z = (v - v.mean(0)) / v.std(0)
    lab = label[brain]
    corr = np.corrcoef(v.T)
    t1, t1ce, t2, flair = MODALITY["t1"], MODALITY["t1ce"], MODALITY["t2"], MODALITY["flair"]
    enhancement = z[lab == 4].mean(0) - z[lab == 2].mean(0)  # active tumour against oedema
    assert enhancement[t1ce] > enhancement[t1] + 0.5  # gadolinium enhances T1Gd only
    others = [c for c in range(4) if c not in (t1, t1ce)]
    assert corr[t1, t1ce] > corr[others, t1ce].max()  # T1 and T1Gd: the same sequence
    assert corr[t2, t1] < corr[[flair, t1ce], t1].min()  # T2 is the least like T1 (CSF: bright vs dark)
    top = z >= np.percentile(z, 99, axis=0)  # each channel's brightest 1% of brain voxels
    in_tumour = (top & (lab > 0)[:, None]).sum(0) / top.sum(0)
    assert in_tumour.argmax() == flair  # FLAIR's brightest voxels are the oedema (T2's are often CSF)


def test_preprocessed_flair_is_bright_under_the_cached_mask(sample_subset, tmp_path):
    """The cache's images and masks line up: the tumour label sits where the normalised FLAIR is bright, for the
    cropped and the uncropped cache (an image transposed or shifted against its mask loses this)."""
    for crop in (True, False):
        cache = data.prepare(f"nifti:{sample_subset}", 64, tmp_path, crop_to_brain=crop)
        for vid in cache.volume_ids:
            flair = cache.images(vid)[:, MODALITY["flair"]].astype(np.float32)
            mask = cache.masks(vid) > 0
            brain = (cache.images(vid) != 0).any(1)
            assert flair[mask].mean() - flair[brain & ~mask].mean() > 0.7, (vid, crop)


def test_the_crop_box_holds_the_brain_and_the_full_masks_are_the_raw_labels(sample_subset, sample_dir, tmp_path):
    cache = data.prepare(f"nifti:{sample_subset}", 64, tmp_path)
    for vid in cache.volume_ids:
        meta = cache.volume(vid)
        raw = [np.asarray(nib.load(str(sample_dir / vid / f"{vid}_{m}.nii.gz")).dataobj) for m in data.CHANNELS]
        brain = np.any([r > 0 for r in raw], axis=0)  # (x, y, z)
        seg = np.asarray(nib.load(str(sample_dir / vid / f"{vid}_seg.nii.gz")).dataobj)
        kept = np.flatnonzero(brain.any((0, 1)))
        assert meta["slices"] == kept.tolist()
        x0, y0, side = meta["box"]
        xs, ys = np.flatnonzero(brain.any((1, 2))), np.flatnonzero(brain.any((0, 2)))
        assert x0 <= xs[0] and xs[-1] < x0 + side and y0 <= ys[0] and ys[-1] < y0 + side
        assert side <= max(xs[-1] - xs[0], ys[-1] - ys[0]) + 1 + 2 * data.CROP_MARGIN
        np.testing.assert_array_equal(cache.full_labels(vid), seg.transpose(2, 0, 1)[kept])


def test_normalisation_is_per_volume_not_per_slice():
    """Two slices of one brain at different intensity keep their difference (per-slice z-scores would erase it)."""
    rng = np.random.default_rng(0)
    image = np.zeros((2, 240, 240, 4), np.float32)
    image[0, 60:180, 60:180] = rng.normal(100, 5, (120, 120, 4))
    image[1, 60:180, 60:180] = rng.normal(300, 5, (120, 120, 4))
    norm, brain = data.normalise_volume(image)
    # per volume: the brain is half at 100, half at 300 → z ≈ -1 and +1
    assert norm[0][brain[0]].mean() == pytest.approx(-1, abs=0.02)
    assert norm[1][brain[1]].mean() == pytest.approx(1, abs=0.02)


def test_normalisation_clips_scanner_outliers():
    """One voxel at 32767 (as in a sample case) must not squash the rest of the brain towards 0."""
    rng = np.random.default_rng(0)
    image = np.zeros((3, 240, 240, 4), np.float32)
    image[:, 40:200, 40:200] = rng.normal(500, 50, (3, 160, 160, 4))
    image[1, 100, 100] = 32767
    norm, brain = data.normalise_volume(image)
    assert norm.max() < 3.5  # clipped at the 99.5th percentile: ~2.6 standard deviations
    assert norm[brain].std() == pytest.approx(1, abs=0.01)
    typical = norm[0][brain[0]]
    assert typical.std() > 0.9  # without clipping the outlier would leave the typical voxels a std of ~0.3


def test_mask_resizing_is_nearest_neighbour():
    """Stripes one pixel wide every 4 pixels, shrunk 4x: nearest lands on every stripe (all ones); averaging gives
    a quarter, which rounds to nothing."""
    mask = np.zeros((1, 32, 32), np.uint8)
    mask[:, :, ::4] = 1
    out = data.resize_slices(mask, 8, nearest=True)
    assert out.dtype == np.uint8 and out.shape == (1, 8, 8) and (out == 1).all()


def test_uncrop_is_the_inverse_geometry_of_crop():
    """A box pasted back lands where it was cut from, at its own size, `fill` elsewhere."""
    import torch

    frame = np.zeros((1, 240, 240), np.float32)
    frame[0, 100:110, 50:60] = 1.0
    box = (40, 30, 120)  # x0, y0, side
    small = data.resize_slices(data.crop(frame, box), 60, nearest=True)
    back = data.uncrop(torch.from_numpy(small), box, fill=-1.0).numpy()
    assert (back[0, :40] == -1).all() and (back[0, :, :30] == -1).all() and (back[0, 160:] == -1).all()
    ones = np.argwhere(back[0] > 0.5)
    assert ones.min(0).tolist() == [100, 50] and ones.max(0).tolist() == [109, 59]
