"""K-fold cross-validation by patient: run train.py once per fold, then report every patient's test metrics.

    python bench/cv.py --folds 7 --out runs/cv -- --data nifti:../shared/data/brats-sample --size 128 --device cpu
    python bench/cv.py --folds 7 --out runs/cv --report-only          # the table of folds already run

Fold i trains with `--folds K --fold i` (test = fold i, validation = fold i + 1, training = the rest), so every
patient is a test patient exactly once and nothing is chosen on it. Folds run --jobs at a time (each with
OMP_NUM_THREADS = cores / jobs, train.py in the folder cv.py runs in); a fold whose metrics.json exists is not run
again, one with a last.pt is resumed, any other starts over. The report (stdout and OUT/cv.md): one row per patient
(fold, site, Dice, IoU, HD95, tumour volume; with --target regions each region's Dice and HD95), then mean, std and
min over patients, over each site (data.site_of) and over each --group NAME=ID,ID,... and the rest, with the folds'
wall times; --against OTHER_OUT compares each patient's whole-tumour Dice with another cross-validation's on the
same folds (a lever against the recipe).

    python bench/cv.py --folds 7 --out runs/cv --retest runs/cv_retest   # the test phase again, with today's code

--retest tests each finished fold's best.pt again with the current code (post-processing re-chosen on the fold's
validation patients, test patients evaluated once: train.py's test phase) and reports it against OUT: a
post-processing lever measured without retraining. With unchanged code it reproduces each fold's metrics.json.

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
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import inference  # noqa: E402
import train  # noqa: E402
from common import git_commit, machine, utc_now  # noqa: E402


def run_fold(fold: int, args, train_args: list[str]) -> tuple[int, int, float]:
    """Run (or resume) one fold; (fold, exit code, seconds)."""
    out = args.out / f"fold{fold}"
    if (out / "metrics.json").exists():
        return fold, 0, 0.0
    cmd = [sys.executable, str(REPO / "train.py")]
    cmd += ["--resume", str(out)] if (out / "last.pt").exists() else \
        [*train_args, "--folds", str(args.folds), "--fold", str(fold), "--out", str(out), "--overwrite", "on"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
    t = time.perf_counter()
    with open(args.out / f"fold{fold}.log", "a") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return fold, code, time.perf_counter() - t


def fold_cache(cfg: dict) -> data.Cache:
    """The cache a fold trained on, from its config.json (its relative paths, like train.py's, relative to the
    folder cv.py runs in)."""
    return data.prepare(cfg["data"], cfg["size"], cfg["cache_dir"], cfg["crop"] == "on")


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
        cache = fold_cache(cfg)
        predictor = inference.Predictor.from_checkpoints([run / "best.pt"], device)
        for vid, p in inference.volume_probs(predictor, cache, split["val"]).items():
            probs[f"{fold}/{vid}"], truth[f"{fold}/{vid}"] = p, cache.full_labels(vid)
        runs[fold] = (split["test"], predictor, cache, {v["id"]: v["dice"] for v in result["test"]["per_volume"]})
        regions = predictor.regions
        print(f"fold {fold}: validation probabilities of {', '.join(split['val'])}", flush=True)
    if not runs:
        raise data.UserError(f"no finished fold in {args.out} (fold<i>/metrics.json) to choose on")

    def rule(keys: list[str]) -> tuple[dict, str]:
        post, dice = inference.choose_region_postprocessing({k: probs[k] for k in keys}, {k: truth[k] for k in keys},
                                                            regions)
        return post, (f"{inference.format_postprocess(post, regions)} (mean Dice "
                      f"{', '.join(f'{r.upper()} {d:.3f}' for r, d in dice.items())} over {len(keys)} validation runs)")

    lines = ["", "| post-processing chosen on pooled validation runs | --postprocess | test Dice with it | "
                 "with the fold's own choice |", "|---|---|---|---|"]
    pooled, own = [], []
    for fold, (test_ids, predictor, cache, own_dice) in runs.items():
        post, text = rule([k for k in probs if k.split("/", 1)[1] not in test_ids])
        summary = inference.evaluate(inference.volume_probs(predictor, cache, test_ids), cache, post, regions)[0]
        pooled += [v["dice"] for v in summary["per_volume"]]
        own += [own_dice[v["id"]] for v in summary["per_volume"]]
        lines.append(f"| fold {fold} (runs without its test patients) | {text} | "
                     f"{', '.join(f'{v:.3f}' for v in pooled[-len(test_ids):])} | "
                     f"{', '.join(f'{v:.3f}' for v in own[-len(test_ids):])} |")
    lines.append(f"| mean over {len(pooled)} test patients | | {statistics.mean(pooled):.3f} | {statistics.mean(own):.3f} |")
    lines.append(f"| a final model (every run) | {rule(list(probs))[1]} | | |")
    return "\n".join(lines) + "\n"


def retest(args) -> None:
    """Each finished fold of --out tested again with the current code into RETEST/fold<i>: its best.pt (weights) with
    the post-processing chosen again on the fold's own validation patients (a fold with a fixed --postprocess keeps
    it) and its test patients evaluated once, by train.py's own test phase; config, split and log copied, so the
    report reads RETEST like a cross-validation. A post-processing lever measured without retraining."""
    names = {f.name for f in dataclasses.fields(train.TrainConfig)}
    for fold in range(args.folds):
        src, dst = args.out / f"fold{fold}", args.retest / f"fold{fold}"
        if not (src / "metrics.json").exists() or (dst / "metrics.json").exists():
            continue
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("best.pt", "config.json", "split.json", "log.jsonl"):
            shutil.copy2(src / name, dst / name)
        stored = json.loads((src / "config.json").read_text())
        cfg = train.TrainConfig(**{**{k: v for k, v in stored.items() if k in names}, "out": str(dst), "device": "cpu"})
        device = torch.device("cpu")
        run = train.Run(device, inference.resolve_speed(device, cfg.amp, cfg.channels_last, cfg.compile), dst)
        cache = fold_cache(stored)
        log = [json.loads(line) for line in (dst / "log.jsonl").read_text().splitlines()]
        epochs = json.loads((src / "metrics.json").read_text()).get("epochs", len(log))
        print(f"fold {fold}: ", end="", flush=True)
        result = train.test(cfg, run, cache, json.loads((dst / "split.json").read_text()), log, epochs)[0]
        train.save_metrics(dst, result)


def summary_rows(name: str, rows: list[dict], regions: list[str]) -> list[str]:
    """Mean, std, min and max of Dice, IoU and HD95 (and each further region's Dice and HD95) over `rows`."""
    lines = []
    keys = [("Dice", "dice"), ("IoU", "iou"), ("HD95 mm", "hd95_mm")]
    keys += [(f"{r.upper()} {label}", f"{r}_{key}") for r in regions[1:] for label, key in (("Dice", "dice"), ("HD95 mm", "hd95_mm"))]
    for label, key in keys:
        values = [r[key] for r in rows]
        lines.append(f"| {name} ({len(rows)}) | {label} | {statistics.mean(values):.3f} | {statistics.pstdev(values):.3f} | "
                     f"{min(values):.3f} | {max(values):.3f} |")
    return lines


def read_folds(out: Path, folds: int) -> tuple[list[dict], dict, list[str]]:
    """The finished folds under `out`: one row per test patient, each fold's training seconds, the regions."""
    rows, walls, regions = [], {}, ["wt"]
    for fold in range(folds):
        path = out / f"fold{fold}" / "metrics.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        if result["test"] is None:
            raise data.UserError(f"fold {fold} in {out} trained on every patient (--train-on all): no test patient to "
                                 f"report")
        log = [json.loads(line) for line in (out / f"fold{fold}" / "log.jsonl").read_text().splitlines()]
        walls[fold] = sum(r["seconds"] for r in log)
        fold_regions, post = inference.region_post(result)  # either metrics.json format
        if rows and fold_regions != regions:
            raise SystemExit(f"cv.py: error: fold {fold} predicts {fold_regions}, the folds before it {regions}: one "
                             f"cross-validation is of one --target")
        regions = fold_regions
        fixed = result.get("val_dice_at_choice", result.get("val_volume_dice_at_choice", 0)) is None
        for v in result["test"]["per_volume"]:
            row = {"id": v["id"], "fold": fold, "site": data.site_of(v["id"]) or "-", "dice": v["dice"], "iou": v["iou"],
                   "hd95_mm": v["hd95_mm"], "ml": v["tumour_voxels"] / 1000,
                   "post": f"{inference.format_postprocess(post, regions)} ({'fixed' if fixed else 'chosen on validation'})"}
            for r in regions[1:]:
                row.update({f"{r}_dice": v["regions"][r]["dice"], f"{r}_hd95_mm": v["regions"][r]["hd95_mm"]})
            rows.append(row)
    return rows, walls, regions


def against(rows: list[dict], other: Path, folds: int) -> list[str]:
    """Per patient, this cross-validation's whole-tumour Dice against another's (a lever against the recipe, regions
    against the binary model) on the patients both tested: the means and how many are higher, lower, equal here."""
    theirs = {r["id"]: r["dice"] for r in read_folds(other, folds)[0]}
    pairs = [(r["dice"], theirs[r["id"]]) for r in rows if r["id"] in theirs]
    if not pairs:
        return ["", f"against {other}: no patient tested in both"]
    higher = sum(a - b > 5e-4 for a, b in pairs)
    lower = sum(b - a > 5e-4 for a, b in pairs)
    mine, other_mean = statistics.mean(a for a, _ in pairs), statistics.mean(b for _, b in pairs)
    return ["", f"against {other} (whole-tumour Dice, the {len(pairs)} patients both tested): mean {mine:.3f} here, "
                f"{other_mean:.3f} there ({mine - other_mean:+.3f}); higher here on {higher}, lower on {lower}, "
                f"equal (within 0.0005) on {len(pairs) - higher - lower}"]


def report(args) -> str:
    rows, walls, regions = read_folds(args.out, args.folds)
    extra = "".join(f" {r.upper()} Dice | {r.upper()} HD95 mm |" for r in regions[1:])
    lines = [f"machine: {machine('cpu')}; {utc_now()}; commit {git_commit()}",
             f"folds run: {sorted(walls)} of {args.folds}; training seconds per fold (sum of epochs): "
             + ", ".join(f"{f}: {s:.0f}" for f, s in sorted(walls.items())), "",
             f"| patient | fold | site | Dice | IoU | HD95 mm | tumour mL |{extra} --postprocess |",
             "|---|---:|---|---:|---:|---:|---:|" + "---:|---:|" * (len(regions) - 1) + "---|"]
    for r in sorted(rows, key=lambda r: r["dice"]):
        more = "".join(f" {r[f'{x}_dice']:.3f} | {r[f'{x}_hd95_mm']:.1f} |" for x in regions[1:])
        lines.append(f"| {r['id']} | {r['fold']} | {r['site']} | {r['dice']:.3f} | {r['iou']:.3f} | {r['hd95_mm']:.1f} | "
                     f"{r['ml']:.1f} |{more} {r['post']} |")
    if rows:
        lines += ["", "| patients | metric | mean | std | min | max |", "|---|---|---:|---:|---:|---:|"]
        lines += summary_rows("all", rows, regions)
        for site in sorted({r["site"] for r in rows}) if len({r["site"] for r in rows}) > 1 else []:
            lines += summary_rows(f"site {site}", [r for r in rows if r["site"] == site], regions)
        for name, members in args.group:
            inside = [r for r in rows if r["id"] in members]
            outside = [r for r in rows if r["id"] not in members]
            lines += summary_rows(name, inside, regions) if inside else []
            lines += summary_rows(f"not {name}", outside, regions) if outside else []
        lines += against(rows, args.against, args.folds) if args.against else []
    return "\n".join(lines) + "\n"


def group(text: str) -> tuple[str, set[str]]:
    """--group NAME=ID,ID,...: a named set of patients the report summarises apart (and the rest)."""
    name, _, ids = text.partition("=")
    if not name or not ids:
        raise argparse.ArgumentTypeError(f"expected NAME=ID,ID,..., got {text!r}")
    return name, set(ids.split(","))


def main() -> int:
    try:
        return cross_validate(sys.argv[1:])
    except data.UserError as e:
        print(f"cv.py: error: {e}", file=sys.stderr)
        return 2


def cross_validate(argv: list[str]) -> int:
    """The command line of cv.py: run the folds (or re-test them, or choose their post-processing), then report."""
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--folds", type=int, default=7, help="K (default 7: two test patients a fold on the 14-case sample)")
    p.add_argument("--only", type=int, nargs="*", default=None, help="run only these folds")
    p.add_argument("--jobs", type=int, default=1, help="folds run at the same time")
    p.add_argument("--out", type=Path, required=True, help="OUT/fold<i>/ holds each fold's run folder")
    p.add_argument("--report-only", action="store_true", help="do not run folds, only report those run")
    p.add_argument("--group", type=group, action="append", default=[], metavar="NAME=ID,ID,...",
                   help="also summarise these patients, and the others, apart (repeatable)")
    p.add_argument("--against", type=Path, default=None, metavar="OTHER_OUT",
                   help="also compare each patient's whole-tumour Dice with the cross-validation in OTHER_OUT")
    p.add_argument("--retest", type=Path, default=None, metavar="NEW_OUT",
                   help="do not run folds: test each finished fold again with the current code into NEW_OUT, then "
                        "report it against OUT")
    p.add_argument("--choose-postprocess", action="store_true",
                   help="do not run folds: choose --postprocess on the finished folds' pooled validation patients")
    args = p.parse_args(argv)
    if args.folds < 2 or args.jobs < 1:
        p.error(f"--folds must be at least 2 and --jobs at least 1, got {args.folds} and {args.jobs}")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    if args.choose_postprocess:
        text = choose_postprocessing(args)
        print(text)
        with data.atomic_path(args.out / "postprocess.md") as tmp:
            tmp.write_text(text)
        return 0
    if args.retest:
        retest(args)
        args = argparse.Namespace(**{**vars(args), "out": args.retest, "against": args.against or args.out,
                                     "report_only": True})
    if not args.report_only:
        folds = args.only if args.only is not None else list(range(args.folds))
        with ThreadPoolExecutor(args.jobs) as pool, \
                tqdm(total=len(folds), desc=f"folds ({args.jobs} at a time; each one's progress in its log)",
                     unit="fold", disable=None) as bar:
            for fold, code, seconds in pool.map(lambda f: run_fold(f, args, train_args), folds):
                tqdm.write(f"fold {fold}: exit {code} after {seconds / 60:.1f} min (log {args.out / f'fold{fold}.log'})")
                bar.update()
                if code:
                    failed.append(fold)
    text = report(args)
    print(text)
    with data.atomic_path(args.out / "cv.md") as tmp:
        tmp.write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
