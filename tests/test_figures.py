"""Figures: the overlay's documented colours on a known layout, outlines where the masks are, PNGs that open."""
from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

import figures


def test_overlay_colours_of_a_known_layout():
    """Background (0) is black before blending, so a marked pixel is exactly OVERLAY_ALPHA x its colour; a brain
    pixel with no mark stays grey."""
    image = np.zeros((4, 4), np.float32)
    image[3] = np.linspace(1, 2, 4)  # brain in the last row
    pred = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), bool)
    pred[0, 0] = truth[0, 0] = True   # true positive
    pred[0, 1] = True                 # false positive
    truth[0, 2] = True                # false negative
    rgb = figures.overlay(image, pred, truth)
    a = figures.OVERLAY_ALPHA
    assert rgb.shape == (4, 4, 3)
    np.testing.assert_allclose(rgb[0, 0], [0, a, 0])  # green
    np.testing.assert_allclose(rgb[0, 1], [a, 0, 0])  # red
    np.testing.assert_allclose(rgb[0, 2], [0, 0.4 * a, a])  # blue
    np.testing.assert_allclose(rgb[1, 1], [0, 0, 0])  # background, unmarked
    assert np.allclose(rgb[3, :, 0], rgb[3, :, 1]) and np.allclose(rgb[3, :, 1], rgb[3, :, 2])  # grey brain
    assert rgb[3, 3, 0] > rgb[3, 0, 0]  # brighter scan, brighter grey


def test_curves_mark_the_epoch_kept_not_the_best_validation_epoch(monkeypatch, tmp_path):
    """--select last keeps epoch 4 while validation Dice peaked at epoch 2: the dashed line is at 4."""
    saved = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: saved.append(fig))
    log = [{"epoch": e, "lr": 1e-3, **{f"{s}_{k}": v for s in ("train", "val") for k in ("loss", "dice", "iou")},
            "val_dice": d} for e, d, v in ((1, 0.5, 0.4), (2, 0.9, 0.5), (3, 0.7, 0.6), (4, 0.8, 0.7))]
    figures.plot_curves(log, tmp_path / "curves.png", kept_epoch=4)
    dashed = [line.get_xdata() for line in saved[0].axes[1].lines if line.get_linestyle() == "--"]
    figures.pyplot().close(saved[0])
    assert len(dashed) == 1 and list(dashed[0]) == [4, 4]


def test_outline_follows_the_mask_boundary():
    plt = figures.pyplot()
    mask = np.zeros((30, 40), bool)
    mask[10:20, 5:15] = True  # rows 10..19, columns 5..14
    fig, ax = plt.subplots()
    figures.draw_outline(ax, mask, "lime")
    points = np.concatenate([line.get_xydata() for line in ax.lines])  # (x = column, y = row)
    plt.close(fig)
    assert points[:, 0].min() == 5 and points[:, 0].max() == 14 and points[:, 1].min() == 10 and points[:, 1].max() == 19
    on_edge = (np.isin(points[:, 0], [5, 14])) | (np.isin(points[:, 1], [10, 19]))
    assert on_edge.all()


def colour_pixels(png: np.ndarray, rgb: tuple[float, float, float]) -> int:
    return int((np.abs(png[..., :3] - np.array(rgb)).max(-1) < 0.15).sum())


@pytest.mark.parametrize("with_truth", [True, False])
def test_montage_draws_the_prediction_red_and_the_label_lime(tmp_path, with_truth):
    flair = np.zeros((6, 64, 64), np.float32)
    flair[:, 8:56, 8:56] = 1.0
    pred = np.zeros((6, 64, 64), bool)
    pred[2:4, 20:40, 20:40] = True
    truth = np.zeros_like(pred)
    truth[2:5, 25:45, 25:45] = True
    path = tmp_path / "m.png"
    figures.write_montage(flair, pred[:, None], truth[:, None] if with_truth else None, path, "title")
    png = matplotlib.image.imread(path)
    assert png.ndim == 3 and not list(tmp_path.glob(".tmp*"))
    assert colour_pixels(png, (1, 0, 0)) > 50  # the red outline (plus its legend line)
    lime = colour_pixels(png, (0, 1, 0))
    assert lime > 50 if with_truth else lime == 0


def test_picks_put_each_volume_s_largest_tumour_slice_first():
    records = [{"volume": v, "slice": z, "dice": d, "area": a} for v, z, d, a in
               [("a", 0, 0.5, 10), ("a", 1, 0.9, 30), ("a", 2, float("nan"), 0), ("b", 0, 0.1, 50), ("b", 1, 0.7, 5)]]
    picks = figures.pick_overview(records, n=3)
    assert [(r["volume"], r["slice"]) for r in picks[:2]] == [("a", 1), ("b", 0)] and len(picks) == 3


def test_montage_of_regions_draws_each_region_in_its_colour(tmp_path):
    """Three nested predicted regions: the WT outline lime, TC red, ET yellow, each over enough pixels to be a drawn
    outline and not only its legend line."""
    flair = np.zeros((4, 96, 96), np.float32)
    flair[:, 4:92, 4:92] = 1.0
    pred = np.zeros((4, 3, 96, 96), bool)
    pred[1, 0, 10:80, 10:80] = pred[1, 1, 25:65, 25:65] = pred[1, 2, 40:50, 40:50] = True
    path = tmp_path / "r.png"
    figures.write_montage(flair, pred, None, path, "regions", ["wt", "tc", "et"])
    png = matplotlib.image.imread(path)
    for colour in ((0, 1, 0), (1, 0, 0), (1, 1, 0)):
        assert colour_pixels(png, colour) > 60, colour


def test_label_overlay_colours_each_label():
    """A uniform scan is black after the 1-99% window; each label is its colour at OVERLAY_ALPHA over it."""
    image = np.ones((4, 4), np.float32)
    label = np.array([[0, 1, 2, 4]] * 4, np.uint8)
    rgb = figures.label_overlay(image, label)
    for k, colour in {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.1), 4: (1.0, 0.85, 0.0)}.items():
        np.testing.assert_allclose(rgb[0, list(label[0]).index(k)], figures.OVERLAY_ALPHA * np.array(colour), atol=1e-6)
    assert rgb[0, 0].tolist() == [0.0, 0.0, 0.0]


def test_worst_slices_are_the_most_wrong_at_most_two_a_patient():
    """Ranked by wrong pixels of the region asked: patient a's three bad slices give only its two worst; a slice
    without the region but with false positives counts; slices with nothing wrong are never picked."""
    rows = [("a", 0, 90, 0), ("a", 1, 80, 5), ("a", 2, 85, 0), ("b", 0, 10, 40), ("b", 1, 0, 0), ("c", 0, 50, 0)]
    records = [{"volume": v, "slice": z, "wrong_wt": w, "wrong_et": e} for v, z, w, e in rows]
    assert [(r["volume"], r["slice"]) for r in figures.pick_worst(records)] == [("a", 0), ("a", 2), ("c", 0), ("b", 0)]
    assert [(r["volume"], r["slice"]) for r in figures.pick_worst(records, n=2)] == [("a", 0), ("a", 2)]
    assert [(r["volume"], r["slice"]) for r in figures.pick_worst(records, region="et")] == [("b", 0), ("a", 1)]
    assert [(r["volume"], r["slice"]) for r in figures.pick_worst(records, per_volume=1)] == [("a", 0), ("c", 0), ("b", 0)]
