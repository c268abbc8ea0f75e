"""predict.py end to end on the real BraTS sample, with a checkpoint trained for a few steps on synthetic data."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

import data
import feed
import inference
import predict
import train
from conftest import SAMPLE

GOOD = "Brats18_2013_11_1"  # has a _seg file
OTHER = "Brats18_2013_3_1"  # copied without its t1ce


@pytest.fixture
def sample() -> Path:
    if not (SAMPLE / GOOD).is_dir():
        pytest.skip(f"real BraTS sample not found at {SAMPLE} (it lives in shared/, next to the repository)")
    return SAMPLE


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def mixed_run(ckpt, tmp_path_factory) -> SimpleNamespace:
    """One predict.py run (it is the slow part: ~8 s a case) on a copy of OTHER without its t1ce, then GOOD."""
    if not (SAMPLE / GOOD).is_dir() or not (SAMPLE / OTHER).is_dir():
        pytest.skip(f"real BraTS sample not found at {SAMPLE} (it lives in shared/, next to the repository)")
    tmp = tmp_path_factory.mktemp("mixed")
    bad = tmp / "cases" / OTHER
    bad.mkdir(parents=True)
    for f in (SAMPLE / OTHER).iterdir():
        if "_t1ce." not in f.name:
            (bad / f.name).symlink_to(f)
    out, stdout, stderr = tmp / "out", io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = predict.cli(["--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", str(bad), str(SAMPLE / GOOD)])
    return SimpleNamespace(rc=rc, out=out, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def test_real_case_writes_mask_png_and_metrics(mixed_run):
    out = mixed_run.out
    flair = nib.load(str(SAMPLE / GOOD / f"{GOOD}_flair.nii.gz"))
    mask = nib.load(str(out / f"{GOOD}.nii.gz"))
    values = np.asarray(mask.dataobj)
    assert mask.shape == flair.shape == (240, 240, 155)
    assert np.allclose(mask.affine, flair.affine)
    assert mask.get_data_dtype() == np.uint8 and values.dtype == np.uint8
    assert set(np.unique(values).tolist()) <= {0, 1}
    import matplotlib.image

    png = matplotlib.image.imread(str(out / f"{GOOD}.png"))
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100
    assert sorted(p.name for p in out.iterdir()) == [f"{GOOD}.nii.gz", f"{GOOD}.png"]  # no temporary files left
    assert f"{GOOD}.nii.gz" in mixed_run.stdout and " mL" in mixed_run.stdout
    assert "Dice" in mixed_run.stdout and "IoU" in mixed_run.stdout and "HD95" in mixed_run.stdout


def test_missing_modality_fails_that_case_only(mixed_run):
    assert mixed_run.rc == 1
    lines = nonempty_lines(mixed_run.stderr)
    assert len(lines) == 1, mixed_run.stderr
    assert OTHER in lines[0] and "t1ce" in lines[0] and "Traceback" not in mixed_run.stderr
    assert (mixed_run.out / f"{GOOD}.nii.gz").is_file() and (mixed_run.out / f"{GOOD}.png").is_file()
    assert not (mixed_run.out / f"{OTHER}.nii.gz").exists()
    assert "1 of 2 cases failed" in mixed_run.stdout


def test_a_case_that_fails_late_leaves_none_of_its_files_and_the_next_case_runs(ckpt, sample, tmp_path, monkeypatch,
                                                                                capsys):
    """A montage that fails with an error predict.py does not know (ValueError) after the case's mask was written:
    that case fails with one line and leaves no file; the case after it is written in full."""
    import figures

    real = figures.write_montage

    def montage(flair, pred, truth, path, *rest):
        if GOOD in path.name:
            assert (tmp_path / "out" / f"{GOOD}.nii.gz").is_file()  # the mask is on disk when the montage fails
            raise ValueError("montage broke")
        return real(flair, pred, truth, path, *rest)

    monkeypatch.setattr(figures, "write_montage", montage)
    out = tmp_path / "out"
    rc = predict.cli(["--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", str(sample / GOOD), str(sample / OTHER)])
    err = nonempty_lines(capsys.readouterr().err)
    assert rc == 1
    assert err == [f"predict.py: error: case {GOOD} failed: {sample / GOOD}: ValueError: montage broke"]
    assert sorted(p.name for p in out.iterdir()) == [f"{OTHER}.nii.gz", f"{OTHER}.png"]


def test_mask_orientation_post_processing_and_channels_with_an_oracle(ckpt, sample, tmp_path, monkeypatch, capsys):
    """Logits that reproduce the label, plus three decoys each removed by one of the checkpoint's non-default
    post-processing settings: a soft ring around the tumour at logit 0.8 (sigmoid 0.69: under threshold 0.7, over it
    without the sigmoid; joined to the tumour, so no other rule removes it), a 16-pixel speck (minimum component 25)
    and a 1,600-pixel blob on a tumour-free slice (largest 3D component). The written mask must equal seg > 0 after
    the same post-processing done here with scipy, voxel for voxel (slice placement, the (z, x, y) → (x, y, z)
    transpose, every setting honoured), and the model must get the checkpoint's channels in its order."""
    from scipy import ndimage

    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    raw.update(post={"wt": {"threshold": 0.7, "min_component": 25, "largest_3d": True, "min_volume": 0}}, channels=[2, 0])
    oracle_ckpt = tmp_path / "oracle.pt"
    torch.save(raw, oracle_ckpt)
    seg = np.asarray(nib.load(str(sample / GOOD / f"{GOOD}_seg.nii.gz")).dataobj)  # (x, y, z), labels 0, 1, 2, 4
    truth = seg > 0
    kept = {}
    preprocess = data.preprocess_volume

    def spy_preprocess(image, size, crop_to_brain=True):
        kept["slices"], kept["images"], kept["box"] = preprocess(image, size, crop_to_brain)
        return kept["slices"], kept["images"], kept["box"]

    def oracle_logits(model, images, context, device, batch_size, speed):
        assert torch.equal(images, torch.from_numpy(kept["images"][:, [2, 0]])) and context.shape == (len(images), 2 * raw["context"] + 1)
        label = torch.from_numpy(truth.transpose(2, 0, 1)[kept["slices"]])  # (z, x, y) kept slices
        logits = torch.where(label, 20.0, -20.0)
        tumour_z = label.flatten(1).any(1)
        z_speck = int(torch.nonzero(tumour_z)[0, 0]) + 10
        z_blob = int(torch.nonzero(~tumour_z)[3, 0])  # a kept slice without tumour
        for z, xs, ys in ((z_speck, slice(60, 64), slice(180, 184)), (z_blob, slice(60, 100), slice(150, 190))):
            assert not label[z, xs, ys].any()
            logits[z, xs, ys] = 20.0
        z_ring = int(label.flatten(1).sum(1).argmax())  # a soft ring around the tumour's largest slice: joined to
        ring = ndimage.binary_dilation(label[z_ring].numpy(), iterations=3) & ~label[z_ring].numpy()  # it in 3D
        logits[z_ring][torch.from_numpy(ring)] = 0.8
        x0, y0, side = kept["box"]  # logits of the brain's box at full resolution: data.uncrop pastes them as they are
        return logits[:, None, x0:x0 + side, y0:y0 + side]

    monkeypatch.setattr(data, "preprocess_volume", spy_preprocess)
    monkeypatch.setattr(inference, "predict_logits", oracle_logits)
    out = tmp_path / "out"
    rc = predict.cli(["--ckpt", str(oracle_ckpt), "--out", str(out), "--device", "cpu", str(sample / GOOD)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    expected = truth.copy()  # the label's own 2D pieces under 25 pixels go too; then its largest 3D component
    for z in range(expected.shape[2]):
        pieces, n = ndimage.label(expected[:, :, z], structure=np.ones((3, 3)))
        sizes = np.bincount(pieces.ravel())
        expected[:, :, z] &= (sizes >= 25)[pieces]
    pieces, n = ndimage.label(expected, structure=np.ones((3, 3, 3)))
    expected = pieces == np.bincount(pieces.ravel())[1:].argmax() + 1
    assert np.array_equal(np.asarray(nib.load(str(out / f"{GOOD}.nii.gz")).dataobj), expected.astype(np.uint8))
    dice = 2 * (expected & truth).sum() / (expected.sum() + truth.sum())
    assert 0.99 < dice < 1 and f"Dice {dice:.4f}" in captured.out
    assert f"tumour {expected.sum() / 1000:.2f} mL" in captured.out  # 1 mm isotropic voxels
    shares = [f"{k} {name} {100 * (expected & (seg == k)).sum() / (seg == k).sum():.1f}% of {(seg == k).sum() / 1000:.2f} mL"
              for k, name in ((1, "core"), (2, "oedema"), (4, "enhancing"))]
    assert f"{GOOD}: found per label: " + ", ".join(shares) in captured.out


@pytest.mark.parametrize("target", ["wt", "regions"])
def test_predict_reproduces_train_evaluation(sample_subset, tmp_path, target):
    """A model trained on three real cases (4 channels, neighbour slices as context, cropped): predict.py's mask of
    the test patient scores exactly the Dice and IoU that train.py's evaluation wrote for it; with --target regions,
    its label map (values 0, 1, 2, 4 only, in the seg's space) scores each region's Dice exactly too, computed here
    from the two label maps (WT: > 0, TC: 1 or 4, ET: 4; an empty region in both: 1), and its whole tumour is the
    binary mask."""
    run = tmp_path / "run"
    assert train.cli(["--data", f"nifti:{sample_subset}", "--size", "32", "--epochs", "1", "--base", "4", "--depth", "2",
                      "--batch-size", "8", "--context", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
                      "--target", target, "--out", str(run)]) == 0
    row = json.loads((run / "metrics.json").read_text())["test"]["per_volume"][0]
    out = tmp_path / "pred"
    with contextlib.redirect_stdout(io.StringIO()):
        assert predict.cli(["--ckpt", str(run / "best.pt"), "--out", str(out), "--device", "cpu",
                            str(sample_subset / row["id"])]) == 0
    pred = np.asarray(nib.load(str(out / f"{row['id']}.nii.gz")).dataobj).astype(bool)
    seg = np.asarray(nib.load(str(sample_subset / row["id"] / f"{row['id']}_seg.nii.gz")).dataobj)
    truth = seg > 0
    inter, p, t = (pred & truth).sum(), pred.sum(), truth.sum()
    assert 2 * inter / (p + t) == pytest.approx(row["dice"], abs=1e-6) and truth.sum() == row["tumour_voxels"]
    assert inter / (p + t - inter) == pytest.approx(row["iou"], abs=1e-6)
    if target == "wt":
        assert not (out / f"{row['id']}_labels.nii.gz").exists()
        return
    labels_img = nib.load(str(out / f"{row['id']}_labels.nii.gz"))
    labels = np.asarray(labels_img.dataobj)
    assert labels.shape == seg.shape and set(np.unique(labels)) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(labels_img.affine, nib.load(str(sample_subset / row["id"] / f"{row['id']}_seg.nii.gz")).affine)
    np.testing.assert_array_equal(labels > 0, pred)
    for region, members in (("wt", (1, 2, 4)), ("tc", (1, 4)), ("et", (4,))):
        a, b = np.isin(labels, members), np.isin(seg, members)
        dice = 1.0 if not (a.any() or b.any()) else 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice == pytest.approx(row["regions"][region]["dice"], abs=1e-6), region


def test_the_context_travels_from_training_to_prediction_and_removed_levers_are_refused(tmp_path, monkeypatch):
    """A run trained with --context 1 stores it in best.pt, and the Predictor built from it feeds the model each slice
    with its neighbours (hand-written rows for 5 slices, ends repeated). A checkpoint that used a lever this version
    no longer has (a context step, the mirror difference, three planes, deep supervision) is refused in one line
    naming it, rather than predicted with the wrong inputs."""
    run = tmp_path / "run"
    assert train.cli(["--data", "synthetic:3x6", "--size", "32", "--epochs", "1", "--base", "4", "--depth", "2",
                      "--batch-size", "4", "--context", "1", "--device", "cpu",
                      "--cache-dir", str(tmp_path / "cache"), "--out", str(run)]) == 0
    raw = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    assert raw["context"] == 1
    seen = []

    def spy_logits(model, images, context, device, batch_size, speed):
        seen.append(context.tolist())
        return torch.zeros(len(context), 1, images.shape[-2], images.shape[-1])

    monkeypatch.setattr(inference, "predict_logits", spy_logits)
    images = np.zeros((5, 4, 32, 32), np.float16)
    inference.Predictor.from_checkpoints([run / "best.pt"], torch.device("cpu")).probs(images, (0, 0, 32))
    assert seen[-1] == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    for key, value in (("context_step", 2), ("asymmetry", True), ("planes", 3), ("unet", {**raw["unet"],
                                                                                        "deep_supervision": 1})):
        old = tmp_path / f"old_{key}.pt"
        torch.save({**raw, key: value}, old)
        with pytest.raises(data.UserError, match=f"trained with .*{'deep_supervision' if key == 'unet' else key}.*"
                                                 f"no longer has: predict with commit 60d0b04"):
            inference.Predictor.from_checkpoints([old], torch.device("cpu"))
    earlier = tmp_path / "earlier.pt"  # what those checkpoints held when the levers were off: still loads
    torch.save({**raw, "context_step": 1, "asymmetry": False, "planes": 1, "unet": {**raw["unet"], "deep_supervision": 0}},
               earlier)
    inference.Predictor.from_checkpoints([earlier], torch.device("cpu")).probs(images, (0, 0, 32))
    assert seen[-1] == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]


def test_checkpoint_round_trips(ckpt):
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert {"post", "regions", "channels", "size", "config", "model", "unet"} <= raw.keys() and raw["regions"] == ["wt"]
    assert raw["post"]["wt"]["threshold"] in inference.THRESHOLDS
    assert raw["post"]["wt"]["min_component"] in inference.MIN_COMPONENTS
    assert raw["size"] == 32 and raw["channels"] == [0, 1, 2, 3]
    reference = train.build_model(train.TrainConfig(**raw["config"]))
    reference.load_state_dict(raw["model"])
    reference.eval()
    model, loaded = inference.load_checkpoint(ckpt, torch.device("cpu"))
    assert not model.training and loaded["post"] == raw["post"]
    x = torch.randn(3, raw["unet"]["in_channels"], 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        assert not torch.equal(model(x), train.build_model(train.TrainConfig(**raw["config"])).eval()(x))


def test_a_checkpoint_whose_post_processing_was_never_chosen_is_named(ckpt, tmp_path, capsys):
    """best.pt of a run stopped before its test phase holds the unchosen post-processing (threshold 0.5, no
    clean-up): predict.py says so in one note; a finished run's best.pt, or an older file without the mark, not."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["post_chosen"] is True
    stopped, older = tmp_path / "stopped.pt", tmp_path / "older.pt"
    torch.save({**raw, "post": {"wt": dict(inference.UNCHOSEN)}, "post_chosen": False}, stopped)
    torch.save({k: v for k, v in raw.items() if k != "post_chosen"}, older)
    for path, noted in ((stopped, True), (ckpt, False), (older, False)):
        predictor = predict.load_predictor(predict.parse_args(["--ckpt", str(path), "--out", "x", "--device", "cpu",
                                                               "case"]))
        err = capsys.readouterr().err
        assert predictor.unchosen == ([str(path)] if noted else [])
        assert (err.count("\n"), str(path) in err, "threshold 0.5" in err) == ((1, True, True) if noted else (0, False, False))


@pytest.mark.parametrize("kind", ["missing", "garbage", "last.pt"])
def test_bad_checkpoint_exits_2(kind, tmp_path, capsys):
    path = tmp_path / "best.pt"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint")
    if kind == "last.pt":  # a training state (train.save_last's keys), the file beside best.pt in a run folder
        path = tmp_path / "last.pt"
        torch.save({"model": {}, "optimizer": {}, "progress": {"epoch": 2}}, path)
    out = tmp_path / "out"
    rc = predict.cli(["--ckpt", str(path), "--out", str(out), "--device", "cpu", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 2
    lines = nonempty_lines(captured.err)
    assert len(lines) == 1 and "checkpoint" in lines[0] and str(path) in lines[0], captured.err
    assert kind != "last.pt" or "use the run's best.pt" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    ([], "the following arguments are required: CASE_DIR"),
    (["--batch-size", "0", "case"], "--batch-size must be positive"),
    (["--device", "tpu", "case"], "--device tpu"),
    (["--threshold", "0", "case"], "--threshold must be between 0 and 1"),
    (["--threshold", "1.5", "case"], "--threshold must be between 0 and 1"),
    (["--min-component", "-3", "case"], "--min-component must not be negative"),
])
def test_bad_arguments_exit_2(argv, needle, tmp_path, capsys):
    rc = predict.cli(["--ckpt", str(tmp_path / "best.pt"), "--out", str(tmp_path / "out"), *argv])
    captured = capsys.readouterr()
    assert rc == 2
    assert needle in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()


class LinearWithRamp(torch.nn.Module):
    """logit = a weighted sum of the input channels + a ramp along the width: not flip-invariant, so a flip not
    undone (or undone along the wrong axis) changes the average."""

    def __init__(self, weights: list[float], size: int):
        super().__init__()
        self.weights = torch.tensor(weights)[None, :, None, None]
        self.ramp = torch.linspace(-2, 2, size)[None, None, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weights).sum(1, keepdim=True) + self.ramp


@pytest.mark.parametrize("tta,n_models", [(False, 1), (True, 2)])
def test_flips_and_models_average_against_a_float64_reference(tta, n_models):
    """Predictor.probs averages sigmoid over the four flips undone (with tta) and over the models of an ensemble:
    checked against a float64 loop written here (context 1, ends repeated, channels ordered neighbour by neighbour)."""
    s, size = 4, 8
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(s, 4, size, size, generator=gen).half()
    weights = [torch.randn(12, generator=gen).tolist() for _ in range(n_models)]  # 3 context slices x 4 modalities
    models = [LinearWithRamp(w, size) for w in weights]
    predictor = inference.Predictor(models, [0, 1, 2, 3], 1, size, False, torch.device("cpu"),
                                     inference.Speed(None, False, False), batch_size=3, tta=tta)
    got = predictor.probs(images.numpy(), (0, 0, size))
    assert got.shape == (s, 1, data.RAW_SIZE, data.RAW_SIZE)
    got = got[:, 0]

    x = images.double().numpy()
    ramp = np.linspace(-2, 2, size)[None, :]
    expected = np.zeros((s, size, size))
    flips = [(False, False), (False, True), (True, False), (True, True)] if tta else [(False, False)]
    for w in (np.array(m).reshape(3, 4) for m in weights):
        for z in range(s):
            neighbours = [max(z - 1, 0), z, min(z + 1, s - 1)]
            logit = np.zeros((size, size))
            for j, nz in enumerate(neighbours):
                for k in range(4):
                    logit += w[j, k] * x[nz, k]
            for flip_rows, flip_cols in flips:  # the model sees the flipped slice; its ramp does not flip
                r = ramp[:, ::-1] if flip_cols else ramp  # so undoing the flip mirrors the ramp alone
                expected[z] += 1 / (1 + np.exp(-(logit + r)))
    expected /= len(flips) * n_models
    np.testing.assert_allclose(got[:, :size, :size].astype(np.float64), expected, atol=2e-3)
    assert not got[:, size:, :].any() and not got[:, :, size:].any()  # outside the box: probability 0



def test_an_ensemble_takes_the_median_post_processing_of_its_members(ckpt, tmp_path):
    """Three members with thresholds 0.3, 0.7, 0.5, minimum components 10, 100, 50, largest-3D on, off, on and
    minimum volumes 0, 300, 200: the ensemble uses 0.5, 50, on and 200 (the medians and the majority), not its first
    member's. The third is a checkpoint written before regions existed (its post-processing at the top level, no
    minimum volume: 0): it still loads, as a whole-tumour model."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    paths = []
    for i, (th, mc, l3, mv) in enumerate(((0.3, 10, True, 0), (0.7, 100, False, 300))):
        paths.append(tmp_path / f"m{i}.pt")
        torch.save({**raw, "post": {"wt": {"threshold": th, "min_component": mc, "largest_3d": l3, "min_volume": mv}}},
                   paths[-1])
    paths.append(tmp_path / "legacy.pt")
    legacy = {k: v for k, v in raw.items() if k not in ("post", "regions")}
    torch.save({**legacy, "threshold": 0.5, "min_component": 50, "largest_3d": True}, paths[-1])
    predictor = inference.Predictor.from_checkpoints(paths, torch.device("cpu"))
    assert predictor.post == {"wt": {"threshold": 0.5, "min_component": 50, "largest_3d": True, "min_volume": 0}}
    assert inference.Predictor.from_checkpoints(paths[1:2], torch.device("cpu")).post == {"wt": {
        "threshold": 0.7, "min_component": 100, "largest_3d": False, "min_volume": 300}}
    assert inference.Predictor.from_checkpoints(paths[2:], torch.device("cpu")).regions == ["wt"]
    torch.save(legacy, tmp_path / "neither.pt")
    with pytest.raises(data.UserError, match="lacks post or threshold, min_component, largest_3d"):
        inference.Predictor.from_checkpoints([tmp_path / "neither.pt"], torch.device("cpu"))


def test_prediction_runs_the_model_in_eval_mode():
    """A BatchNorm model left in training mode: predict_logits puts it in eval mode, so a slice's logits are the same
    alone as inside a batch (batch statistics would make them depend on the other slices), and equal the model's own
    eval-mode output."""
    from unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=4, base=4, depth=2, norm="batch"))
    for _ in range(3):  # running statistics away from their initial values
        model(torch.randn(4, 4, 16, 16) * 3 + 1)
    model.train()
    images = torch.randn(5, 4, 16, 16).half()
    context = feed.context_index([5], 0)
    fp32 = inference.Speed(None, False, False)
    together = inference.predict_logits(model, images, context, torch.device("cpu"), 5, fp32)
    alone = inference.predict_logits(model, images, context, torch.device("cpu"), 1, fp32)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(together, model.eval()(images.float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("crop", [False, True])
def test_the_predictor_preprocesses_with_the_checkpoints_crop(ckpt, tmp_path, monkeypatch, crop):
    """A checkpoint trained with --crop off is run on whole frames, one with --crop on on the brain's box."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    path = tmp_path / "c.pt"
    torch.save({**raw, "crop": crop}, path)
    seen, original = [], data.preprocess_volume

    def spy(image, size, crop_to_brain=True):
        seen.append(crop_to_brain)
        return original(image, size, crop_to_brain)

    monkeypatch.setattr(data, "preprocess_volume", spy)
    image = np.zeros((3, 240, 240, 4), np.float32)
    image[:, 60:180, 80:160] = np.random.default_rng(0).uniform(1, 2, (3, 120, 80, 4))
    inference.Predictor.from_checkpoints([path], torch.device("cpu")).segment(image)
    assert seen == [crop]
