"""train.py end to end on tiny data, and every bad input as one line on stderr with a non-zero exit."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

import data
import feed
import inference
import train
from conftest import ROOT, write_h5_slices

TINY = ["--size", "32", "--epochs", "2", "--base", "4", "--depth", "2", "--batch-size", "8", "--device", "cpu"]
RUN_FILES = ("config.json", "split.json", "log.jsonl", "best.pt", "metrics.json", "curves.png", "overlays.png", "failures.png")


def check_run(out, epochs_max: int, regions: tuple[str, ...] = ("wt",)) -> dict:
    """Every file of a run folder exists and opens (a failure gallery per region); returns metrics.json."""
    pictures = ("curves.png", "overlays.png", "failures.png", *(f"failures_{r}.png" for r in regions[1:]))
    assert sorted(p.name for p in out.glob("failures*.png")) == sorted(pictures[2:])
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert not list(out.glob(".tmp*"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert 1 <= len(log) <= epochs_max and [r["epoch"] for r in log] == list(range(1, len(log) + 1))
    for key in ("train_loss", "val_loss", "val_dice", "val_iou", "lr", "seconds", "slices_per_s"):
        assert all(np.isfinite(r[key]) for r in log), key
    for png in pictures:
        assert matplotlib.image.imread(out / png).ndim == 3
    split = json.loads((out / "split.json").read_text())
    assert not (set(split["train"]) & set(split["test"]) or set(split["val"]) & set(split["test"]))
    ckpt = torch.load(out / "best.pt", weights_only=False)
    assert {"model", "unet", "config", "post", "regions", "channels", "size"} <= set(ckpt)
    assert ckpt["regions"] == list(regions) and ckpt["unet"]["out_channels"] == len(regions)
    result = json.loads((out / "metrics.json").read_text())
    test = result["test"]
    assert test["volumes"] == len(split["test"]) == len(test["per_volume"])
    assert 0 <= test["volume_dice"] <= 1 and 0 <= test["volume_iou"] <= test["volume_dice"] + 1e-9
    assert result["post"] == ckpt["post"] and set(result["post"]) == set(regions)
    for post in result["post"].values():
        assert post["threshold"] in inference.THRESHOLDS and post["min_component"] in inference.MIN_COMPONENTS
        assert post["min_volume"] in inference.MIN_VOLUMES
    for v in test["per_volume"]:
        assert set(v["regions"]) == set(regions) and v["dice"] == v["regions"]["wt"]["dice"]
    return result


def test_synthetic_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert train.cli(["--data", "synthetic:4x10", *TINY, "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    check_run(out, 2)


def test_regions_end_to_end(tmp_path, capsys):
    """--target regions: three outputs, every region post-processed, evaluated and pictured; each region's
    validation Dice logged; the test line per region printed."""
    out = tmp_path / "run"
    assert train.cli(["--data", "synthetic:4x10", *TINY, "--target", "regions", "--out", str(out),
                      "--cache-dir", str(tmp_path / "c")]) == 0
    result = check_run(out, 2, ("wt", "tc", "et"))
    assert set(result["test"]["regions"]) == {"wt", "tc", "et"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r[f"val_dice_{k}"]) for r in log for k in ("wt", "tc", "et"))
    assert "test per region: WT Dice" in capsys.readouterr().out


def test_the_dataloader_path_trains_end_to_end(tmp_path, monkeypatch):
    """--resident off: DataLoader workers read the disk cache (workers 0: in this process, so it is recorded)."""
    out, served = tmp_path / "run", []
    original = feed.DiskSlices.__getitem__
    monkeypatch.setattr(feed.DiskSlices, "__getitem__", lambda self, i: served.append(i) or original(self, i))
    assert train.cli(["--data", "synthetic:4x10", *TINY, "--resident", "off", "--workers", "0", "--out", str(out),
                      "--cache-dir", str(tmp_path / "c")]) == 0
    check_run(out, 2)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(served) == 2 * 8 * int(round(log[0]["slices_per_s"] * log[0]["seconds"] / 8))  # every batch, both epochs


def record_trained_volumes(monkeypatch) -> dict:
    """{"train": the volume ids TrainBatches is built from}, once train.py has built it."""
    loaded = {}
    original = feed.TrainBatches.__init__

    def record(self, cache, volume_ids, *args, **kwargs):
        loaded["train"] = list(volume_ids)
        original(self, cache, volume_ids, *args, **kwargs)

    monkeypatch.setattr(feed.TrainBatches, "__init__", record)
    return loaded


def test_training_uses_only_the_training_patients(tmp_path, monkeypatch):
    loaded = record_trained_volumes(monkeypatch)
    out = tmp_path / "run"
    assert train.cli(["--data", "synthetic:6x4", *TINY, "--epochs", "1", "--out", str(out),
                      "--cache-dir", str(tmp_path / "c")]) == 0
    split = json.loads((out / "split.json").read_text())
    assert loaded["train"] == split["train"] and len(split["train"]) == 4
    assert not set(loaded["train"]) & (set(split["val"]) | set(split["test"]))
    tested = {v["id"] for v in json.loads((out / "metrics.json").read_text())["test"]["per_volume"]}
    assert tested == set(split["test"])


def test_modality_dropout_reaches_the_augmentation(tmp_path, monkeypatch):
    """--modality-dropout (0.5 by default): every training batch's augmentation gets it, with the four modalities
    told apart from the context copies (12 input channels with --context 1, the default)."""
    seen = []
    original = feed.augment
    monkeypatch.setattr(feed, "augment", lambda x, y, *a: seen.append((x.shape[1], *a[1:])) or original(x, y, *a))
    runs = {"default": ([], (12, 4, 0.5)), "off": (["--modality-dropout", "0"], (12, 4, 0.0)),
            "quarter": (["--modality-dropout", "0.25"], (12, 4, 0.25))}
    for name, (flags, _) in runs.items():
        assert train.cli(["--data", "synthetic:6x12", *TINY, "--epochs", "1", *flags,
                          "--out", str(tmp_path / name), "--cache-dir", str(tmp_path / "c")]) == 0
    assert seen and set(seen) == {want for _, want in runs.values()}
    assert len({seen.count(want) for _, want in runs.values()}) == 1
    seen.clear()  # --augment off: the augmentation is never called, the batches are the cached slices themselves
    assert train.cli(["--data", "synthetic:6x12", *TINY, "--epochs", "1", "--augment", "off",
                      "--out", str(tmp_path / "plain"), "--cache-dir", str(tmp_path / "c")]) == 0
    assert seen == []


def test_train_plus_val_trains_on_validation_patients_with_the_fixed_postprocessing(tmp_path, monkeypatch):
    """--train-on train+val: the batches hold the training and the validation patients, never a test patient; the
    fixed --postprocess (off the search grid, so it cannot have been chosen) is what the test used and best.pt keeps."""
    loaded = record_trained_volumes(monkeypatch)
    out = tmp_path / "run"
    assert train.cli(["--data", "synthetic:6x4", *TINY, "--epochs", "1", "--train-on", "train+val", "--select", "last",
                      "--patience", "0", "--postprocess", "0.35,7,off", "--out", str(out),
                      "--cache-dir", str(tmp_path / "c")]) == 0
    split = json.loads((out / "split.json").read_text())
    assert sorted(loaded["train"]) == sorted(split["train"] + split["val"]) and len(loaded["train"]) == 5
    assert not set(loaded["train"]) & set(split["test"])
    result = json.loads((out / "metrics.json").read_text())
    fixed = {"wt": {"threshold": 0.35, "min_component": 7, "largest_3d": False, "min_volume": 0}}
    assert result["post"] == fixed
    assert result["train_on"] == "train+val" and result["val_dice_at_choice"] is None
    assert torch.load(out / "best.pt", weights_only=False)["post"] == fixed


def test_train_on_all_trains_on_every_patient_and_tests_none(tmp_path, monkeypatch, capsys):
    """--train-on all (the release model): the batches hold all 6 patients, test ones included; metrics.json says
    there was no test and keeps the fixed post-processing, which best.pt carries; no test figure is drawn; it needs a
    fixed --postprocess like train+val."""
    loaded = record_trained_volumes(monkeypatch)
    out = tmp_path / "run"
    assert train.cli(["--data", "synthetic:6x4", *TINY, "--epochs", "1", "--train-on", "all", "--select", "last",
                      "--patience", "0", "--postprocess", "0.35,7,off", "--out", str(out),
                      "--cache-dir", str(tmp_path / "c")]) == 0
    split = json.loads((out / "split.json").read_text())
    assert sorted(loaded["train"]) == sorted(split["train"] + split["val"] + split["test"]) == split["trained_on"]
    assert len(loaded["train"]) == 6
    result = json.loads((out / "metrics.json").read_text())
    fixed = {"wt": {"threshold": 0.35, "min_component": 7, "largest_3d": False, "min_volume": 0}}
    assert result["test"] is None and result["post"] == fixed and result["trained_on"] == 6
    assert torch.load(out / "best.pt", weights_only=False)["post"] == fixed
    assert (out / "curves.png").is_file() and not (out / "overlays.png").exists() and not (out / "failures.png").exists()
    assert "trained on all 6 patients" in capsys.readouterr().out
    assert train.cli(["--data", "synthetic:6x4", *TINY, "--train-on", "all", "--out", str(tmp_path / "no"),
                      "--cache-dir", str(tmp_path / "c")]) == 2
    assert "--train-on all trains on the validation patients" in capsys.readouterr().err


def test_train_patients_trains_on_a_subset_drawn_by_the_training_seed(tmp_path, monkeypatch, capsys):
    """--train-patients 2: the batches hold 2 of the 5 training patients, the ones split.json names as trained on;
    the same training seed draws the same 2, other training seeds other pairs; the split itself does not move."""
    loaded = record_trained_volumes(monkeypatch)
    drawn, splits = {}, set()
    for seed in range(4):
        out = tmp_path / f"seed{seed}"
        assert train.cli(["--data", "synthetic:7x4", *TINY, "--epochs", "1", "--train-patients", "2",
                          "--train-seed", str(seed), "--select", "last", "--postprocess", "0.5,0,off",
                          "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
        split = json.loads((out / "split.json").read_text())
        assert len(split["train"]) == 5 and len(loaded["train"]) == 2 and set(loaded["train"]) < set(split["train"])
        assert split["trained_on"] == sorted(loaded["train"])
        assert f"training on 2 of the patients: {', '.join(sorted(loaded['train']))}" in capsys.readouterr().out
        drawn[seed] = tuple(sorted(loaded["train"]))
        splits.add(json.dumps({k: split[k] for k in ("train", "val", "test")}))
    assert len(splits) == 1
    again = tmp_path / "again"
    assert train.cli(["--data", "synthetic:7x4", *TINY, "--epochs", "1", "--train-patients", "2", "--train-seed", "2",
                      "--select", "last", "--postprocess", "0.5,0,off", "--out", str(again),
                      "--cache-dir", str(tmp_path / "c")]) == 0
    assert tuple(sorted(loaded["train"])) == drawn[2]
    assert len(set(drawn.values())) > 1


def test_train_seed_changes_the_training_randomness_and_not_the_split(tmp_path, monkeypatch):
    """--train-seed seeds the initial weights and the batches (order, augmentation) and leaves the split to --seed;
    without it, --seed seeds all of them, as before the flag."""
    seen = {}
    original_init, original_build = feed.TrainBatches.__init__, train.build_model

    def record_batches(self, *args, seed, **kwargs):
        seen["batch_seed"] = seed
        original_init(self, *args, seed=seed, **kwargs)

    def record_weights(cfg):
        model = original_build(cfg)
        seen["weights"] = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        return model

    monkeypatch.setattr(feed.TrainBatches, "__init__", record_batches)
    monkeypatch.setattr(train, "build_model", record_weights)

    def run(name: str, *seeds: str) -> tuple[dict, int, torch.Tensor]:
        out = tmp_path / name
        assert train.cli(["--data", "synthetic:6x4", *TINY, "--epochs", "1", *seeds, "--select", "last",
                          "--postprocess", "0.5,0,off", "--out", str(out),
                          "--cache-dir", str(tmp_path / "c")]) == 0
        return json.loads((out / "split.json").read_text()), seen["batch_seed"], seen["weights"]

    split0, batch0, weights0 = run("seed0")
    split_t1, batch_t1, weights_t1 = run("seed0_train1", "--train-seed", "1")
    split1_t0, batch1_t0, weights1_t0 = run("seed1_train0", "--seed", "1", "--train-seed", "0")
    split1, batch1, weights1 = run("seed1", "--seed", "1")
    assert split_t1 == split0 and split1_t0 == split1 and split1 != split0
    assert (batch0, batch_t1, batch1_t0, batch1) == (0, 1, 0, 1)
    assert torch.equal(weights1_t0, weights0) and torch.equal(weights_t1, weights1)
    assert not torch.equal(weights_t1, weights0)


def test_each_step_takes_the_learning_rate_of_the_closed_form_schedule_and_the_weighted_loss():
    """train.py's step, 9 times with --lr 0.01 over 8 scheduled steps, 3 of warm-up: after step s the optimiser's
    learning rate is lr (s + 1) / 3 during warm-up, then lr (0.01 + 0.99 (1 + cos(pi (s - 3) / 5)) / 2), held at
    the 1% floor past the end (closed form, written here). Each step's loss is --bce-weight x BCE + --dice-weight x
    (1 - Dice) of its own logits, in float64 here (0.25 and 2.0, so swapping them shows)."""
    cfg = train.TrainConfig(size=16, base=4, depth=2, lr=0.01, context=0, bce_weight=0.25, dice_weight=2.0,
                            device="cpu")
    cpu, speed = torch.device("cpu"), inference.Speed(None, False, False)
    torch.manual_seed(0)
    model = train.build_model(cfg)
    optimizer, scheduler = train.make_optimizer(model, cfg, cpu, total_steps=8, warmup_steps=3)
    step = train.make_train_step(model, optimizer, scheduler, train.make_scaler(cpu, speed), cfg, cpu, speed)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 3)  # step 0 runs at the first warm-up rate
    for s in range(9):
        x = torch.randn(2, 4, 16, 16)
        y = (torch.rand(2, 1, 16, 16) > 0.6).to(torch.uint8)
        loss, logits = step(x, y)
        z, t = logits.double(), y.double()
        bce = (torch.clamp(z, min=0) - z * t + torch.log1p(torch.exp(-z.abs()))).mean()
        p = torch.sigmoid(z)
        dice = (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
        assert loss.item() == pytest.approx((0.25 * bce + 2.0 * (1 - dice)).item(), rel=1e-5), s
        nxt = s + 1  # the scheduler has stepped once per optimisation step
        factor = (nxt + 1) / 3 if nxt < 3 else 0.01 + 0.99 * (1 + math.cos(math.pi * min(1, (nxt - 3) / 5))) / 2
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * factor, rel=1e-9), s
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # the floor, not 0


def test_a_train_step_learns(tmp_path):
    """train.py's own step, 40 times on one batch of phantom slices: the loss falls and the batch is learnt (an
    optimiser that never steps, or a schedule stuck at zero, leaves the loss where it started)."""
    cache = data.prepare("synthetic:3x8", 32, tmp_path)
    slices = feed.load_slices(cache, cache.volume_ids, [0, 1, 2, 3])
    idx = torch.nonzero(slices.masks.flatten(1).sum(1) > 20)[:8, 0]
    x, y = slices.inputs(idx).float(), slices.masks[idx].unsqueeze(1)
    cfg = train.TrainConfig(size=32, base=8, depth=3, batch_size=8, lr=5e-3, context=0, device="cpu")
    cpu, speed = torch.device("cpu"), inference.Speed(None, False, False)
    torch.manual_seed(0)
    model = train.build_model(cfg)
    optimizer, scheduler = train.make_optimizer(model, cfg, cpu, total_steps=40, warmup_steps=1)
    step = train.make_train_step(model, optimizer, scheduler, train.make_scaler(cpu, speed), cfg, cpu, speed)
    losses = [step(x, y)[0].item() for _ in range(40)]
    model.eval()
    with torch.no_grad():
        pred = model(x) > 0
    dice = 2 * (pred & y.bool()).sum() / (pred.sum() + y.bool().sum())
    assert losses[-1] < 0.8 * losses[0] and dice > 0.7, (losses[0], losses[-1], float(dice))


def test_nifti_end_to_end_on_real_cases_one_channel(sample_subset, tmp_path):
    out = tmp_path / "run"
    assert train.cli(["--data", f"nifti:{sample_subset}", *TINY, "--channel", "0", "--out", str(out),
                      "--cache-dir", str(tmp_path / "c")]) == 0
    result = check_run(out, 2)
    assert result["channels"] == ["flair"]
    assert torch.load(out / "best.pt", weights_only=False)["unet"]["in_channels"] == 3  # FLAIR x 3 context slices
    assert {v["id"] for v in result["test"]["per_volume"]} <= {p.name for p in sample_subset.iterdir()}


def test_h5_end_to_end_from_real_cases(real_h5, tmp_path):
    out = tmp_path / "run"
    assert train.cli(["--data", f"h5:{real_h5}", *TINY, "--epochs", "1", "--out", str(out),
                      "--cache-dir", str(tmp_path / "c")]) == 0
    check_run(out, 1)


def test_early_stopping_stops_where_the_log_says(tmp_path):
    """It stops `patience` epochs after the best validation Dice, and the model tested is that epoch's."""
    out = tmp_path / "run"
    args = ["--data", "synthetic:3x6", *TINY, "--epochs", "8", "--patience", "2", "--select", "best", "--out", str(out),
            "--cache-dir", str(tmp_path / "c")]
    assert train.cli(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    dice = [r["val_dice"] for r in log]
    best = dice.index(max(dice)) + 1  # the first epoch with the best Dice
    assert len(log) == min(8, best + 2), dice
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == best
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == best


def test_select_last_keeps_the_final_epoch_and_patience_0_never_stops(tmp_path):
    out = tmp_path / "run"
    args = ["--data", "synthetic:3x6", *TINY, "--epochs", "3", "--patience", "0", "--select", "last", "--lr", "1e-7",
            "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert train.cli(args) == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == 3


def test_epochs_in_budget_counts_the_epochs_that_end_in_time():
    # a 600 s budget; set-up and epoch 1 ended at 130 s, an epoch takes 100 s: 4 more end by 530 s, a 5th at 630 s
    assert train.epochs_in_budget(600, 130, 100, 40) == 5
    assert train.epochs_in_budget(600, 100, 100, 40) == 6  # the 6th ends at 600 s exactly
    assert train.epochs_in_budget(600, 130, 100, 3) == 3  # never more than --epochs
    assert train.epochs_in_budget(600, 900, 100, 40) == 1  # over budget already: the first epoch only


def test_a_time_budget_too_short_for_two_epochs_trains_one(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data", "synthetic:3x6", *TINY, "--epochs", "3", "--time-budget", "0.0001", "--out", str(out),
            "--cache-dir", str(tmp_path / "c")]
    assert train.cli(args) == 0
    stdout = capsys.readouterr().out
    assert "training for 1 epochs (--epochs 3 at most)" in stdout and "(--time-budget 0.0001)" in stdout
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    result = json.loads((out / "metrics.json").read_text())
    assert (result["epochs"], result["epochs_run"], result["time_budget_min"]) == (1, 1, 0.0001)


def test_a_time_budget_run_equals_the_run_of_its_epoch_count_even_when_resumed(tmp_path, monkeypatch):
    """The epochs that fit are counted once, after epoch 1, and the schedule is laid over them: a --time-budget run
    whose count is 2 (of --epochs 4), stopped in epoch 2 and resumed, ends with the log, the weights and the test
    numbers of a plain --epochs 2 run."""
    counted = []
    monkeypatch.setattr(train, "epochs_in_budget", lambda budget_s, elapsed_s, epoch_s, most: counted.append(most) or 2)
    common = ["--data", "synthetic:4x10", *TINY, "--patience", "0", "--select", "last", "--cache-dir", str(tmp_path / "c")]
    budget, plain = tmp_path / "budget", tmp_path / "plain"
    requested = train.StopOnSignal.requested

    def sigint_in_epoch_2(self, step):
        if (budget / "log.jsonl").exists():
            self.signum = signal.SIGINT
        return requested(self, step)

    monkeypatch.setattr(train.StopOnSignal, "requested", sigint_in_epoch_2)
    assert train.cli([*common, "--epochs", "4", "--time-budget", "30", "--out", str(budget)]) == 128 + signal.SIGINT
    monkeypatch.setattr(train.StopOnSignal, "requested", requested)
    assert train.cli(["--resume", str(budget)]) == 0
    assert counted == [4]  # once, and not again on resume
    assert train.cli([*common, "--epochs", "2", "--out", str(plain)]) == 0
    logs = [[{k: v for k, v in json.loads(line).items() if k not in ("seconds", "slices_per_s")}
             for line in (out / "log.jsonl").read_text().splitlines()] for out in (budget, plain)]
    assert len(logs[0]) == 2 and logs[0] == logs[1]
    results = [json.loads((out / "metrics.json").read_text()) for out in (budget, plain)]
    assert results[0]["epochs"] == results[1]["epochs"] == 2 and results[0]["time_budget_min"] == 30
    assert {**results[0], "time_budget_min": 0} == {**results[1], "time_budget_min": 0}
    weights = [torch.load(out / "best.pt", weights_only=True)["model"] for out in (budget, plain)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def run_cli(*args, cwd=ROOT, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_kaggle_offline_fails_fast_and_names_the_alternatives(tmp_path):
    proc = run_cli("--data", "kaggle", "--device", "cpu", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path),
                   env_extra={"KAGGLEHUB_CACHE": str(tmp_path / "kagglehub")})
    if proc.returncode == 0:
        pytest.skip("Kaggle is reachable from this machine")
    assert_one_line_error(proc, "Kaggle", "--data nifti:DIR", "--data synthetic")
    assert not (tmp_path / "run").exists()


def bad_h5_folder(tmp_path, kind: str):
    folder = tmp_path / kind
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (2, 240, 240, 4)).astype(np.float32)
    label = np.zeros((2, 240, 240), np.uint8)
    if kind == "shape":
        image, label = image[:, :100], label[:, :100]
    if kind == "nan":
        image[1, 7, 7, 0] = np.nan
    for v in (1, 2, 3):
        write_h5_slices(folder, v, image, label, range(2))
    if kind == "corrupt":
        (folder / "volume_2_slice_1.h5").write_bytes(b"\x89HDF junk")
    if kind == "labels":
        import h5py
        with h5py.File(folder / "volume_3_slice_0.h5", "r+") as f:
            f["mask"][0, 0, 1] = 7
    return folder


@pytest.mark.parametrize("kind,needle", [
    ("corrupt", "volume_2_slice_1.h5"), ("shape", "shape (100, 240, 4)"), ("nan", "NaN"), ("labels", "one-hot"),
])
def test_bad_h5_data_is_one_line(tmp_path, kind, needle):
    folder = bad_h5_folder(tmp_path, kind)
    proc = run_cli("--data", f"h5:{folder}", "--size", "16", "--depth", "2", "--device", "cpu", "--out", str(tmp_path / "run"),
                   "--cache-dir", str(tmp_path / "cache"))
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "cache").rglob("meta.json")) and not list((tmp_path / "cache").rglob(".tmp*"))


