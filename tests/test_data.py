"""Readers, preprocessing, the on-disk cache, the patient split and on-device batches."""
import os
import time

import numpy as np
import pytest
import torch

import data
import feed
import train
from conftest import SAMPLE_CASES, read_case_with_nibabel, write_h5_slices


def test_h5_and_nifti_readers_give_the_raw_files(sample_dir, real_h5):
    """Both readers against the files read with nibabel alone (the .h5 files were written from those arrays)."""
    groups = data.list_h5(real_h5)
    assert list(groups) == ["1", "2", "3"] and len(groups["1"]) == 16
    image, label = data.read_h5_volume(groups["2"])
    raw_image, raw_label = read_case_with_nibabel(sample_dir / SAMPLE_CASES[1])
    np.testing.assert_array_equal(image, raw_image[45:109:4])
    np.testing.assert_array_equal(label, raw_label[45:109:4])
    ref_image, ref_label, affine, spacing = data.read_nifti_case(sample_dir / SAMPLE_CASES[1])
    np.testing.assert_array_equal(ref_image, raw_image)
    np.testing.assert_array_equal(ref_label, raw_label)
    assert set(np.unique(label)) <= {0, 1, 2, 4} and label.max() > 0
    assert ref_image.shape == (155, 240, 240, 4) and spacing == (1.0, 1.0, 1.0) and affine.shape == (4, 4)


def test_h5_dir_may_point_at_the_folder_of_files(real_h5):
    nested = real_h5 / "BraTS2020_training_data" / "content" / "data"
    assert data.list_h5(nested) == data.list_h5(real_h5)


def test_nifti_accepts_brats2020_naming_and_uncompressed(sample_dir, tmp_path):
    import nibabel as nib

    case = tmp_path / "BraTS20_Training_001"
    case.mkdir()
    src = sample_dir / SAMPLE_CASES[0]
    for m in (*data.CHANNELS, "seg"):
        img = nib.load(str(src / f"{SAMPLE_CASES[0]}_{m}.nii.gz"))
        nib.save(img, str(case / f"BraTS20_Training_001_{m}.nii"))
    image, label, _, _ = data.read_nifti_case(case)
    ref_image, ref_label, _, _ = data.read_nifti_case(src)
    np.testing.assert_array_equal(image, ref_image)
    np.testing.assert_array_equal(label, ref_label)
    assert list(data.list_nifti(tmp_path)) == ["BraTS20_Training_001"]


def test_normalisation_is_per_volume_zscore_over_brain_and_undoes_slice_offsets():
    rng = np.random.default_rng(0)
    image = np.zeros((6, 240, 240, 4), np.float32)
    image[1:5, 60:180, 60:180] = rng.uniform(100, 900, (4, 120, 120, 4))
    norm, brain = data.normalise_volume(image)
    assert brain.sum() == 4 * 120 * 120 and not brain[0].any() and not brain[5].any()
    for c in range(4):
        v = norm[..., c][brain]
        assert abs(v.mean()) < 1e-4 and abs(v.std() - 1) < 1e-3
    assert (norm[~brain] == 0).all()
    # the Kaggle files z-score each slice, background included: a per-slice offset must not change the result
    shifted = image - rng.uniform(1, 3, (6, 1, 1, 4)).astype(np.float32)
    norm2, brain2 = data.normalise_volume(shifted)
    assert (brain2 == brain).all()
    np.testing.assert_allclose(norm2, norm, atol=1e-3)


def test_preprocess_drops_slices_without_brain_and_resizes():
    image = np.zeros((5, 240, 240, 4), np.float32)
    image[2:4, 100:140, 90:150] = 5.0
    image[2:4, 110:120, 100:110] = 9.0
    keep, out, box = data.preprocess_volume(image, 48, crop_to_brain=False)
    assert keep.tolist() == [2, 3] and box == (0, 0, 240)
    assert out.shape == (2, 4, 48, 48) and out.dtype == np.float16


