"""The CPU speed settings side by side at the recipe's shape: fp32 or bf16 autocast, with or without channels_last,
with or without torch.compile.

    python bench/cpu_speed.py                      # the README recipe's step: batch 16, 12 x 128 x 128, base 16, InstanceNorm
    python bench/cpu_speed.py --threads 1          # as bench/cv.py --jobs 2 runs each fold
    python bench/cpu_speed.py --out bench/cpu_speed.md
    python bench/cpu_speed.py --compile off        # without the two torch.compile rows (a minute of compilation each)

What `--amp auto` / `--channels-last auto` / `--compile auto` (inference.resolve_speed) choose on a CPU rests on
these numbers: bf16 only with native bf16 (AVX512-BF16 or AMX), channels_last never, torch.compile never. Each setting is train.py's own step
(train.build_model, train.make_optimizer, train.make_train_step) on a fixed random batch, and an evaluation
forward pass (no_grad, the same autocast) as validation and predict.py run it. The settings are timed in
interleaved rounds, so a machine that slows down or speeds up during the run touches every setting alike; the
table gives the median over the rounds and their range, and the first call of each setting on its own (for the
compiled rows, the compilation). The compiled rows are an upper bound: 1.45x over eager fp32 here against 1.08x an
epoch in train.py on the same CPU (bench/RESULTS.md, "CPU speed settings").
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import data  # noqa: E402
import inference  # noqa: E402
import train  # noqa: E402
from common import git_commit, machine, utc_now  # noqa: E402

SETTINGS = [("off", "off", "off"), ("off", "on", "off"), ("bf16", "off", "off"), ("bf16", "on", "off"),
            ("off", "off", "on"), ("bf16", "off", "on")]  # (--amp, --channels-last, --compile)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/cpu_speed.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--context", type=int, default=1, help="neighbouring slices each side: 4 x (2 x CONTEXT + 1) channels")
    p.add_argument("--norm", default="instance", choices=("batch", "instance"))
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    p.add_argument("--steps", type=int, default=3, help="steps per setting per round (default 3)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", default="on", choices=("on", "off"),
                   help="time the torch.compile rows too (default on; each compiles for about a minute at the recipe's shape)")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    for name in ("size", "batch_size", "base", "rounds", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.context < 0 or args.threads < 0:
        p.error("--context and --threads must be >= 0")
    return args


def make_runners(args: argparse.Namespace, amp: str, channels_last: str, compile: str):
    """(train step, evaluation forward) callables of one setting, each on its own fixed batch; with compile on, the
    step's forward + loss as train.py compiles it and the evaluation model as train.py's test compiles it."""
    device = torch.device("cpu")
    cfg = dataclasses.replace(train.TrainConfig(), size=args.size, batch_size=args.batch_size, base=args.base,
                              context=args.context, norm=args.norm, amp=amp, channels_last=channels_last,
                              compile=compile, device="cpu")
    speed = inference.resolve_speed(device, amp, channels_last, compile)
    torch.manual_seed(0)
    model = train.build_model(cfg)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = train.make_optimizer(model, cfg, device, 10_000, 1)
    step = train.make_train_step(model, optimizer, scheduler, train.make_scaler(device, speed), cfg, device, speed)
    x = torch.randn(args.batch_size, model.cfg.in_channels, args.size, args.size)
    y = (torch.rand(args.batch_size, 1, args.size, args.size) > 0.9).to(torch.uint8)
    x_eval = x.contiguous(memory_format=torch.channels_last) if speed.channels_last else x
    eval_model = torch.compile(model) if speed.compile else model

    def train_step() -> None:
        model.train()
        step(x, y)

    def evaluate() -> None:
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=speed.amp or torch.float32, enabled=speed.amp is not None):
            eval_model(x_eval)

    return train_step, evaluate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = inference.resolve_speed(torch.device("cpu"))
    settings = [s for s in SETTINGS if args.compile == "on" or s[2] == "off"]
    runners = {s: make_runners(args, *s) for s in settings}
    times = {(s, kind): [] for s in settings for kind in ("train", "eval")}
    first = {}
    for s, (train_step, evaluate) in runners.items():  # warm-up: oneDNN builds its kernels, torch.compile compiles
        calls = []
        for fn in (train_step, evaluate):
            t = time.perf_counter()
            fn()
            calls.append(time.perf_counter() - t)
        first[s] = calls
        train_step()
        evaluate()
        print(f"warm-up of --amp {s[0]} --channels-last {s[1]} --compile {s[2]} done", file=sys.stderr, flush=True)
    for r in range(args.rounds):
        for s, (train_step, evaluate) in runners.items():
            for kind, fn in (("train", train_step), ("eval", evaluate)):
                t = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[(s, kind)].append((time.perf_counter() - t) / args.steps)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    channels = 4 * (2 * args.context + 1)
    header = [
        f"machine: {machine('cpu')}; native bf16: {', '.join(inference.cpu_bf16_flags()) or 'none'}; "
        f"threads {torch.get_num_threads()}",
        f"date: {utc_now()}; git commit {git_commit()}",
        f"workload: U-Net base {args.base}, {args.norm} norm, batch {args.batch_size} x {channels} x {args.size} x "
        f"{args.size}; median over {args.rounds} interleaved rounds of {args.steps} calls per setting",
        f"auto chooses here: {auto}",
    ]
    fp32 = {kind: statistics.median(times[(("off", "off", "off"), kind)]) for kind in ("train", "eval")}
    lines = ["| --amp | --channels-last | --compile | first step + forward s | train step s | range | vs fp32 | "
             "eval forward s | range | vs fp32 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in settings:
        cells = [f"{first[s][0]:.1f} + {first[s][1]:.1f}"]
        for kind in ("train", "eval"):
            ts = times[(s, kind)]
            cells += [f"{statistics.median(ts):.3f}", f"{min(ts):.3f}–{max(ts):.3f}",
                      f"{fp32[kind] / statistics.median(ts):.2f}x"]
        lines.append(f"| {s[0]} | {s[1]} | {s[2]} | " + " | ".join(cells) + " |")
    report = "\n".join(header) + "\n\n" + "\n".join(lines) + (
        "\n\n- vs fp32: fp32 time / this time (above 1: faster)\n"
        "- first step + forward: each setting's first training step and evaluation forward, before the timed rounds "
        "(oneDNN's kernel set-up; with --compile on, the compilation)\n")
    print(report)
    if args.out:
        with data.atomic_path(Path(args.out)) as tmp:
            tmp.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
