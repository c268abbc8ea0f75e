"""Every flag of train.py and predict.py changes what its --help says it changes.

Each train.py flag has a row: a tiny run with the flag at a non-default value, and a check of the documented effect
against what the same tiny run does without it (or, where a dedicated test already proves the effect, the name of
that test, which must exist). A flag added to train.py or predict.py without a row fails
`test_every_flag_has_a_row`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import feed
import predict
import train
from conftest import ROOT

BASE = ["--data", "synthetic:4x8", "--size", "32", "--base", "4", "--depth", "2", "--batch-size", "8", "--epochs", "1",
        "--device", "cpu"]

# flags whose effect a dedicated test proves: flag -> "file::test"
PROVEN_ELSEWHERE = {
    "--channel": "tests/test_train.py::test_nifti_end_to_end_on_real_cases_one_channel",
    "--target": "tests/test_train.py::test_regions_end_to_end",
    "--train-on": "tests/test_train.py::test_train_plus_val_trains_on_validation_patients_with_the_fixed_postprocessing",
    "--train-patients": "tests/test_train.py::test_train_patients_trains_on_a_subset_drawn_by_the_training_seed",
    "--time-budget": "tests/test_train.py::test_a_time_budget_too_short_for_two_epochs_trains_one",
    "--patience": "tests/test_train.py::test_early_stopping_stops_where_the_log_says",
    "--select": "tests/test_train.py::test_early_stopping_stops_where_the_log_says",
    "--postprocess": "tests/test_train.py::test_train_plus_val_trains_on_validation_patients_with_the_fixed_postprocessing",
    "--augment": "tests/test_train.py::test_modality_dropout_reaches_the_augmentation",
    "--modality-dropout": "tests/test_train.py::test_modality_dropout_reaches_the_augmentation",
    "--train-seed": "tests/test_train.py::test_train_seed_changes_the_training_randomness_and_not_the_split",
    "--resume": "tests/test_resume.py::test_sigkill_mid_run_then_resume_ends_identically",
    "--bce-weight": "tests/test_train.py::test_each_step_takes_the_learning_rate_of_the_closed_form_schedule_and_the_weighted_loss",
    "--dice-weight": "tests/test_train.py::test_each_step_takes_the_learning_rate_of_the_closed_form_schedule_and_the_weighted_loss",
    "--amp": "tests/test_train.py::test_cpu_speed_settings_follow_native_bf16",
    "--channels-last": "tests/test_train.py::test_cpu_speed_settings_follow_native_bf16",
    # predict.py
    "predict --ckpt": "tests/test_predict.py::test_predict_reproduces_train_evaluation",
    "predict --out": "tests/test_predict.py::test_real_case_writes_mask_png_and_metrics",
    "predict --tta": "tests/test_predict.py::test_flips_and_models_average_against_a_float64_reference",
    "predict --device": "tests/test_predict.py::test_bad_arguments_exit_2",
    "predict --batch-size": "tests/test_evaluation.py::test_prediction_batches_all_have_one_shape",
    "predict --threshold": "tests/test_flags.py::test_predict_overrides_replace_the_checkpoints_post_processing",
    "predict --min-component": "tests/test_flags.py::test_predict_overrides_replace_the_checkpoints_post_processing",
    "predict --largest-3d": "tests/test_flags.py::test_predict_overrides_replace_the_checkpoints_post_processing",
}


def flags_of(parse) -> set[str]:
    """The long flags a parser's --help lists."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse(["--help"])
    return set(re.findall(r"^  (--[a-z][a-z0-9-]*)", out.getvalue(), re.M))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flags_cache")


def tiny_run(tmp_path: Path, cache: Path, *flags: str, name: str = "run") -> Path:
    """train.py on 4 phantoms, 32 px, one epoch, with `flags` last (they override BASE); its run folder."""
    out = tmp_path / name
    assert train.cli([*BASE, "--cache-dir", str(cache), "--out", str(out), *flags]) == 0
    return out


def best(out: Path) -> dict:
    return torch.load(out / "best.pt", map_location="cpu", weights_only=False)


def last(out: Path) -> dict:
    return torch.load(out / "last.pt", map_location="cpu", weights_only=False)


def split(out: Path) -> dict:
    return json.loads((out / "split.json").read_text())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache) -> Path:
    return tiny_run(tmp_path_factory.mktemp("baseline"), cache)


