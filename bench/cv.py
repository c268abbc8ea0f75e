"""K-fold cross-validation by patient: run train.py once per fold, then report every patient's test metrics.

    python bench/cv.py --folds 7 --out runs/cv -- --data nifti:../shared/data/brats-sample --size 128 --device cpu
    python bench/cv.py --folds 7 --out runs/cv --report-only          # the table of folds already run

Fold i trains with `--folds K --fold i` (test = fold i, validation = fold i + 1, training = the rest), so every
patient is a test patient exactly once and nothing is chosen on it. Folds run --jobs at a time (each with
OMP_NUM_THREADS = cores / jobs); a fold whose metrics.json exists is not run again, one with a last.pt is resumed.
The report (stdout and OUT/cv.md): one row per patient (fold, Dice, IoU, HD95, tumour volume), then mean, std
and min over patients, with the folds' wall times.

    python bench/cv.py --folds 7 --out runs/cv --choose-postprocess   # a --postprocess for each fold, and one for all

--choose-postprocess pools the validation patients of every finished fold (each fold's best.pt on its own
validation patients) and picks the post-processing with the best mean Dice over them: for each fold i, from the
validation runs that exclude fold i's test patients (the rule a train+val CV may give fold i without seeing its
test patients), and from all of them (the rule for a final model); with the test Dice each fold's patients get
under its pooled rule and under its own choice; written to OUT/postprocess.md. Two validation patients per fold are too few to
choose on; fourteen validation runs are not.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import data  # noqa: E402
import inference  # noqa: E402
from common import git_commit, machine, utc_now  # noqa: E402


def run_fold(fold: int, args, train_args: list[str]) -> tuple[int, int, float]:
    """Run (or resume) one fold; (fold, exit code, seconds)."""
    out = args.out / f"fold{fold}"
    if (out / "metrics.json").exists():
        return fold, 0, 0.0
    cmd = [sys.executable, str(REPO / "train.py")]
    cmd += ["--resume", str(out)] if (out / "last.pt").exists() else \
        [*train_args, "--folds", str(args.folds), "--fold", str(fold), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
    t = time.perf_counter()
    with open(args.out / f"fold{fold}.log", "a") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return fold, code, time.perf_counter() - t


def choose_postprocessing(args) -> str:
    """The --postprocess of each fold, and of a final model, chosen on the pooled validation runs (module docstring);
    with each fold's test Dice under that rule and under the fold's own choice (on its two validation patients)."""
    probs, truth, runs, device = {}, {}, {}, torch.device("cpu")
    for fold in range(args.folds):
        run = args.out / f"fold{fold}"
        if not (run / "metrics.json").exists():
            continue
        cfg, split, result = (json.loads((run / name).read_text()) for name in ("config.json", "split.json", "metrics.json"))
        if cfg.get("train_on", "train") != "train":
            raise SystemExit(f"cv.py: error: fold {fold} trained on its validation patients (--train-on "
                             f"{cfg['train_on']}): nothing can be chosen on them")
        cache_dir = cfg["cache_dir"] and REPO / cfg["cache_dir"]  # train.py ran in REPO
        cache = data.prepare(cfg["data"], cfg["size"], cache_dir, cfg["crop"] == "on")
        predictor = inference.Predictor.from_checkpoints([run / "best.pt"], device)
        for vid, p in inference.volume_probs(predictor, cache, split["val"]).items():
            probs[f"{fold}/{vid}"], truth[f"{fold}/{vid}"] = p, cache.full_masks(vid)
        runs[fold] = (split["test"], predictor, cache, {v["id"]: v["dice"] for v in result["test"]["per_volume"]})
        print(f"fold {fold}: validation probabilities of {', '.join(split['val'])}", flush=True)

    def rule(keys: list[str]) -> tuple[dict, str]:
        post, dice = inference.choose_postprocessing({k: probs[k] for k in keys}, {k: truth[k] for k in keys})
        return post, (f"{post['threshold']},{post['min_component']},{'on' if post['largest_3d'] else 'off'} "
                      f"(mean Dice {dice:.3f} over {len(keys)} validation runs)")

    lines = ["", "| post-processing chosen on pooled validation runs | --postprocess | test Dice with it | "
                 "with the fold's own choice |", "|---|---|---|---|"]
    pooled, own = [], []
    for fold, (test_ids, predictor, cache, own_dice) in runs.items():
        post, text = rule([k for k in probs if k.split("/", 1)[1] not in test_ids])
        summary = inference.evaluate(inference.volume_probs(predictor, cache, test_ids), cache, post)[0]
        pooled += [v["dice"] for v in summary["per_volume"]]
        own += [own_dice[v["id"]] for v in summary["per_volume"]]
        lines.append(f"| fold {fold} (runs without its test patients) | {text} | "
                     f"{', '.join(f'{v:.3f}' for v in pooled[-len(test_ids):])} | "
                     f"{', '.join(f'{v:.3f}' for v in own[-len(test_ids):])} |")
    lines.append(f"| mean over {len(pooled)} test patients | | {statistics.mean(pooled):.3f} | {statistics.mean(own):.3f} |")
    lines.append(f"| a final model (every run) | {rule(list(probs))[1]} | | |")
    return "\n".join(lines) + "\n"


def report(args) -> str:
    rows, walls = [], {}
    for fold in range(args.folds):
        path = args.out / f"fold{fold}" / "metrics.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        log = [json.loads(line) for line in (args.out / f"fold{fold}" / "log.jsonl").read_text().splitlines()]
        walls[fold] = sum(r["seconds"] for r in log)
        for v in result["test"]["per_volume"]:
            rows.append((v["id"], fold, v["dice"], v["iou"], v["hd95_mm"], v["tumour_voxels"] / 1000,
                         result["threshold"], result["min_component"], result["largest_3d"],
                         "fixed" if result.get("val_volume_dice_at_choice", 0) is None else "chosen on validation"))
    lines = [f"machine: {machine('cpu')}; {utc_now()}; commit {git_commit()}",
             f"folds run: {sorted(walls)} of {args.folds}; training seconds per fold (sum of epochs): "
             + ", ".join(f"{f}: {s:.0f}" for f, s in sorted(walls.items())), "",
             "| patient | fold | Dice | IoU | HD95 mm | tumour mL | post-processing |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for pid, fold, dice, iou, hd, ml, th, mc, l3, how in sorted(rows, key=lambda r: r[2]):
        lines.append(f"| {pid} | {fold} | {dice:.3f} | {iou:.3f} | {hd:.1f} | {ml:.1f} | threshold {th}, min {mc} px, "
                     f"largest 3D {'on' if l3 else 'off'} ({how}) |")
    if rows:
        lines += ["", f"| over {len(rows)} patients | mean | std | min | max |", "|---|---:|---:|---:|---:|"]
        for name, k in (("Dice", 2), ("IoU", 3), ("HD95 mm", 4)):
            values = [r[k] for r in rows]
            lines.append(f"| {name} | {statistics.mean(values):.3f} | {statistics.pstdev(values):.3f} | "
                         f"{min(values):.3f} | {max(values):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    argv = sys.argv[1:]
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--folds", type=int, default=7, help="K (default 7: two test patients a fold on the 14-case sample)")
    p.add_argument("--only", type=int, nargs="*", default=None, help="run only these folds")
    p.add_argument("--jobs", type=int, default=1, help="folds run at the same time")
    p.add_argument("--out", type=Path, required=True, help="OUT/fold<i>/ holds each fold's run folder")
    p.add_argument("--report-only", action="store_true", help="do not run folds, only report those run")
    p.add_argument("--choose-postprocess", action="store_true",
                   help="do not run folds: choose --postprocess on the finished folds' pooled validation patients")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    if args.choose_postprocess:
        text = choose_postprocessing(args)
        print(text)
        (args.out / "postprocess.md").write_text(text)
        return 0
    if not args.report_only:
        folds = args.only if args.only is not None else list(range(args.folds))
        with ThreadPoolExecutor(args.jobs) as pool:
            for fold, code, seconds in pool.map(lambda f: run_fold(f, args, train_args), folds):
                print(f"fold {fold}: exit {code} after {seconds / 60:.1f} min (log {args.out / f'fold{fold}.log'})", flush=True)
                if code:
                    failed.append(fold)
    text = report(args)
    print(text)
    (args.out / "cv.md").write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
