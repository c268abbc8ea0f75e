"""bench/cv.py: the post-processing of a fold is never chosen on its own test patients; the report reads both
metrics formats; folds resume or start over, land where cv.py is started, and what cannot be reported is one line."""
import argparse
import json
import subprocess
import sys

import pytest

import data
import inference
import train
from conftest import ROOT, load_bench

TINY = ["--size", "32", "--epochs", "1", "--base", "4", "--depth", "2", "--batch-size", "8", "--device", "cpu"]


def load_cv():
    return load_bench("cv")


def test_choose_postprocess_pools_validation_runs_without_the_folds_test_patients(tmp_path, monkeypatch):
    cv, folds, out = load_cv(), 3, tmp_path / "cv"
    for fold in range(folds):  # what `bench/cv.py --folds 3` runs, in this process
        assert train.cli(["--data", "synthetic:6x6", *TINY, "--folds", str(folds), "--fold", str(fold),
                          "--out", str(out / f"fold{fold}"), "--cache-dir", str(tmp_path / "c")]) == 0
    splits = [json.loads((out / f"fold{f}" / "split.json").read_text()) for f in range(folds)]
    calls, original = [], inference.choose_postprocessing
    monkeypatch.setattr(inference, "choose_postprocessing", lambda probs, truth, inner=None: calls.append(sorted(probs))
                        or original(probs, truth, inner))
    text = cv.choose_postprocessing(argparse.Namespace(folds=folds, out=out))
    every_run = sorted(f"{f}/{v}" for f in range(folds) for v in splits[f]["val"])
    assert len(calls) == folds + 1 and calls[-1] == every_run  # one rule per fold, then one from every run
    for fold in range(folds):
        expected = [k for k in every_run if k.split("/")[1] not in splits[fold]["test"]]
        assert calls[fold] == expected and len(expected) == 2 * (folds - 1)
    rows = [line for line in text.splitlines() if line.startswith(("| fold", "| a final"))]
    assert len(rows) == folds + 1
    for row in rows:  # each rule is a valid --postprocess
        assert inference.parse_postprocess(row.split("| ")[2].split(" ")[0]) is not None
    for fold, row in enumerate(rows[:folds]):  # the last column: the fold's own test Dice, from its metrics.json
        result = json.loads((out / f"fold{fold}" / "metrics.json").read_text())
        assert row.split("| ")[4].strip(" |") == ", ".join(f"{v['dice']:.3f}" for v in result["test"]["per_volume"])


def test_choose_postprocess_refuses_folds_trained_on_their_validation_patients(tmp_path):
    out = tmp_path / "cv"
    assert train.cli(["--data", "synthetic:6x4", *TINY, "--folds", "3", "--fold", "0", "--train-on", "train+val",
                      "--select", "last", "--patience", "0", "--postprocess", "0.5,0,off", "--out", str(out / "fold0"),
                      "--cache-dir", str(tmp_path / "c")]) == 0
    with pytest.raises(SystemExit, match="fold 0 trained on its validation patients"):
        load_cv().choose_postprocessing(argparse.Namespace(folds=3, out=out))