# train.py flags with their effect checked here: flag -> (its value, check(run, baseline))
CHECKS = {
    "--data": (["--data", "synthetic:5x8"],
               lambda run, base: sum(map(len, split(run).values())) == 5 and sum(map(len, split(base).values())) == 4),
    "--context": (["--context", "0"], lambda run, base: (best(run)["unet"]["in_channels"], best(base)["unet"]["in_channels"])
                  == (4, 12)),
    "--size": (["--size", "24"], lambda run, base: (best(run)["size"], best(base)["size"]) == (24, 32)),
    "--crop": (["--crop", "off"], lambda run, base: (best(run)["crop"], best(base)["crop"]) == (False, True)),
    "--folds": (["--folds", "4", "--fold", "2"],
                lambda run, base: len(split(run)["test"]) == len(split(run)["val"]) == 1 and len(split(run)["train"]) == 2),
    "--fold": (["--folds", "4", "--fold", "1"],  # fold 1 is tested, the validation fold of --fold 0 (run beside it)
               lambda run, base: split(run)["test"] == split(run.parent / "fold0")["val"] != split(run.parent / "fold0")[
                   "test"]),
    "--base": (["--base", "6"], lambda run, base: (best(run)["model"]["down.0.0.weight"].shape[0],
                                                  best(base)["model"]["down.0.0.weight"].shape[0]) == (6, 4)),
    "--depth": (["--depth", "3"], lambda run, base: (best(run)["unet"]["depth"], sum(k.endswith(".0.weight") and
                k.startswith("down.") for k in best(run)["model"])) == (3, 4)),
    "--norm": (["--norm", "batch"], lambda run, base: any(k.endswith("running_mean") for k in best(run)["model"])
               and not any(k.endswith("running_mean") for k in best(base)["model"])),
    "--epochs": (["--epochs", "2"], lambda run, base: len((run / "log.jsonl").read_text().splitlines()) == 2),
    "--lr": (["--lr", "0.0123"], lambda run, base: last(run)["optimizer"]["param_groups"][0]["initial_lr"] == 0.0123),
    "--weight-decay": (["--weight-decay", "0.25"],
                       lambda run, base: last(run)["optimizer"]["param_groups"][0]["weight_decay"] == 0.25),
    "--warmup": (["--warmup", "2"], lambda run, base: last(run)["scheduler"]["lr_lambdas"][0]["warmup_steps"]
                 == 2 * last(base)["scheduler"]["lr_lambdas"][0]["warmup_steps"]),
    "--cache-dir": (["--cache-dir", "CACHE2"], lambda run, base: any((run.parent / "CACHE2").rglob("meta.json"))),
    "--seed": (["--seed", "3"], lambda run, base: split(run)["test"] != split(base)["test"] or
               split(run)["val"] != split(base)["val"]),
    "--out": (["--out", "OTHER"], lambda run, base: (run.parent / "OTHER" / "metrics.json").exists()),
}


def test_every_flag_has_a_row():
    """A flag of train.py or predict.py without a row here (or a row for a flag that is gone) fails."""
    table = set(CHECKS) | set(RECORDED) | {f for f in PROVEN_ELSEWHERE if not f.startswith("predict ")}
    assert flags_of(train.make_parser().parse_args) - {"--help"} == table | {"--overwrite", "--device"}
    predict_rows = {f.split(" ", 1)[1] for f in PROVEN_ELSEWHERE if f.startswith("predict ")}
    assert flags_of(predict.parse_args) - {"--help"} == predict_rows
    for where in PROVEN_ELSEWHERE.values():
        path, name = where.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), where


@pytest.mark.parametrize("flag", sorted(CHECKS))
def test_the_flag_changes_what_its_help_says(flag, tmp_path, cache, baseline):
    values, check = CHECKS[flag]
    values = [str(tmp_path / v) if v in ("CACHE2", "OTHER") else v for v in values]
    if flag == "--fold":
        tiny_run(tmp_path, cache, "--folds", "4", "--fold", "0", name="fold0")
    out = tmp_path / "run"
    rc = train.cli([*BASE, "--cache-dir", str(cache), "--out", str(out), *values])
    assert rc == 0
    run = out if flag != "--out" else tmp_path / "run"
    assert check(run, baseline), flag


