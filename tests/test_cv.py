"""bench/cv.py: the post-processing of a fold is never chosen on its own test patients."""
import argparse
import importlib.util
import json
import sys

import pytest

import inference
import train
from conftest import ROOT

TINY = ["--size", "32", "--epochs", "1", "--base", "4", "--depth", "2", "--batch-size", "8", "--device", "cpu"]


def load_cv():
    """bench/cv.py as a module (its folder on the path, as when it runs as a script)."""
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("cv", ROOT / "bench" / "cv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_choose_postprocess_pools_validation_runs_without_the_folds_test_patients(tmp_path, monkeypatch):
    cv, folds, out = load_cv(), 3, tmp_path / "cv"
    for fold in range(folds):  # what `bench/cv.py --folds 3` runs, in this process
        assert train.cli(["--data", "synthetic:6x6", *TINY, "--folds", str(folds), "--fold", str(fold),
                          "--out", str(out / f"fold{fold}"), "--cache-dir", str(tmp_path / "c")]) == 0
    splits = [json.loads((out / f"fold{f}" / "split.json").read_text()) for f in range(folds)]
    calls, original = [], inference.choose_postprocessing
    monkeypatch.setattr(inference, "choose_postprocessing", lambda probs, truth: calls.append(sorted(probs)) or
                        original(probs, truth))
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