def test_split_is_by_patient_seeded_and_70_15_15():
    ids = [f"v{i}" for i in range(20)]
    s = data.split_volumes(ids, seed=3)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (14, 3, 3)
    assert set(s["train"]) | set(s["val"]) | set(s["test"]) == set(ids)
    assert not (set(s["train"]) & set(s["val"]) or set(s["train"]) & set(s["test"]) or set(s["val"]) & set(s["test"]))
    assert data.split_volumes(ids, seed=3) == s and data.split_volumes(ids, seed=4) != s
    three = data.split_volumes(["a", "b", "c"], seed=0)
    assert [len(three[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    with pytest.raises(data.DataError, match="at least 3 volumes"):
        data.split_volumes(["a", "b"], seed=0)


@pytest.mark.parametrize("n,k", [(17, 5), (14, 7), (32, 8), (3, 3)])
def test_k_folds_are_disjoint_cover_every_patient_and_test_each_once(n, k):
    """--folds K as sets: in every fold train, val and test are pairwise disjoint and together all patients; the
    validation fold is the next fold's test fold; over the K folds every patient is tested exactly once and
    validates exactly once; fold sizes differ by at most one."""
    ids = [f"p{i:02d}" for i in range(n)]
    splits = [data.split_volumes(ids, seed=1, folds=k, fold=f) for f in range(k)]
    for f, s in enumerate(splits):
        train, val, test = set(s["train"]), set(s["val"]), set(s["test"])
        assert not (train & val or train & test or val & test), f
        assert train | val | test == set(ids) and train, f
        assert val == set(splits[(f + 1) % k]["test"]), f
    tested = [p for s in splits for p in s["test"]]
    assert sorted(tested) == ids and sorted(p for s in splits for p in s["val"]) == ids
    assert max(map(len, (s["test"] for s in splits))) - min(map(len, (s["test"] for s in splits))) <= 1


def test_site_is_read_from_brats_2018_names_only():
    assert [data.site_of(v) for v in ("Brats18_CBICA_AOP_1", "Brats18_2013_11_1", "Brats17_TCIA10_628_1",
                                      "BraTS20_Training_001", "volume_41")] == ["CBICA", "2013", "TCIA10", "", ""]


def test_k_folds_are_stratified_by_site():
    """Three sites of 8, 4 and 3 cases over 4 folds: the 8 put exactly 2 in every fold, the 4 exactly 1, the 3 one
    in each of three folds; with no site in the names the folds are the unstratified seeded cut."""
    ids = [f"Brats18_CBICA_{i:03d}_1" for i in range(8)] + [f"Brats18_TCIA01_{i}_1" for i in range(4)] + \
          [f"Brats18_2013_{i}_1" for i in range(3)]
    tests = [data.split_volumes(ids, seed=5, folds=4, fold=f)["test"] for f in range(4)]
    for site, per_fold in (("CBICA", [2] * 4), ("TCIA01", [1] * 4)):
        assert [sum(data.site_of(v) == site for v in t) for t in tests] == per_fold, site
    assert sorted(sum(data.site_of(v) == "2013" for v in t) for t in tests) == [0, 1, 1, 1]
    plain = [f"v{i:02d}" for i in range(15)]
    order = [plain[i] for i in np.random.default_rng(5).permutation(15)]
    assert data.split_volumes(plain, seed=5, folds=4, fold=1)["test"] == sorted(order[1::4])


def test_regions_of_a_hand_made_label_map_and_back():
    """One row of labels 0, 2, 1, 4, 4: WT is the four tumour voxels, TC the core and enhancing ones, ET the two
    enhancing ones; the label map rebuilt from the three masks is the original; an ET voxel predicted outside TC and
    WT widens both (it is labelled 4), a TC voxel outside WT widens WT (labelled 1)."""
    label = np.array([[[0, 2, 1, 4, 4]]], np.uint8)
    masks = data.region_masks(label, ("wt", "tc", "et"))
    assert masks.shape == (1, 3, 1, 5)
    assert masks[0, :, 0].astype(int).tolist() == [[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    np.testing.assert_array_equal(data.labels_from_regions(masks, ("wt", "tc", "et")), label)
    assert data.region_masks(torch.from_numpy(label), ["et", "wt"])[0, :, 0].int().tolist() == [[0, 0, 0, 1, 1],
                                                                                              [0, 1, 1, 1, 1]]
    loose = np.zeros((1, 3, 1, 3), bool)
    loose[0, 2, 0, 0] = loose[0, 1, 0, 1] = loose[0, 0, 0, 2] = True  # ET alone, TC alone, WT alone
    assert data.labels_from_regions(loose, ("wt", "tc", "et"))[0, 0].tolist() == [4, 1, 2]
    assert data.labels_from_regions(loose[:, ::-1], ("et", "tc", "wt"))[0, 0].tolist() == [4, 1, 2]  # any order


def test_synthetic_goes_through_the_h5_layout_and_the_cache_round_trips(tmp_path):
    cache = data.prepare("synthetic:3x8", 32, tmp_path, crop_to_brain=False)
    h5 = sorted((tmp_path / "synthetic-v1-3x8" / "BraTS2020_training_data" / "content" / "data").glob("*.h5"))
    assert len(h5) == 24
    assert cache.volume_ids == ["1", "2", "3"]
    # the cache holds exactly what preprocessing gives on the raw volume
    image, label = data.read_h5_volume(data.list_h5(tmp_path / "synthetic-v1-3x8")["2"])
    keep, images, box = data.preprocess_volume(image, 32, crop_to_brain=False)
    meta = cache.volume("2")
    assert meta["slices"] == keep.tolist() and meta["depth"] == 8 and meta["dropped"] == 8 - len(keep)
    np.testing.assert_array_equal(cache.images("2"), images)
    np.testing.assert_array_equal(cache.full_labels("2"), label[keep])
    assert cache.images("2").dtype == np.float16 and cache.masks("2").dtype == np.uint8
    assert cache.masks("2").shape == (len(keep), 32, 32)
    assert set(np.unique(label)) <= {0, 1, 2, 4} and {1, 2, 4} <= set(np.unique(label))
    assert not list(cache.root.glob(".tmp*"))


def test_cache_is_reused_and_keyed_by_size(tmp_path, monkeypatch):
    first = data.prepare("synthetic:3x4", 16, tmp_path)
    stamp = (first.root / "meta.json").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(data, "preprocess_volume", boom)
    t = time.perf_counter()
    again = data.prepare("synthetic:3x4", 16, tmp_path)
    assert time.perf_counter() - t < 2
    assert again.root == first.root and (again.root / "meta.json").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    other = data.prepare("synthetic:3x4", 24, tmp_path)
    assert other.root != first.root and other.meta["size"] == 24


def test_load_slices_and_batches(tmp_path):
    cache = data.prepare("synthetic:3x6", 16, tmp_path)
    ids = cache.volume_ids
    s = feed.load_slices(cache, ids, [0], device="cpu")
    n = sum(len(cache.volume(v)["slices"]) for v in ids)
    assert s.images.shape == (n, 1, 16, 16) and s.images.dtype == torch.float16 and s.masks.shape == (n, 16, 16)
    assert s.volume.tolist() == sum(([i] * len(cache.volume(v)["slices"]) for i, v in enumerate(ids)), [])
    np.testing.assert_array_equal(s.images[:, 0].numpy(), np.concatenate([cache.images(v)[:, 0] for v in ids]))
    batches = list(feed.TrainBatches(cache, ids, [0], "cpu", 4).epoch(1))
    assert len(batches) == n // 4 and all(x.shape == (4, 1, 16, 16) and y.shape == (4, 1, 16, 16) for x, y in batches)


def test_augment_moves_image_and_mask_together():
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(16, 1, 24, 24, generator=g) > 0.7).float()
    x = torch.cat([y * 3.0, y * 3.0], 1)  # image is a copy of the mask: geometry must stay aligned
    xa, ya = feed.augment(x, y.to(torch.uint8), g)
    assert ((xa[:, :1] != 0) == (ya > 0.5)).all()
    assert not torch.equal(ya, y.to(torch.uint8))  # something moved
    assert ya.dtype == torch.uint8 and set(torch.unique(ya).tolist()) <= {0, 1}


@pytest.mark.parametrize("spec,message", [
    ("dropbox:x", "unknown --data source"),
    ("h5:", "needs a folder"),
    ("synthetic:lots", "VOLUMESxSLICES"),
])
def test_bad_source_specs(spec, message, tmp_path):
    with pytest.raises(data.DataError, match=message):
        data.prepare(spec, 32, tmp_path)


def test_bad_h5_inputs_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (2, 240, 240, 4)).astype(np.float32)
    label = np.zeros((2, 240, 240), np.uint8)
    good = tmp_path / "good"
    write_h5_slices(good, 1, image, label, range(2))

    corrupt = tmp_path / "corrupt"
    write_h5_slices(corrupt, 1, image, label, range(2))
    (corrupt / "volume_1_slice_1.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(data.DataError, match="volume_1_slice_1.h5"):
        data.read_h5_volume(data.list_h5(corrupt)["1"])

    wrong = tmp_path / "wrong"
    write_h5_slices(wrong, 1, image[:, :120, :120], label[:, :120, :120], range(2))
    with pytest.raises(data.DataError, match=r"shape \(120, 120, 4\)"):
        data.read_h5_volume(data.list_h5(wrong)["1"])

    nan = image.copy()
    nan[0, 5, 5, 2] = np.nan
    with pytest.raises(data.DataError, match="NaN"):
        data.normalise_volume(nan)

    with pytest.raises(data.DataError, match="no volume_<V>_slice_<S>.h5"):
        data.list_h5(tmp_path / "good" / "..")
    with pytest.raises(data.DataError, match="not found"):
        data.list_h5(tmp_path / "missing")


def test_bad_nifti_inputs(sample_dir, tmp_path):
    import nibabel as nib

    src = sample_dir / SAMPLE_CASES[0]
    case = tmp_path / "case1"
    case.mkdir()
    for m in ("flair", "t1", "t2"):
        os.symlink(src / f"{SAMPLE_CASES[0]}_{m}.nii.gz", case / f"case1_{m}.nii.gz")
    with pytest.raises(data.DataError, match="missing modality t1ce"):
        data.read_nifti_case(case)
    (case / "case1_t1ce.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(data.DataError, match="case1_t1ce.nii.gz"):
        data.read_nifti_case(case)
    os.remove(case / "case1_t1ce.nii.gz")
    os.symlink(src / f"{SAMPLE_CASES[0]}_t1ce.nii.gz", case / "case1_t1ce.nii.gz")
    seg = nib.load(str(src / f"{SAMPLE_CASES[0]}_seg.nii.gz"))
    bad = np.asarray(seg.dataobj).copy()
    bad[100, 100, 70] = 3
    nib.save(nib.Nifti1Image(bad, seg.affine), str(case / "case1_seg.nii.gz"))
    with pytest.raises(data.DataError, match=r"labels \[3\] outside"):
        data.read_nifti_case(case)
    nib.save(nib.Nifti1Image(bad[:, :, :100], seg.affine), str(case / "case1_seg.nii.gz"))
    with pytest.raises(data.DataError, match="shape"):
        data.read_nifti_case(case)


def test_failed_build_leaves_no_half_written_cache(tmp_path):
    src = tmp_path / "h5"
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (2, 240, 240, 4)).astype(np.float32)
    label = np.zeros((2, 240, 240), np.uint8)
    write_h5_slices(src, 1, image, label, range(2))
    write_h5_slices(src, 2, image, label, range(2))
    (src / "volume_2_slice_0.h5").write_bytes(b"broken")
    with pytest.raises(data.DataError, match="volume_2_slice_0.h5"):
        data.prepare(f"h5:{src}", 16, tmp_path / "cache")
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1
    assert not (built[0] / "meta.json").exists() and not list(built[0].glob(".tmp*"))


def write_small_h5_source(folder, volumes: int, slices: int) -> None:
    rng = np.random.default_rng(1)
    for v in range(1, volumes + 1):
        image, label = data.synthetic_volume(rng, slices)
        write_h5_slices(folder, v, image, label, range(slices))


def test_parallel_build_writes_the_same_cache_as_one_process(tmp_path):
    import resource

    import h5py  # noqa: F401  (importing h5py runs a child process: not to be counted below)

    src = tmp_path / "h5"
    write_small_h5_source(src, volumes=3, slices=6)
    cpu = lambda: resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime  # noqa: E731
    caches, child_seconds = [], []
    for workers in (1, 2):
        before = cpu()
        caches.append(data.prepare(f"h5:{src}", 32, tmp_path / f"cache{workers}", crop_to_brain=True, workers=workers))
        child_seconds.append(cpu() - before)
    one, two = caches
    assert child_seconds[0] == 0 and child_seconds[1] > 0.2  # workers=2 really built in other processes
    assert one.meta == two.meta and one.volume_ids == ["1", "2", "3"] and one.meta["kept"] > 0
    files = sorted(p.name for p in one.root.iterdir())
    assert files == sorted(p.name for p in two.root.iterdir()) and len(files) == 3 * 3 + 1
    for name in files:
        if name.endswith(".npy"):
            a, b = np.load(one.root / name), np.load(two.root / name)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name


def test_an_error_in_a_worker_reaches_the_caller_with_its_message(tmp_path):
    src = tmp_path / "h5"
    write_small_h5_source(src, volumes=3, slices=3)
    (src / "volume_2_slice_1.h5").write_bytes(b"not an hdf5 file")
    messages = []
    for workers in (1, 2):
        with pytest.raises(data.DataError) as caught:
            data.prepare(f"h5:{src}", 16, tmp_path / f"cache{workers}", workers=workers)
        assert caught.value.__cause__ is None  # one line for the user, not the worker's traceback
        messages.append(str(caught.value))
        built = list((tmp_path / f"cache{workers}").iterdir())
        assert len(built) == 1 and not (built[0] / "meta.json").exists() and not list(built[0].glob(".tmp*"))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"cannot read {src / 'volume_2_slice_1.h5'}: OSError")


def bump_mtime(path) -> None:
    """Move a file's modification time one second on, its content untouched."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_a_changed_source_file_rebuilds_the_cache(tmp_path):
    """The cache is keyed by every source file's size and modification time: new content (same size), a new size,
    or only a new mtime each give a new cache, and the new one holds the new content."""
    import h5py

    src = tmp_path / "h5"
    write_small_h5_source(src, volumes=2, slices=3)
    first = data.prepare(f"h5:{src}", 16, tmp_path / "cache")
    target = src / "volume_2_slice_1.h5"
    seen = {first.root}

    with h5py.File(target, "r+") as f:  # content: a patch of FLAIR tripled (z-scores change), same size
        f["image"][100:140, 100:140, 0] = f["image"][100:140, 100:140, 0] * 3
    bump_mtime(target)
    changed = data.prepare(f"h5:{src}", 16, tmp_path / "cache")
    assert changed.root not in seen
    seen.add(changed.root)
    assert not np.array_equal(changed.images("2"), first.images("2"))  # rebuilt from the new content
    np.testing.assert_array_equal(changed.images("1"), first.images("1"))
    # mtime only
    bump_mtime(target)
    touched = data.prepare(f"h5:{src}", 16, tmp_path / "cache")
    assert touched.root not in seen
    seen.add(touched.root)
    # size: rewritten with compression
    with h5py.File(target, "r") as f:
        image, mask = f["image"][()], f["mask"][()]
    target.unlink()
    with h5py.File(target, "w") as f:
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("mask", data=mask)
    resized = data.prepare(f"h5:{src}", 16, tmp_path / "cache")
    assert resized.root not in seen
    assert data.prepare(f"h5:{src}", 16, tmp_path / "cache").root == resized.root  # unchanged: reused