def record_step_settings(monkeypatch) -> dict:
    """What train.py hands the batches, the loss and torch.compile during a run."""
    seen = {"compile": 0, "backend": set(), "batch": set()}
    original_init, original_loss, original_augment = feed.TrainBatches.__init__, train.dice_bce_loss, feed.augment

    def init(self, *args, **kwargs):
        seen["resident"], seen["workers"] = kwargs["resident"], kwargs["workers"]
        original_init(self, *args, **kwargs)

    def loss(*args, **kwargs):
        seen["backend"].add(kwargs.get("backend"))
        return original_loss(*args, **kwargs)

    def augment(x, *args, **kwargs):
        seen["batch"].add(x.shape[0])
        return original_augment(x, *args, **kwargs)

    def compile_stub(fn, *args, **kwargs):
        seen["compile"] += 1
        return fn

    monkeypatch.setattr(feed.TrainBatches, "__init__", init)
    monkeypatch.setattr(train, "dice_bce_loss", loss)
    monkeypatch.setattr(torch, "compile", compile_stub)
    monkeypatch.setattr(feed, "augment", augment)
    return seen


# flags whose effect is what train.py hands on: flag -> (value, what the recorder must see, and without the flag)
RECORDED = {
    "--resident": (["--resident", "off", "--workers", "0"], lambda s: s["resident"] is False, lambda s: s["resident"]),
    "--workers": (["--resident", "off", "--workers", "1"], lambda s: s["workers"] == 1, lambda s: s["workers"] == 2),
    "--compile": (["--compile", "on"], lambda s: s["compile"] == 2, lambda s: s["compile"] == 0),  # step and eval
    "--batch-size": (["--batch-size", "3"], lambda s: s["batch"] == {3}, lambda s: s["batch"] == {8}),
    "--loss-backend": (["--loss-backend", "triton"], lambda s: "triton" in s["backend"],
                       lambda s: "triton" not in s["backend"]),
}


@pytest.mark.parametrize("flag", sorted(RECORDED))
def test_the_flag_reaches_what_it_sets(flag, tmp_path, cache, monkeypatch):
    values, with_flag, without = RECORDED[flag]
    seen = record_step_settings(monkeypatch)
    tiny_run(tmp_path, cache, name="plain")
    assert without(seen), (flag, seen)
    seen.update(compile=0, backend=set(), batch=set())
    tiny_run(tmp_path, cache, *values, name="flagged")
    assert with_flag(seen), (flag, seen)


def test_device_and_overwrite(tmp_path, cache, capsys, baseline):
    """--device cuda on a machine without CUDA is one line that names it; --overwrite on replaces a finished run's
    files (a run with another --epochs, whose log then has that many lines), where without it the run is refused;
    an --overwrite on whose data check fails leaves the old run whole."""
    if not torch.cuda.is_available():
        assert train.cli([*BASE, "--device", "cuda", "--out", str(tmp_path / "gpu")]) == 2
        assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    out = tiny_run(tmp_path, cache, name="twice")
    assert train.cli([*BASE, "--cache-dir", str(cache), "--out", str(out), "--epochs", "2"]) == 2
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    assert train.cli([*BASE, "--cache-dir", str(cache), "--out", str(out), "--epochs", "2", "--overwrite", "on"]) == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    before = sorted(p.name for p in out.iterdir())
    assert train.cli([*BASE, "--cache-dir", str(cache), "--out", str(out), "--train-patients", "99",
                      "--overwrite", "on"]) == 2
    assert "--train-patients 99" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before and len((out / "log.jsonl").read_text().splitlines()) == 2


def test_predict_overrides_replace_the_checkpoints_post_processing(baseline):
    """--threshold, --min-component and --largest-3d replace the checkpoint's values in the predictor predict.py
    uses; without them the checkpoint's own stay."""
    ckpt = best(baseline)
    plain = predict.load_predictor(predict.parse_args(["--ckpt", str(baseline / "best.pt"), "--out", "x", "case"]))
    assert plain.post == ckpt["post"] and set(ckpt["post"]) == {"wt"}
    wt = ckpt["post"]["wt"]
    given = predict.load_predictor(predict.parse_args(
        ["--ckpt", str(baseline / "best.pt"), "--out", "x", "--threshold", "0.42", "--min-component", "77",
         "--largest-3d", "off" if wt["largest_3d"] else "on", "case"]))
    assert given.post == {"wt": {"threshold": 0.42, "min_component": 77, "largest_3d": not wt["largest_3d"],
                                 "min_volume": wt["min_volume"]}}