def test_report_reads_both_metrics_formats_and_summarises_sites_groups_and_regions(tmp_path):
    """Hand-made folds: fold 0 written before regions existed (post-processing at the top level), fold 1 of the
    whole tumour in today's format. The report lists every patient with its site and --postprocess, and the means
    over all, over each site and over a --group and the rest are the hand-computed ones. Then fold 1 with three
    regions: its TC and ET columns, and a refusal to mix it with a whole-tumour fold."""
    cv = load_cv()
    old = {"threshold": 0.4, "min_component": 25, "largest_3d": True, "val_volume_dice_at_choice": 0.8,
           "test": {"per_volume": [
               {"id": "Brats18_CBICA_AAA_1", "dice": 0.9, "iou": 0.8, "hd95_mm": 4.0, "tumour_voxels": 50000},
               {"id": "Brats18_2013_1_1", "dice": 0.5, "iou": 0.4, "hd95_mm": 20.0, "tumour_voxels": 10000}]}}
    scores = {"wt": {"dice": 0.7, "iou": 0.6, "hd95_mm": 6.0}, "tc": {"dice": 0.6, "hd95_mm": 8.0},
              "et": {"dice": 1.0, "hd95_mm": 0.0}}

    def new(regions):
        return {"regions": regions, "val_dice_at_choice": None,
                "post": {r: {**inference.UNCHOSEN, "min_volume": 200 if r == "et" else 0} for r in regions},
                "test": {"per_volume": [{"id": "Brats18_CBICA_BBB_1", **scores["wt"], "tumour_voxels": 30000,
                                         "regions": {r: scores[r] for r in regions}}]}}

    def write(fold, result):
        (tmp_path / f"fold{fold}").mkdir(exist_ok=True)
        (tmp_path / f"fold{fold}" / "metrics.json").write_text(json.dumps(result))
        (tmp_path / f"fold{fold}" / "log.jsonl").write_text(json.dumps({"seconds": 60.0 * (fold + 1)}) + "\n")

    write(0, old)
    write(1, new(["wt"]))
    args = argparse.Namespace(folds=3, out=tmp_path, group=[("g", {"Brats18_2013_1_1", "Brats18_CBICA_BBB_1"})],
                              against=None)
    text = cv.report(args)
    assert "folds run: [0, 1] of 3" in text and "0: 60, 1: 120" in text
    assert "| Brats18_CBICA_AAA_1 | 0 | CBICA | 0.900 | 0.800 | 4.0 | 50.0 | 0.4,25,on (chosen on validation) |" in text
    assert "| Brats18_CBICA_BBB_1 | 1 | CBICA | 0.700 | 0.600 | 6.0 | 30.0 | 0.5,0,off (fixed) |" in text
    assert "| all (3) | Dice | 0.700 |" in text and "| site CBICA (2) | Dice | 0.800 |" in text
    assert "| site 2013 (1) | HD95 mm | 20.000 |" in text
    assert "| g (2) | Dice | 0.600 |" in text and "| not g (1) | Dice | 0.900 |" in text
    write(1, new(["wt", "tc", "et"]))
    with pytest.raises(SystemExit, match="fold 1 predicts .*one cross-validation is of one --target"):
        cv.report(args)
    (tmp_path / "fold0" / "metrics.json").unlink()
    text = cv.report(args)
    assert "| 0.700 | 0.600 | 6.0 | 30.0 | 0.600 | 8.0 | 1.000 | 0.0 | 0.5,0,off/0.5,0,off/0.5,0,off,200 (fixed) |" in text
    assert "| all (1) | ET Dice | 1.000 |" in text and "| all (1) | TC HD95 mm | 8.000 |" in text


def test_against_compares_each_patient_tested_in_both_cross_validations(tmp_path):
    """Here: A 0.9, B 0.5, C 0.7 (C only here). There: A 0.8, B 0.5002 (equal within 0.0005), D 0.1 (only there).
    Two patients in both: means 0.700 and 0.650 (+0.050); higher on 1 (A), lower on 0, equal on 1 (B)."""
    cv = load_cv()

    def write(root, fold, dice):
        (root / f"fold{fold}").mkdir(parents=True)
        per_volume = [{"id": i, "dice": d, "iou": d, "hd95_mm": 1.0, "tumour_voxels": 1000} for i, d in dice.items()]
        (root / f"fold{fold}" / "metrics.json").write_text(json.dumps({"post": {"wt": dict(inference.UNCHOSEN)},
                                                                       "regions": ["wt"], "test": {"per_volume": per_volume}}))
        (root / f"fold{fold}" / "log.jsonl").write_text(json.dumps({"seconds": 1.0}) + "\n")

    here, there = tmp_path / "here", tmp_path / "there"
    write(here, 0, {"A": 0.9, "B": 0.5})
    write(here, 1, {"C": 0.7})
    write(there, 0, {"A": 0.8, "B": 0.5002})
    write(there, 1, {"D": 0.1})
    text = cv.report(argparse.Namespace(folds=2, out=here, group=[], against=there))
    assert text.splitlines()[-1] == (f"against {there} (whole-tumour Dice, the 2 patients both tested): mean 0.700 here, "
                                     "0.650 there (+0.050); higher here on 1, lower on 0, equal (within 0.0005) on 1")


