"""bench/learning_curve.py: the fit of Dice against training patients, and the report over cross-validations."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, load_bench


def load():
    return load_bench("learning_curve")


def on_curve(n: float) -> float:
    """A hand-picked curve: Dice = 0.9 - 0.5 / sqrt(N)."""
    return 0.9 - 0.5 * n ** -0.5


def test_fit_recovers_a_curve_exactly_and_refuses_two_sizes():
    lc = load()
    ns = [6, 12, 18, 24]
    a, b, c = lc.fit_power(ns, [0.92 - 0.6 * n ** -0.7 for n in ns])
    assert (a, b, c) == pytest.approx((0.92, 0.6, 0.7), abs=1e-9)
    assert lc.curve_at((a, b, c), 260) == pytest.approx(0.92 - 0.6 * 260 ** -0.7, abs=1e-9)
    with pytest.raises(ValueError, match="3 or more training-set sizes"):
        lc.fit_power([6, 6, 24], [0.7, 0.71, 0.8])


def write_cv(out, trained: list[int], dice: list[float]):
    """A finished 2-fold cross-validation by hand: fold f trained on trained[f] patients and tested one patient."""
    for fold, (n, d) in enumerate(zip(trained, dice)):
        run = out / f"fold{fold}"
        run.mkdir(parents=True)
        names = [f"Brats18_CBICA_A{i:02d}_1" for i in range(40)]
        (run / "split.json").write_text(json.dumps({"train": names[:30], "val": ["v"], "test": [f"t{fold}"],
                                                    "trained_on": names[:n]}))
        (run / "log.jsonl").write_text(json.dumps({"seconds": 10.0}) + "\n")
        (run / "metrics.json").write_text(json.dumps({"threshold": 0.5, "min_component": 0, "largest_3d": False,
                                                      "val_volume_dice_at_choice": 0.8, "test": {"per_volume": [
            {"id": f"Brats18_CBICA_T{fold}_1", "dice": d, "iou": d - 0.1, "hd95_mm": 5.0, "tumour_voxels": 1000}]}}))


def test_report_reads_n_from_the_splits_and_extrapolates_with_the_folds_spread(tmp_path):
    """Three cross-validations whose patient means lie on Dice = 0.9 - 0.5 N^-0.5, fold 0 at +0.02 and fold 1 at
    -0.02 of it: the rows sorted by N (read from split.json, not from the folder's name), the exact fit, and at N =
    260 the curve's 0.869 with the folds' own curves at 0.849 and 0.889."""
    lc, outs = load(), []
    for name, n in (("big", 24), ("small", 6), ("mid", 12)):
        write_cv(tmp_path / name, [n, n], [on_curve(n) + 0.02, on_curve(n) - 0.02])
        outs.append(tmp_path / name)
    text = lc.learning_curve(outs, 2, 260)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r[0][2:]) for r in rows] == [6, 12, 24]
    assert [float(r[3]) for r in rows] == [round(on_curve(n), 3) for n in (6, 12, 24)]
    assert [float(r[5]) for r in rows] == [round(on_curve(n) + 0.02, 3) for n in (6, 12, 24)]
    assert "Dice = 0.9000 - 0.5000 * N^(-0.500)" in text
    assert "at N = 260: 0.869, an extrapolation, not a measurement; each fold's own curve gives 0.849 to 0.889" in text


def test_report_refuses_mixed_n_and_unequal_folds_with_one_line(tmp_path):
    lc = load()
    write_cv(tmp_path / "a", [6, 12], [0.7, 0.7])
    with pytest.raises(ValueError, match=r"different numbers of patients \[6, 12\]"):
        lc.learning_curve([tmp_path / "a"], 2, None)
    write_cv(tmp_path / "b", [6], [0.7])
    write_cv(tmp_path / "c", [12, 12], [0.8, 0.8])
    write_cv(tmp_path / "d", [24, 24], [0.85, 0.85])
    with pytest.raises(ValueError, match="did not finish the same folds"):
        lc.learning_curve([tmp_path / "b", tmp_path / "c", tmp_path / "d"], 2, None)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_curve.py"), "--folds", "2",
                           str(tmp_path / "c"), str(tmp_path / "d")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "learning_curve.py: error: the fit has 3 parameters: it needs 3 or more training-set sizes, got [12, 24]"]


def test_only_fits_the_folds_every_curve_ran_and_gives_the_references_full_mean_beside(tmp_path):
    """Curves run on folds 0 and 1 of 3 against a reference that ran all 3: without --only the folds differ and
    the report refuses; with --only 0 1 the reference's fold 2 (Dice 0.5, far off the curve) leaves the fit, which
    is again exact, and its mean over all three folds is named beside."""
    lc = load()
    for name, n in (("n6", 6), ("n12", 12)):
        write_cv(tmp_path / name, [n, n], [on_curve(n) + 0.02, on_curve(n) - 0.02])
    write_cv(tmp_path / "ref", [24, 24, 24], [on_curve(24) + 0.02, on_curve(24) - 0.02, 0.5])
    outs = [tmp_path / "n6", tmp_path / "n12", tmp_path / "ref"]
    with pytest.raises(ValueError, match="did not finish the same folds"):
        lc.learning_curve(outs, 3, 260)
    text = lc.learning_curve(outs, 3, 260, [0, 1])
    assert "Dice = 0.9000 - 0.5000 * N^(-0.500)" in text
    assert "at N = 260: 0.869" in text
    full = (2 * on_curve(24) + 0.5) / 3
    assert f"{tmp_path / 'ref'} also finished fold(s) [2]: its mean over all 3 patients is {full:.3f}" in text
    with pytest.raises(ValueError, match=r"n6: fold\(s\) \[2\] of --only not finished"):
        lc.learning_curve(outs, 3, 260, [0, 2])
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_curve.py"), "--folds", "3", *map(str, outs),
                           "--only", "3"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == "learning_curve.py: error: --only takes folds 0 to 2, got [3]"
