"""The learning curve: mean test Dice against the number of training patients, over cross-validations of one recipe.

    python bench/learning_curve.py --folds 8 runs/lc32_6 runs/lc32_12 runs/lc32_18 runs/cv32 --at 260
    python bench/learning_curve.py --folds 8 runs/lc32_6 runs/lc32_12 records/cv32-recipe --at 260 --only 0 1 2 3

Each OUT is a finished `bench/cv.py` cross-validation (the same folds, the recipe trained with `--train-patients N`,
or on every training patient); N is read from each fold's split.json (the patients it trained on), never given by
hand. The fit is mean Dice = a - b * N^(-c), by least squares over the cross-validations' per-patient means (c on a
grid of 0.001 steps in (0, 4], a and b solved exactly for each c); with as many points as parameters or one more it
describes the points, it does not test a law. `--at N` gives the fit's value at N (e.g. the ~260 training patients of
BraTS 2020 under a 70/15/15 split) **as an extrapolation, not a measurement**, with its spread over the folds: each
fold's own curve (the mean over its test patients at each N) fitted the same way.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import git_commit, machine, utc_now  # noqa: E402
from cv import read_folds  # noqa: E402

C_GRID = np.arange(1, 4001) / 1000.0  # the exponents tried: 0.001 to 4.000


def fit_power(ns: list[float], dice: list[float]) -> tuple[float, float, float]:
    """(a, b, c) minimising the squared error of dice ≈ a - b * ns^(-c): for each c of C_GRID the linear least squares
    in (a, b), then the c with the smallest error (the first on a tie). Needs 3 or more distinct N."""
    n = np.asarray(ns, dtype=np.float64)
    y = np.asarray(dice, dtype=np.float64)
    if len(set(ns)) < 3:
        raise ValueError(f"the fit has 3 parameters: it needs 3 or more training-set sizes, got {sorted(set(ns))}")
    best = None
    for c in C_GRID:
        design = np.stack([np.ones_like(n), -n ** -c], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        sse = float(((design @ np.array([a, b]) - y) ** 2).sum())
        if best is None or sse < best[0] - 1e-15:
            best = (sse, float(a), float(b), float(c))
    return best[1], best[2], best[3]


def curve_at(params: tuple[float, float, float], n: float) -> float:
    a, b, c = params
    return a - b * n ** -c


def trained_patients(out: Path, folds: list[int]) -> int:
    """N of one cross-validation: how many patients each of its folds trained on (the same in every fold)."""
    counts = set()
    for fold in folds:
        split = json.loads((out / f"fold{fold}" / "split.json").read_text())
        counts.add(len(split.get("trained_on", split["train"])))
    if len(counts) != 1:
        raise ValueError(f"{out}: its folds trained on different numbers of patients {sorted(counts)}")
    return counts.pop()


def learning_curve(outs: list[Path], k: int, at: float | None, only: list[int] | None = None) -> str:
    """The report: per cross-validation its N and mean Dice (all patients, and per fold), the fit, the value --at.
    `only` keeps those folds of every cross-validation (each must have finished them all), so that a curve run on
    some folds meets a reference run on all; a reference's mean over all its folds is given beside, for the bias."""
    points, beside = [], []  # (N, out, rows); lines on the folds `only` left out
    for out in outs:
        rows, walls, _ = read_folds(out, k)
        if not rows:
            raise ValueError(f"{out}: no finished fold (no fold<i>/metrics.json of {k} folds)")
        if only is not None:
            missing = sorted(set(only) - set(walls))
            if missing:
                raise ValueError(f"{out}: fold(s) {missing} of --only not finished")
            extra = sorted(set(walls) - set(only))
            if extra:
                beside.append(f"{out} also finished fold(s) {extra}: its mean over all "
                              f"{len(rows)} patients is {statistics.mean(r['dice'] for r in rows):.3f}")
            rows = [r for r in rows if r["fold"] in only]
            walls = {f: walls[f] for f in only}
        points.append((trained_patients(out, sorted(walls)), out, rows))
    fold_sets = {tuple(sorted({r["fold"] for r in rows})) for _, _, rows in points}
    if len(fold_sets) != 1:
        raise ValueError(f"the cross-validations did not finish the same folds: {sorted(fold_sets)}")
    folds = list(fold_sets.pop())
    points.sort(key=lambda p: p[0])
    ns = [n for n, _, _ in points]
    means = [statistics.mean(r["dice"] for r in rows) for _, _, rows in points]
    lines = [f"machine: {machine('cpu')}; {utc_now()}; commit {git_commit()}", "",
             "| training patients | cross-validation | patients tested | mean Dice | min | "
             + " | ".join(f"fold {f}" for f in folds) + " |",
             "|---:|---|---:|---:|---:|" + "---:|" * len(folds)]
    per_fold = {}
    for (n, out, rows), mean in zip(points, means):
        fold_means = [statistics.mean(r["dice"] for r in rows if r["fold"] == f) for f in folds]
        for f, m in zip(folds, fold_means):
            per_fold.setdefault(f, []).append(m)
        lines.append(f"| {n} | {out} | {len(rows)} | {mean:.3f} | {min(r['dice'] for r in rows):.3f} | "
                     + " | ".join(f"{m:.3f}" for m in fold_means) + " |")
    if only is not None:
        lines += ["", f"folds {' '.join(map(str, folds))} of {k} only (--only)"] + beside
    params = fit_power(ns, means)
    a, b, c = params
    edge = " (c at the grid's edge: the points do not pin the curvature)" if c in (C_GRID[0], C_GRID[-1]) else ""
    residual = max(abs(curve_at(params, n) - m) for n, m in zip(ns, means))
    lines += ["", f"fit over the {len(ns)} means: Dice = {a:.4f} - {b:.4f} * N^(-{c:.3f}){edge}; largest residual "
                  f"{residual:.4f}; {len(ns)} points, 3 parameters"]
    if at:
        fold_values = [curve_at(fit_power(ns, per_fold[f]), at) for f in folds]
        lines.append(f"at N = {at:g}: {curve_at(params, at):.3f}, an extrapolation, not a measurement; each fold's own "
                     f"curve gives {min(fold_values):.3f} to {max(fold_values):.3f} (median "
                     f"{statistics.median(fold_values):.3f}, {len(folds)} folds)")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("outs", type=Path, nargs="+", metavar="OUT", help="bench/cv.py output folders, one per N")
    p.add_argument("--folds", type=int, default=8, help="K of the cross-validations (default 8)")
    p.add_argument("--at", type=float, default=None, help="also the fitted curve's value at this N (an extrapolation)")
    p.add_argument("--only", type=int, nargs="+", default=None, metavar="FOLD",
                   help="use only these folds of every cross-validation (e.g. a curve run on some folds)")
    args = p.parse_args()
    if args.only is not None and not all(0 <= f < args.folds for f in args.only):
        p.error(f"--only takes folds 0 to {args.folds - 1}, got {args.only}")
    try:
        text = learning_curve(args.outs, args.folds, args.at, sorted(set(args.only)) if args.only is not None else None)
    except (ValueError, OSError, KeyError) as e:
        print(f"learning_curve.py: error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