def test_retest_reproduces_each_fold_and_then_follows_the_current_code(tmp_path, monkeypatch):
    """The test phase again on finished folds: with unchanged code each metrics.json comes back identical (the
    re-test is train.py's test phase); with a post-processing grid of one threshold, 0.7, that is the rule chosen."""
    cv, out = load_cv(), tmp_path / "cv"
    for fold in range(2):
        assert train.cli(["--data", "synthetic:6x6", *TINY, "--folds", "3", "--fold", str(fold),
                          "--out", str(out / f"fold{fold}"), "--cache-dir", str(tmp_path / "c")]) == 0
    args = argparse.Namespace(folds=3, out=out, retest=tmp_path / "same")
    cv.retest(args)
    for fold in range(2):
        before, after = (json.loads((root / f"fold{fold}" / "metrics.json").read_text()) for root in (out, args.retest))
        assert after == before
    assert not (args.retest / "fold2").exists()  # fold 2 never ran
    monkeypatch.setattr(inference, "THRESHOLDS", (0.7,))
    cv.retest(argparse.Namespace(folds=3, out=out, retest=tmp_path / "new"))
    for fold in range(2):
        assert json.loads((tmp_path / "new" / f"fold{fold}" / "metrics.json").read_text())["post"]["wt"]["threshold"] == 0.7


def test_a_fold_killed_before_its_first_checkpoint_starts_over(tmp_path):
    """A fold folder holding only what train.py writes before epoch 1 ends (a SIGKILL then leaves config.json and
    split.json, no last.pt) has nothing to resume: run_fold starts the fold over and it finishes."""
    cv, out = load_cv(), tmp_path / "cv"
    stopped = out / "fold0"
    stopped.mkdir(parents=True)
    for name in ("config.json", "split.json"):
        (stopped / name).write_text("{}")
    args = argparse.Namespace(folds=3, out=out, jobs=1)
    fold, code, _ = cv.run_fold(0, args, ["--data", "synthetic:6x6", *TINY, "--cache-dir", str(tmp_path / "c")])
    assert (fold, code) == (0, 0), (out / "fold0.log").read_text()
    assert json.loads((stopped / "config.json").read_text())["fold"] == 0 and (stopped / "metrics.json").is_file()


def test_a_relative_out_from_another_folder_keeps_the_folds_beside_the_report(tmp_path):
    """Run from outside the repository with a relative --out: the fold's run folder, its log and cv.md all land
    in OUT relative to the folder cv.py runs in (train.py once wrote the fold relative to the repository)."""
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "cv.py"), "--folds", "3", "--only", "0", "--out",
                           "../cv", "--", "--data", "synthetic:6x6", *TINY, "--cache-dir", str(tmp_path / "c")],
                          cwd=here, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "a" / "cv"
    assert (out / "fold0" / "metrics.json").is_file() and (out / "fold0.log").is_file()
    assert "folds run: [0] of 3" in (out / "cv.md").read_text()


def test_nothing_to_choose_on_or_to_report_is_one_line(tmp_path):
    """--choose-postprocess without a finished fold, and a report of a --train-on all fold (no test patient): a
    UserError naming the problem (cv.py prints it as one line), not a traceback."""
    cv = load_cv()
    with pytest.raises(data.UserError, match="no finished fold"):
        cv.choose_postprocessing(argparse.Namespace(folds=2, out=tmp_path / "cv"))
    fold = tmp_path / "cv" / "fold0"
    fold.mkdir(parents=True)
    (fold / "metrics.json").write_text(json.dumps({"test": None, "regions": ["wt"], "train_on": "all"}))
    with pytest.raises(data.UserError, match="fold 0 .* trained on every patient"):
        cv.read_folds(tmp_path / "cv", 2)
