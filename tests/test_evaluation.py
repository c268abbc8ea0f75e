"""Evaluation on hand-made inputs whose answers are computed by hand: inference.evaluate (test metrics),
train.validate (per-volume validation Dice), inference.choose_postprocessing, and the connectivity of the
post-processing."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import data
import feed
import inference
import metrics
import train


def square(shape, rows, cols) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[rows, cols] = True
    return m


@pytest.fixture
def two_volumes(tmp_path) -> data.Cache:
    """Volume A: 4 slices, slices 1 and 2 kept; slice 1 holds a 10 x 10 tumour, slice 2 none.
    Volume B: 1 slice, a 20 x 20 tumour."""
    f = (data.RAW_SIZE, data.RAW_SIZE)
    full = {"A": np.stack([square(f, slice(100, 110), slice(100, 110)), np.zeros(f, bool)]),
            "B": square(f, slice(50, 70), slice(50, 70))[None]}
    for vid, m in full.items():
        np.save(tmp_path / f"full_{vid}.npy", m.astype(np.uint8))
    meta = {"size": 32, "volumes": [
        {"id": "A", "depth": 4, "slices": [1, 2], "box": [0, 0, 240], "spacing": [1.0, 1.0, 1.0]},
        {"id": "B", "depth": 1, "slices": [0], "box": [0, 0, 240], "spacing": [1.0, 1.0, 1.0]}]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return data.Cache(tmp_path, meta)


def test_evaluate_by_hand(two_volumes):
    f = (data.RAW_SIZE, data.RAW_SIZE)
    probs = {  # after thresholding at 0.5: A slice 1 finds half the tumour (10 x 5), A slice 2 a 3 x 3 false positive
        "A": np.stack([square(f, slice(100, 110), slice(100, 105)), square(f, slice(10, 13), slice(10, 13))]).astype(np.float16),
        "B": square(f, slice(50, 70), slice(50, 70))[None].astype(np.float16),
    }
    probs = {v: p[:, None] for v, p in probs.items()}  # one region: the whole tumour
    summary, records, masks = inference.evaluate(probs, two_volumes, {"wt": dict(inference.UNCHOSEN)}, ["wt"])
    a, b = summary["per_volume"]
    # A: |P| = 50 + 9, |T| = 100, |P∩T| = 50 → Dice 100 / 159, IoU 50 / 109 (the volume's, not its slices' mean)
    assert a["dice"] == pytest.approx(100 / 159, abs=1e-6) and a["iou"] == pytest.approx(50 / 109, abs=1e-6)
    assert b["dice"] == 1.0 and b["iou"] == 1.0 and b["hd95_mm"] == 0.0 and b["tumour_voxels"] == 400
    assert a["hd95_mm"] > 0 and a["tumour_voxels"] == 100
    assert summary["volume_dice"] == pytest.approx((100 / 159 + 1) / 2, abs=1e-6)
    assert summary["volume_dice_min"] == pytest.approx(100 / 159, abs=1e-6)
    assert summary["slice_dice"] == pytest.approx((100 / 150 + 1) / 2, abs=1e-6)  # tumour slices only
    assert summary["tumour_slices"] == 2 and summary["empty_slices"] == 1 and summary["false_positive_slices"] == 1
    assert [(r["volume"], r["slice"]) for r in records] == [("A", 1), ("A", 2), ("B", 0)]
    assert [r["area"] for r in records] == [100, 0, 400]  # the true tumour's pixels of each slice
    assert math.isnan(records[1]["dice"]) and masks["A"].sum() == 59
    assert [r["wrong_wt"] for r in records] == [50, 9, 0]  # A: the 50 missed; the 3 x 3 false positive; B: none


def test_validation_dice_is_the_mean_over_volumes_not_pooled(tmp_path):
    """Volume 0: predicted exactly (Dice 1); volume 1: 300 pixels predicted around 100 true ones (Dice 0.5).
    Per volume: 0.75; pooled over both: 400 / 600."""
    images = torch.zeros(2, 1, 32, 32, dtype=torch.float16)
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    masks[0, :10, :10] = masks[1, :10, :10] = 1
    images[0, 0, :10, :10] = 1
    images[1, 0, :10, :30] = 1
    val = feed.SliceSet(images, masks, torch.tensor([0, 1]), ["v0", "v1"], feed.context_index([1, 1], 0))

    class Marked(torch.nn.Module):  # logit 0.3 where the image is marked: probability 0.57, tumour at threshold 0.5
        def forward(self, x):
            return torch.where(x[:, :1] > 0, 0.3, -10.0)

    run = train.Run(torch.device("cpu"), inference.Speed(None, False, False), tmp_path)
    out = train.validate(Marked(), val, train.TrainConfig(), run, batch_size=1)
    assert out["val_dice"] == pytest.approx(0.75) and out["val_iou"] == pytest.approx((1 + 1 / 3) / 2)


def test_choose_postprocessing_finds_the_known_best():
    """Truth: a tumour over slices 1-3 (areas 150, 400, 150). Probabilities: the tumour at 0.55, a rim around its
    middle slice at 0.45, a 20-pixel speck at 0.65, a separate 300-pixel blob at 0.55 on slice 4.
    Threshold 0.3/0.4 keeps the rim (joined to the tumour), 0.6/0.7 loses the tumour: 0.5. A minimum component of
    25 drops the speck and keeps every tumour slice (200 would drop its 150-pixel ends): 25. The blob survives
    both; only the largest 3D component removes it, which makes the Dice 1."""
    shape = (5, 64, 64)
    truth = np.zeros(shape, bool)
    truth[1, 10:20, 10:25] = truth[3, 10:20, 10:25] = True
    truth[2, 5:25, 5:25] = True
    probs = np.zeros(shape, np.float32)
    probs[2, 4:26, 4:26] = 0.45
    probs[truth] = 0.55
    probs[2, 50:54, 50:55] = 0.65
    probs[4, 40:55, 40:60] = 0.55
    post, dice = inference.choose_postprocessing({"v": probs}, {"v": truth.astype(np.uint8)})
    assert post == {"threshold": 0.5, "min_component": 25, "largest_3d": True, "min_volume": 0} and dice == pytest.approx(1.0)
    # without the blob the largest-3D rule changes nothing and is not chosen (ties keep the simpler rule)
    probs[4] = 0
    post, dice = inference.choose_postprocessing({"v": probs}, {"v": truth.astype(np.uint8)})
    assert post == {"threshold": 0.5, "min_component": 25, "largest_3d": False, "min_volume": 0} and dice == pytest.approx(1.0)


def test_largest_component_is_26_connected():
    """A cube and a smaller cube touching it only at a corner are one 26-connected component (6-connected: two)."""
    m = np.zeros((10, 10, 10), bool)
    m[0:3, 0:3, 0:3] = True  # 27 voxels
    m[3:5, 3:5, 3:5] = True  # 8 voxels, corner to corner with the first
    m[7:9, 7:9, 0:2] = True  # 8 voxels apart
    out = metrics.keep_largest_component(m)
    assert out.sum() == 35 and out[3:5, 3:5, 3:5].all() and not out[7:9, 7:9, 0:2].any()


def test_small_components_are_8_connected_in_2d():
    """A diagonal line of 5 pixels is one 8-connected component of 5 (4-connected: five of 1)."""
    m = np.zeros((1, 8, 8), bool)
    for i in range(5):
        m[0, i, i] = True
    assert metrics.remove_small_components(m, 3).sum() == 5
    assert metrics.remove_small_components(m, 6).sum() == 0


def test_prediction_batches_all_have_one_shape():
    """The last, partial batch is padded to the full batch, so a compiled model never meets a new shape (and the
    padding never reaches the output)."""
    shapes = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            shapes.append(tuple(x.shape))
            return x[:, :1] * 2

    images = torch.arange(7 * 2 * 4 * 4, dtype=torch.float32).reshape(7, 2, 4, 4)
    logits = inference.predict_logits(Recorder(), images, feed.context_index([7], 0), torch.device("cpu"), 3,
                                      inference.Speed(None, False, False))
    assert shapes == [(3, 2, 4, 4)] * 3
    assert torch.equal(logits, images[:, :1] * 2)


def test_evaluate_passes_each_axis_its_own_spacing(tmp_path):
    """A volume of 2 x 1 x 3 mm voxels (x, y, z: the cache's spacing order; slices stacked (z, x, y)) whose
    prediction is the tumour shifted by 1, 2 and 3 voxels along z, x and y: evaluate's HD95 is the brute-force
    float64 one with the spacing in the slices' (z, x, y) order, and differs from every other order of it."""
    import itertools

    from test_metrics import directed_hd95

    f = (data.RAW_SIZE, data.RAW_SIZE)
    full_true = np.zeros((6, *f), bool)
    full_true[1:3] = square(f, slice(100, 110), slice(90, 104))
    full_true[3] = square(f, slice(101, 108), slice(92, 100))
    full_pred = np.roll(full_true, (1, 2, 3), axis=(0, 1, 2))
    np.save(tmp_path / "full_V.npy", full_true[1:5].astype(np.uint8))
    meta = {"size": 32, "volumes": [{"id": "V", "depth": 6, "slices": [1, 2, 3, 4], "box": [0, 0, 240],
                                     "spacing": [2.0, 1.0, 3.0]}]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    summary, _, _ = inference.evaluate({"V": full_pred[1:5, None].astype(np.float16)}, data.Cache(tmp_path, meta),
                                       {"wt": dict(inference.UNCHOSEN)}, ["wt"])

    def brute(spacing):
        return max(directed_hd95(full_pred, full_true, spacing), directed_hd95(full_true, full_pred, spacing))

    expected = brute((3.0, 2.0, 1.0))  # (z_mm, x_mm, y_mm)
    assert summary["per_volume"][0]["hd95_mm"] == pytest.approx(expected)
    others = [s for s in itertools.permutations((2.0, 1.0, 3.0)) if s != (3.0, 2.0, 1.0)] + [(1.0, 1.0, 1.0)]
    assert all(abs(brute(s) - expected) > 0.1 for s in others), [(s, brute(s)) for s in others]


def test_postprocess_threshold_keeps_probabilities_equal_to_it():
    """A pixel whose probability is exactly the threshold is tumour (probability >= threshold), one below is not."""
    probs = np.array([[[0.5, 0.4995, 0.75]]], np.float32)
    assert inference.postprocess(probs, 0.5, 0).tolist() == [[[True, False, True]]]


@pytest.fixture
def labelled(tmp_path) -> data.Cache:
    """Volume P: one slice, oedema (2) in rows 0-19, core (1) in rows 20-29, enhancing (4) in rows 30-39 (columns
    0-9 each: 200, 100, 100 voxels). Volume Q: one slice, oedema only (rows 0-9, 100 voxels): no core, no ET."""
    f = (data.RAW_SIZE, data.RAW_SIZE)
    p, q = np.zeros((1, *f), np.uint8), np.zeros((1, *f), np.uint8)
    p[0, 0:20, 0:10], p[0, 20:30, 0:10], p[0, 30:40, 0:10] = 2, 1, 4
    q[0, 0:10, 0:10] = 2
    np.save(tmp_path / "full_P.npy", p)
    np.save(tmp_path / "full_Q.npy", q)
    meta = {"size": 32, "volumes": [{"id": v, "depth": 1, "slices": [0], "box": [0, 0, 240], "spacing": [1.0, 1.0, 1.0]}
                                    for v in ("P", "Q")]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return data.Cache(tmp_path, meta)


def test_evaluate_regions_by_hand_with_the_brats_empty_conventions(labelled):
    """P: WT predicted exactly, TC over rows 20-34 (the core and half the ET: Dice 2 * 150 / 350), ET over rows
    35-44 (half of it, plus 50 voxels of oedema; nesting adds those 50 to TC too: TC 150 + 50 predicted against 200).
    Q: WT exact, no TC predicted (Dice 1, HD95 0: absent in both), an ET speck of 4 voxels (absent from the label:
    Dice 0, HD95 the diagonal). A TC speck outside WT in Q widens WT (labelled 1): WT Dice 200 / 204."""
    f = (data.RAW_SIZE, data.RAW_SIZE)
    probs = {"P": np.zeros((1, 3, *f), np.float16), "Q": np.zeros((1, 3, *f), np.float16)}
    probs["P"][0, 0, 0:40, 0:10] = 0.9
    probs["P"][0, 1, 20:35, 0:10] = 0.9
    probs["P"][0, 2, 35:45, 0:10] = 0.9
    probs["Q"][0, 0, 0:10, 0:10] = 0.9
    probs["Q"][0, 2, 5:7, 5:7] = 0.9
    probs["Q"][0, 1, 100:102, 100:102] = 0.9  # TC outside WT: 4 voxels
    post = {r: dict(inference.UNCHOSEN) for r in ("wt", "tc", "et")}
    summary, records, masks = inference.evaluate(probs, labelled, post, ["wt", "tc", "et"])
    p, q = (v["regions"] for v in summary["per_volume"])
    # P: ET pred rows 35-44 (100), true rows 30-39 (100), overlap rows 35-39 (50): Dice 0.5. WT pred widened by the
    # ET rows 40-44 (50): 450 vs 400, overlap 400. TC pred rows 20-44 (250) vs 200, overlap 200.
    assert p["et"]["dice"] == pytest.approx(0.5) and p["wt"]["dice"] == pytest.approx(800 / 850)
    assert p["tc"]["dice"] == pytest.approx(400 / 450) and p["tc"]["voxels"] == 200 and p["tc"]["predicted_voxels"] == 250
    # Q: TC predicted 4 + the ET speck's 4 (nested) against none: 0 and the diagonal; ET speck: 0 and the diagonal
    diagonal = math.sqrt(1 + 240 ** 2 + 240 ** 2)
    assert q["et"] == {"dice": 0.0, "iou": 0.0, "hd95_mm": pytest.approx(diagonal), "voxels": 0, "predicted_voxels": 4}
    assert q["tc"]["dice"] == 0.0 and q["tc"]["predicted_voxels"] == 8
    assert q["wt"]["dice"] == pytest.approx(200 / 204)
    assert summary["regions"]["et"]["dice"] == pytest.approx(0.25) and summary["regions"]["et"]["dice_min"] == 0.0
    assert summary["volume_dice"] == summary["regions"]["wt"]["dice"]
    assert masks["P"].shape == (1, 3, 240, 240) and records[0]["dice_et"] == pytest.approx(0.5)
    assert math.isnan(records[1]["dice_et"]) and records[1]["area_tc"] == 0
    # wrong pixels (false positives + false negatives) of the nested masks: P's 50 extra WT, 50 extra TC, ET 50 + 50
    assert [[r[f"wrong_{k}"] for k in ("wt", "tc", "et")] for r in records] == [[50, 50, 100], [4, 8, 4]]
    # with nothing predicted in Q's TC and ET, both regions are absent in both: Dice 1, HD95 0
    probs["Q"][0, 1:] = 0
    q = inference.evaluate(probs, labelled, post, ["wt", "tc", "et"])[0]["per_volume"][1]["regions"]
    assert q["et"]["dice"] == q["tc"]["dice"] == 1.0 and q["et"]["hd95_mm"] == 0.0


def test_min_volume_is_chosen_on_the_patients_without_the_region():
    """Validation: Q has no ET but a 60-voxel ET speck is predicted; P has a 300-voxel ET predicted exactly. A
    minimum volume of 0 or 50 keeps the speck (mean Dice (1 + 0) / 2); 100 removes it and keeps P's (mean 1); 1000
    would remove P's too. The smallest best: 100."""
    f = (4, 32, 32)
    truth = {"P": np.zeros(f, bool), "Q": np.zeros(f, bool)}
    truth["P"][0:3, 0:10, 0:10] = True
    probs = {"P": truth["P"].astype(np.float32), "Q": np.zeros(f, np.float32)}
    probs["Q"][0:3, 20:24, 20:25] = 0.9  # 60 voxels
    volume, dice = inference.choose_min_volume(probs, truth, dict(inference.UNCHOSEN))
    assert (volume, dice) == (100, 1.0)
    truth["Q"][0:3, 20:24, 20:25] = True  # the speck is real: removing anything only loses
    assert inference.choose_min_volume(probs, truth, dict(inference.UNCHOSEN)) == (0, 1.0)


def test_region_post_processing_is_chosen_on_the_nested_masks_that_are_evaluated():
    """One slice: WT is rows 0-9 (label 2 in rows 0-1, TC = label 1 in rows 2-9), no ET. TC is predicted exactly
    (0.9). WT's own output: rows 0-1 at 0.9, rows 2-9 at 0.35 and a 120-pixel false blob at 0.35. Alone, WT's best
    threshold is 0.3 (Dice 2 * 100 / (220 + 100) = 0.625; 0.4 keeps 20 pixels: 0.333). Nested, TC's 80 pixels join
    WT, so 0.4 gives rows 0-9 exactly: Dice 1, which is what the evaluation (postprocess_regions) then scores."""
    labels = np.zeros((1, 32, 32), np.uint8)
    labels[0, 0:2, 0:10], labels[0, 2:10, 0:10] = 2, 1
    probs = np.zeros((1, 3, 32, 32), np.float32)
    probs[0, 0, 0:2, 0:10], probs[0, 0, 2:10, 0:10], probs[0, 0, 20:32, 0:10] = 0.9, 0.35, 0.35
    probs[0, 1, 2:10, 0:10] = 0.9
    wt_alone, dice_alone = inference.choose_postprocessing({"v": probs[:, 0]}, {"v": labels > 0})
    assert wt_alone["threshold"] == 0.3 and dice_alone == pytest.approx(0.625)
    regions = ["wt", "tc", "et"]
    post, dice = inference.choose_region_postprocessing({"v": probs}, {"v": labels}, regions)
    assert list(post) == regions and post["wt"]["threshold"] == 0.4
    assert dice == {"wt": pytest.approx(1.0), "tc": pytest.approx(1.0), "et": 1.0}
    # WT predicted exactly and holding TC: the inner pixels count once, every rule scores 1, the simplest wins
    probs[0, 0, 0:10, 0:10], probs[0, 0, 20:32] = 0.9, 0
    tc = {"v": data.region_masks(labels, ["tc"])[:, 0]}
    assert inference.choose_postprocessing({"v": probs[:, 0]}, {"v": labels > 0}, tc) == (dict(inference.UNCHOSEN, threshold=0.3), 1.0)
    evaluated = inference.postprocess_regions(probs, regions, post)
    assert [metrics.region_dice(evaluated[:, i], data.region_masks(labels, [r])[:, 0]) for i, r in enumerate(regions)] \
        == [pytest.approx(1.0)] * 3


def test_postprocess_removes_a_region_under_its_minimum_volume():
    probs = np.zeros((2, 8, 8), np.float32)
    probs[0, :3, :3] = probs[1, :2, :2] = 0.9  # 13 voxels
    assert inference.postprocess(probs, 0.5, 0, min_volume=13).sum() == 13
    assert inference.postprocess(probs, 0.5, 0, min_volume=14).sum() == 0


def test_validation_dice_of_regions_is_the_mean_over_volumes_and_regions(tmp_path):
    """One volume, labels 2 (rows 0-9) and 4 (rows 10-14), 10 columns: TC is the 50 ET voxels. The model predicts
    WT exactly, TC as rows 5-14 (100 voxels: Dice 2 * 50 / 150 = 2/3) and ET as rows 10-14 (exact): val Dice
    (1 + 2/3 + 1) / 3, each region's logged."""
    masks = torch.zeros(1, 32, 32, dtype=torch.uint8)
    masks[0, 0:10, 0:10], masks[0, 10:15, 0:10] = 2, 4
    val = feed.SliceSet(torch.zeros(1, 1, 32, 32, dtype=torch.float16), masks, torch.tensor([0]), ["v"],
                        feed.context_index([1], 0))

    class Fixed(torch.nn.Module):
        def forward(self, x):
            out = torch.full((x.shape[0], 3, 32, 32), -10.0)
            out[:, 0, 0:15, 0:10] = out[:, 1, 5:15, 0:10] = out[:, 2, 10:15, 0:10] = 10.0
            return out

    run = train.Run(torch.device("cpu"), inference.Speed(None, False, False), tmp_path)
    out = train.validate(Fixed(), val, train.TrainConfig(target="regions"), run, batch_size=1)
    assert out["val_dice"] == pytest.approx(8 / 9) and out["val_dice_tc"] == pytest.approx(2 / 3)
    assert out["val_dice_wt"] == out["val_dice_et"] == pytest.approx(1.0)