@pytest.mark.parametrize("args,needle", [
    (["--data", "nifti:/no/such/folder"], "not found"),
    (["--data", "h5:EMPTY"], "no volume_<V>_slice_<S>.h5"),
    (["--data", "nifti:EMPTY"], "no BraTS case folders"),
    (["--data", "s3:bucket"], "unknown --data source"),
    (["--size", "0"], "--size must be positive"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--channel", "4"], "--channel must be in 0..3"),
    (["--time-budget", "-5"], "--time-budget must not be negative"),
    (["--time-budget", "nan"], "--time-budget must be a finite number, got nan"),
    (["--warmup", "inf"], "--warmup must be a finite number, got inf"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--size", "16", "--depth", "4"], "--depth 4 halves --size 16 to under 2 px"),
    (["--out", "FILE"], "is a file, not a folder"),
    (["--cache-dir", "FILE"], "cannot create the cache folder"),
    (["--seed", "-1"], "--seed must not be negative"),
    (["--train-seed", "-2"], "--train-seed must not be negative"),
    (["--train-patients", "-1"], "--train-patients must not be negative, got -1"),
    (["--train-patients", "2"], "--train-patients 2: the split has only 1 patients to train on (--train-on train)"),
    (["--modality-dropout", "-0.1"], "--modality-dropout must be in 0..1 (0: off), got -0.1"),
    (["--modality-dropout", "0.5", "--channel", "3"], "--modality-dropout needs more than one modality"),
    (["--time-budget", "25", "--warmup", "0.5"], "--time-budget needs --warmup of at least 1 epoch"),
    (["--postprocess", "0.3,50"], "--postprocess must be val, or THRESHOLD,MIN_PIXELS,on|off[,MIN_VOXELS]"),
    (["--postprocess", "0.3,0,on/0.5,0,on"], "once per region (wt) joined by '/'"),
    (["--target", "regions", "--postprocess", "0.3,0,on/0.5,0,on"], "once per region (wt/tc/et) joined by '/'"),
    (["--postprocess", "0.3,0,on,-5"], "got '0.3,0,on,-5'"),
    (["--postprocess", "1.5,0,on"], "got '1.5,0,on'"),
    (["--postprocess", "0.3,-1,on"], "got '0.3,-1,on'"),
    (["--postprocess", "0.3,0,yes"], "got '0.3,0,yes'"),
    (["--train-on", "train+val", "--select", "last", "--patience", "0"], "needs --select last --patience 0 and a fixed"),
    (["--train-on", "train+val", "--select", "best", "--postprocess", "0.3,0,on"],
     "--train-on train+val trains on the validation"),
    (["--data", "synthetic:6x4", "--folds", "3", "--fold", "1"], "have no tumour, so nothing can be chosen"),
])
def test_bad_arguments_are_one_line(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    args = [a.replace("EMPTY", str(tmp_path / "empty")).replace("FILE", str(tmp_path / "file")) for a in args]
    if "--data" not in args:
        args += ["--data", "synthetic:3x4"]
    for flag, value in (("--out", tmp_path / "run"), ("--cache-dir", tmp_path / "c")):
        if flag not in args:
            args += [flag, str(value)]
    err_file = tmp_path / "err.txt"
    with open(err_file, "w") as err:
        code = _cli_capturing(args + ["--device", "cpu"], err)
    lines = err_file.read_text().strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_one_modality_turns_the_default_modality_dropout_off():
    """--modality-dropout defaults to 0.5, but a single --channel has nothing to drop: off unless asked (refused then)."""
    assert train.parse_args([]).modality_dropout == 0.5
    assert train.parse_args(["--channel", "0"]).modality_dropout == 0.0
    assert train.parse_args(["--channel", "0", "--modality-dropout", "0"]).modality_dropout == 0.0
    with pytest.raises(data.UserError, match="--modality-dropout needs more than one modality"):
        train.parse_args(["--channel", "0", "--modality-dropout", "0.5"])


def _cli_capturing(argv, err) -> int:
    import contextlib
    with contextlib.redirect_stderr(err):
        return train.cli(argv)


def test_nifti_missing_modality_is_one_line(sample_dir, tmp_path):
    root = tmp_path / "cases"
    for c in ("A", "B", "C"):
        (root / c).mkdir(parents=True)
    src = sample_dir / "Brats18_CBICA_ABM_1"
    for c in ("A", "B", "C"):
        for m in ("flair", "t1", "t1ce", "t2", "seg"):
            if not (c == "B" and m == "t2"):
                os.symlink(src / f"Brats18_CBICA_ABM_1_{m}.nii.gz", root / c / f"{c}_{m}.nii.gz")
    proc = run_cli("--data", f"nifti:{root}", "--size", "16", "--depth", "2", "--device", "cpu", "--out", str(tmp_path / "run"),
                   "--cache-dir", str(tmp_path / "cache"))
    assert_one_line_error(proc, "missing modality t2", str(root / "B"))


@pytest.mark.parametrize("flags,amp,channels_last", [([], None, False), (["amx_bf16"], torch.bfloat16, False),
                                                     (["avx512_bf16"], torch.bfloat16, False)])
def test_cpu_speed_settings_follow_native_bf16(monkeypatch, flags, amp, channels_last):
    """--amp auto on a CPU: bf16 only with native bf16; --channels-last auto: off on every CPU (slower on both kinds
    measured); explicit flags win."""
    monkeypatch.setattr(inference, "cpu_bf16_flags", lambda: flags)
    cpu = torch.device("cpu")
    speed = inference.resolve_speed(cpu)
    assert (speed.amp, speed.channels_last, speed.compile) == (amp, channels_last, False)
    assert ("no native bf16" in str(speed)) == (not flags)
    forced = inference.resolve_speed(cpu, amp="bf16", channels_last="on")
    assert forced.amp == torch.bfloat16 and forced.channels_last


def test_cpu_bf16_flags_read_cpuinfo_and_need_avx512_kernels(tmp_path):
    """Native bf16 is the cpuinfo flags, and none when PyTorch dispatches below AVX512 (an ISA held at AVX2)."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 avx512_bf16 amx_tile\n\n")
    assert inference.cpu_bf16_flags(str(info), "AVX512") == ["avx512_bf16", "amx_bf16"]
    assert inference.cpu_bf16_flags(str(info), "AVX2") == []
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n\n")
    assert inference.cpu_bf16_flags(str(info), "AVX512") == []
    assert inference.cpu_bf16_flags(str(tmp_path / "missing"), "AVX512") == []


def speed_rows(report: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in report.splitlines()
            if line.startswith("| off") or line.startswith("| bf16")]


def test_cpu_speed_bench_times_the_four_settings(tmp_path):
    """bench/cpu_speed.py at a tiny shape, --compile off: one row per (--amp, --channels-last), each with a positive
    time, and the report written whole to --out, naming the machine and the channel count the context gives."""
    out = tmp_path / "speed.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_speed.py"), "--size", "32", "--base", "4",
                           "--batch-size", "2", "--context", "2", "--rounds", "1", "--steps", "1", "--threads", "1",
                           "--compile", "off", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = out.read_text()
    assert "machine: CPU" in report and "batch 2 x 20 x 32 x 32" in report
    rows = speed_rows(report)
    assert [tuple(r[:3]) for r in rows] == [("off", "off", "off"), ("off", "on", "off"), ("bf16", "off", "off"),
                                            ("bf16", "on", "off")]
    for r in rows:
        assert float(r[4]) > 0 and float(r[7]) > 0
        assert all(float(t) >= 0 for t in r[3].split(" + "))
    assert rows[0][6] == "1.00x" and rows[0][9] == "1.00x"


def test_cpu_speed_bench_compile_rows_run_the_compiled_callables(tmp_path, monkeypatch):
    """With --compile on (the default) two more rows, fp32 and bf16, whose step and forward go through torch.compile:
    here a stand-in that counts what it wraps (a real compilation takes minutes on 2 cores)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import cpu_speed
    wrapped = []

    def fake_compile(fn):
        wrapped.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "speed.md"
    assert cpu_speed.main(["--size", "32", "--base", "4", "--batch-size", "2", "--context", "0", "--rounds", "1",
                           "--steps", "1", "--out", str(out)]) == 0
    rows = speed_rows(out.read_text())
    assert [tuple(r[:3]) for r in rows][4:] == [("off", "off", "on"), ("bf16", "off", "on")]
    assert len(rows) == 6 and all(float(r[4]) > 0 and float(r[7]) > 0 for r in rows)
    assert len(wrapped) == 4  # each compiled row: train.py's forward + loss and the evaluation model
    assert sum(isinstance(fn, torch.nn.Module) for fn in wrapped) == 2


def test_postprocess_spec_per_region_round_trips():
    """One spec for every region, or one per region in order; format_postprocess writes what parse reads back."""
    regions = ["wt", "tc", "et"]
    same = inference.parse_postprocess("0.4,25,on", regions)
    assert same == {r: {"threshold": 0.4, "min_component": 25, "largest_3d": True, "min_volume": 0} for r in regions}
    each = inference.parse_postprocess("0.4,25,on/0.5,10,off/0.6,0,off,200", regions)
    assert each["et"] == {"threshold": 0.6, "min_component": 0, "largest_3d": False, "min_volume": 200}
    assert each["tc"] == {"threshold": 0.5, "min_component": 10, "largest_3d": False, "min_volume": 0}
    assert inference.format_postprocess(each, regions) == "0.4,25,on/0.5,10,off/0.6,0,off,200"
    assert inference.parse_postprocess(inference.format_postprocess(each, regions), regions) == each
    assert inference.parse_postprocess("val", regions) is None
