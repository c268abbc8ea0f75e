"""Train a 2D U-Net to segment the brain tumour on BraTS slices, then evaluate it on unseen patients.

The whole tumour by default (the original work's task); --target regions: BraTS's three nested regions, whole
tumour, tumour core and enhancing tumour, as three overlapping sigmoid outputs.

    python train.py                                          # Kaggle BraTS 2020 (.h5 slices), needs the network
    python train.py --data nifti:../shared/data/brats-sample # official BraTS case folders
    python train.py --data synthetic --size 64 --epochs 2 --device cpu --out runs/smoke
    torchrun --nproc_per_node=8 train.py ...                 # DistributedDataParallel, one process per GPU

main() reads top to bottom: set_up (device, ranks, speed settings) → load_data (cached, split by patient,
batches on the device) → build (model, optimiser, schedule, step) → fit (train_epoch and validate each epoch,
early stopping, checkpoints) → post-processing chosen on validation (or fixed) → test on unseen patients at 240 x 240 →
figures. Everything lands in --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import feed
import figures
import inference
import metrics
from fused_dice import dice_bce_loss
from unet import UNet, UNetConfig, count_parameters

ON_OFF, AUTO_ON_OFF = ("on", "off"), ("auto", "on", "off")
# a field below is named `data`
MODALITIES, INTENSITY, CACHE_DIR, TARGETS = data.CHANNELS, feed.INTENSITY, data.default_cache_dir(), tuple(data.TARGETS)


def option(default, help: str, choices: tuple | None = None, type=None):
    """A config field with its --help text: the one place a flag is documented."""
    return field(default=default, metadata={"help": help, "choices": choices, "type": type})


@dataclass
class TrainConfig:
    # data
    data: str = option("kaggle", "kaggle | synthetic[:VOLUMESxSLICES] | h5:DIR (Kaggle .h5 files) | nifti:DIR "
                                 "(official BraTS case folders)")
    channel: int | None = option(None, f"train on one modality only, an index into {MODALITIES} (0 = FLAIR); "
                                       "None: all four", type=int)
    context: int = option(1, "neighbouring slices on each side stacked as extra input channels (2.5D)")
    size: int = option(240, "slices are resized to SIZE x SIZE pixels for training (unmeasured guess for a GPU: the "
                            "original work's; the sample recipe uses 128)")
    crop: str = option("on", "crop each volume to its brain's box before resizing, so the SIZE pixels span the brain",
                       ON_OFF)
    folds: int = option(0, "K-fold cross-validation by patient: fold --fold is the test set, the next fold the "
                           "validation set; 0: one seeded 70/15/15 split")
    fold: int = option(0, "the test fold (0..K-1) with --folds K")
    train_on: str = option("train", "train+val: also the validation patients; all: every patient, the release model, "
                                    "tested by nobody (the cross-validation is its estimate); both once the epochs and "
                                    "a fixed --postprocess are chosen", ("train", "train+val", "all"))
    train_patients: int = option(0, "train on this many of those patients, drawn by the training seed (a learning "
                                    "curve); 0: all")
    target: str = option("wt", "wt: the whole tumour (labels 1, 2, 4); regions: also the tumour core (1, 4) and the "
                               "enhancing tumour (4), three overlapping sigmoid outputs", TARGETS)
    cache_dir: str | None = option(None, f"preprocessed arrays are cached here; None: $BRATS_CACHE, else "
                                         f"~/.cache/brats-unet (here {CACHE_DIR})", type=str)
    # model
    base: int = option(32, "U-Net width at the first level, doubling at each level down (unmeasured guess for a "
                           "GPU; the sample recipe uses 16)")
    depth: int = option(4, "down-sampling steps of the U-Net")
    norm: str = option("instance", "normalisation layer", ("instance", "batch", "group", "none"))
    # optimisation
    epochs: int = option(40, "epochs at most (unmeasured guess for a GPU; the sample recipe uses 16)")
    time_budget: float = option(0.0, "minutes for set-up and training: after epoch 1 the run keeps the epochs that fit "
                                     "(at most --epochs), printed and kept in metrics.json; 0: no budget")
    batch_size: int = option(32, "slices per batch, per process under torchrun (unmeasured guess for a GPU; the "
                                 "sample recipe uses 16)")
    lr: float = option(2e-3, "peak AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    warmup: float = option(1.0, "epochs of linear warm-up before the cosine decay to 1%% of --lr")
    patience: int = option(0, "stop after this many epochs without a better validation Dice; 0: never stop early")
    select: str = option("last", "the model kept as best.pt and tested: the last epoch (a schedule annealed to its "
                                 "end), or the epoch with the best validation Dice", ("last", "best"))
    postprocess: str = option("val", "val: threshold, smallest 2D component (pixels at 240x240), largest-3D rule and "
                                     "smallest region (voxels) chosen on validation, per region; or fixed as "
                                     "THRESHOLD,MIN_PIXELS,on|off[,MIN_VOXELS] for every region, or one per region "
                                     "joined by / (e.g. 0.3,50,on or 0.4,25,on/0.5,25,on/0.5,0,off,200)")
    bce_weight: float = option(1.0, "weight of BCE in the loss")
    dice_weight: float = option(1.0, "weight of 1 - Dice in the loss")
    # augmentation (on the device)
    augment: str = option("on", f"random flips, 90 degree rotations, brain intensities scaled by 1 ± {INTENSITY} and "
                                f"shifted by ± {INTENSITY}", ON_OFF)
    modality_dropout: float = option(0.5, "this fraction of the samples loses one random modality (0 on every context "
                                          "slice); 0: off (the default with --channel)")
    # speed: each trick one flag, so bench/throughput.py can ablate them
    resident: str = option("on", "training slices in device memory, batches by indexing; off: DataLoader workers read "
                                 "the disk cache", ON_OFF)
    workers: int = option(2, "DataLoader workers with --resident off")
    channels_last: str = option("auto", "channels-last memory format (auto: on CUDA; off on a CPU, where it measured slower)",
                                AUTO_ON_OFF)
    amp: str = option("auto", "autocast dtype (auto: bf16 on CUDA (fp16 where unsupported) and on CPUs with native "
                              "bf16, else fp32)", ("auto", "bf16", "fp16", "off"))
    compile: str = option("auto", "torch.compile the step (auto: on CUDA)", AUTO_ON_OFF)
    loss_backend: str = option("auto", "Dice+BCE implementation (auto: the Triton kernels on CUDA)",
                               ("auto", "triton", "torch"))
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    # run
    seed: int = option(0, "seeds the split and (unless --train-seed) the model's initialisation, shuffling and "
                          "augmentation")
    train_seed: int | None = option(None, "seeds only the initialisation, shuffling and augmentation (the same split, "
                                          "other randomness); None: --seed", type=int)
    out: str = option("runs/latest", "the run folder; one that holds a run is refused unless --overwrite on")
    resume: str | None = option(None, "continue the stopped run in this folder from its last.pt, with its own config",
                                type=str)
    overwrite: str = option("off", "start over in an --out that holds a run (its files are deleted once the data is checked)", ON_OFF)


RESUME_MAY_CHANGE = ("device", "workers", "cache_dir", "resume", "overwrite")  # the rest must match the run's


def make_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """Flags from TrainConfig's fields, their help from each field's documentation. defaults=False: a flag not
    given on the command line is absent from the result (to tell what the user asked for)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Defaults are the recipe measured on the BraTS "
                                "sample (records/README.md), except those marked as unmeasured guesses for a GPU.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        meta = f.metadata
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default if defaults else argparse.SUPPRESS,
                       help=meta["help"], choices=meta["choices"], type=meta["type"] or type(f.default),
                       metavar=None if meta["choices"] else f.name.upper())
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The run's config; with --resume, the stopped run's own config. Bad values are a UserError."""
    cfg = TrainConfig(**vars(make_parser().parse_args(argv)))
    given = vars(make_parser(defaults=False).parse_args(argv))
    if cfg.resume:
        cfg = resumed_config(Path(cfg.resume), given)
    elif cfg.channel is not None and "modality_dropout" not in given:  # one modality: nothing to drop
        cfg = dataclasses.replace(cfg, modality_dropout=0.0)
    check_config(cfg)
    return cfg


def resumed_config(run_dir: Path, given: dict) -> TrainConfig:
    """The config.json of the run in run_dir, with the flags given now that may change (RESUME_MAY_CHANGE); a
    UserError for any other given flag that differs from the run's own."""
    try:
        stored = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise data.UserError(f"--resume {run_dir}: cannot read its config.json ({type(e).__name__}): not a run folder?") from None
    given.setdefault("out", str(run_dir))
    for key, value in given.items():
        same = Path(value).resolve() == run_dir.resolve() if key == "out" else stored.get(key) == value
        if key not in RESUME_MAY_CHANGE and not same:
            raise data.UserError(f"--{key.replace('_', '-')} {value} conflicts with the resumed run's own "
                                 f"{stored.get(key) if key != 'out' else run_dir}: --resume continues a run with its config")
    kept = {k: v for k, v in stored.items() if k in {f.name for f in fields(TrainConfig)}}
    return TrainConfig(**{**kept, **{k: given[k] for k in RESUME_MAY_CHANGE if k in given}, "out": str(run_dir)})


def check_config(cfg: TrainConfig) -> None:
    """Raise a UserError naming the first flag with a bad value."""
    for name, value in asdict(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise data.UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("size", "epochs", "batch_size", "base", "depth"):
        if getattr(cfg, name) <= 0:
            raise data.UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.size >> cfg.depth < 2:
        raise data.UserError(f"--depth {cfg.depth} halves --size {cfg.size} to under 2 px at the bottom of the U-Net: "
                             f"use a smaller --depth or a larger --size")
    for name in ("patience", "context", "workers", "folds", "warmup", "weight_decay", "time_budget", "seed",
                 "train_seed", "train_patients"):
        value = getattr(cfg, name)
        if value is not None and value < 0:  # None: --train-seed not given
            raise data.UserError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if not cfg.lr > 0:
        raise data.UserError(f"--lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.modality_dropout <= 1:
        raise data.UserError(f"--modality-dropout must be in 0..1 (0: off), got {cfg.modality_dropout}")
    if cfg.modality_dropout and cfg.channel is not None:
        raise data.UserError("--modality-dropout needs more than one modality: it cannot be used with --channel")
    if cfg.channel is not None and not 0 <= cfg.channel < len(data.CHANNELS):
        raise data.UserError(f"--channel must be in 0..{len(data.CHANNELS) - 1} ({', '.join(data.CHANNELS)}), got {cfg.channel}")
    if cfg.folds and not 0 <= cfg.fold < cfg.folds:
        raise data.UserError(f"--fold must be in 0..{cfg.folds - 1} with --folds {cfg.folds}, got {cfg.fold}")
    if cfg.time_budget and cfg.warmup < 1:
        raise data.UserError(f"--time-budget needs --warmup of at least 1 epoch (got {cfg.warmup}): the epochs are "
                             f"decided after the first one, whose learning rates must not depend on them")
    fixed_post = inference.parse_postprocess(cfg.postprocess, data.TARGETS[cfg.target])
    if cfg.train_on != "train" and not (cfg.select == "last" and cfg.patience == 0 and fixed_post):
        raise data.UserError(f"--train-on {cfg.train_on} trains on the validation patients, so nothing can be chosen on "
                             "them: it needs --select last --patience 0 and a fixed --postprocess (e.g. 0.3,50,on)")


def training_seed(cfg: TrainConfig) -> int:
    """The seed of everything random in training but the split: --train-seed, or --seed when it is not given."""
    return cfg.seed if cfg.train_seed is None else cfg.train_seed


# ----------------------------------------------------------------------------------------------------------
# Set-up and data


@dataclass
class Run:
    """What set_up decided: where and how this process trains."""

    device: torch.device
    speed: inference.Speed
    out: Path
    rank: int = 0
    world: int = 1
    started: float = 0.0  # time.perf_counter() when set_up began: --time-budget counts from here

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1


def set_up(cfg: TrainConfig) -> Run:
    """Device, torchrun ranks (WORLD_SIZE/RANK/LOCAL_RANK; a plain run is rank 0 of 1), seeds, speed settings."""
    started = time.perf_counter()
    device = inference.resolve_device(cfg.device)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    torch.manual_seed(training_seed(cfg) + rank)
    if device.type == "cuda":
        tune_cuda()
    speed = inference.resolve_speed(device, cfg.amp, cfg.channels_last, cfg.compile)
    run = Run(device, speed, Path(cfg.out), rank, world, started)
    claim_run_folder(cfg, run)
    if run.master:
        print(json.dumps(asdict(cfg)))
    return run


RUN_FILES = ("config.json", "split.json", "log.jsonl", "best.pt", "last.pt", "metrics.json", "curves.png",
             "overlays.png", "failures.png", "failures_tc.png", "failures_et.png")


def claim_run_folder(cfg: TrainConfig, run: Run) -> None:
    """Never overwrite a run silently: an --out that holds one is refused unless --overwrite on (whose old files
    load_data deletes once the new run's data is known to be good); --resume needs a stopped run there."""
    if run.out.exists() and not run.out.is_dir():
        raise data.UserError(f"--out {run.out} is a file, not a folder")
    present = [name for name in RUN_FILES if (run.out / name).exists()]
    if cfg.resume:
        if "metrics.json" in present:
            raise data.UserError(f"--resume {run.out}: this run is finished (metrics.json); nothing to resume")
        if "last.pt" not in present:
            raise data.UserError(f"--resume {run.out}: no last.pt there, nothing to resume from (a run stopped before "
                                 f"its first epoch ended starts over: its flags with --overwrite on)")
    elif present and cfg.overwrite != "on":
        what = "a finished run (metrics.json)" if "metrics.json" in present else \
            f"a stopped run (continue it with --resume {run.out})" if "last.pt" in present else \
            "a run stopped before its first epoch ended (no last.pt: nothing to resume)"
        raise data.UserError(f"--out {run.out} holds {what}: pick another --out, or start over with --overwrite on")


def tune_cuda() -> None:
    """train.py's CUDA settings: cuDNN picks the fastest convolution for each shape, matmuls and convolutions in TF32."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def channel_list(channel: int | None) -> list[int]:
    return list(range(len(data.CHANNELS))) if channel is None else [channel]


def load_data(cfg: TrainConfig, run: Run) -> tuple[data.Cache, dict, feed.TrainBatches, feed.SliceSet]:
    """The cache (built once, by rank 0, while the other ranks wait), the split by patient, the training batches and
    the validation slices; the run folder is written only once the data is known to be good."""
    if run.ddp:  # a full cache build takes far longer than a collective's default timeout: wait on a gloo group
        waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=12))
        if run.master:
            data.prepare(cfg.data, cfg.size, cfg.cache_dir, cfg.crop == "on")
        dist.barrier(group=waiting)
    cache = data.prepare(cfg.data, cfg.size, cfg.cache_dir, cfg.crop == "on")
    split = data.split_volumes(cache.volume_ids, cfg.seed, cfg.folds, cfg.fold)
    channels = channel_list(cfg.channel)
    trained_on = split["train"] + (split["val"] if cfg.train_on != "train" else []) + \
        (split["test"] if cfg.train_on == "all" else [])
    if cfg.train_on == "all":
        split = {**split, "trained_on": sorted(trained_on)}
    if cfg.train_patients:
        if cfg.train_patients > len(trained_on):
            raise data.UserError(f"--train-patients {cfg.train_patients}: the split has only {len(trained_on)} "
                                 f"patients to train on (--train-on {cfg.train_on})")
        drawn = np.random.default_rng(training_seed(cfg)).permutation(len(trained_on))[:cfg.train_patients]
        trained_on = sorted(trained_on[i] for i in drawn)
        split = {**split, "trained_on": trained_on}
    counts = {k: sum(len(cache.volume(v)["slices"]) for v in split[k]) for k in ("train", "val", "test")}
    n_train = sum(len(cache.volume(v)["slices"]) for v in trained_on)
    if n_train == 0 or counts["val"] == 0:
        raise data.DataError("no slices with brain in the training or validation volumes")
    batch_size = min(cfg.batch_size, n_train // run.world)
    batches = feed.TrainBatches(
        cache, trained_on, channels, run.device, batch_size, context=cfg.context, resident=cfg.resident == "on",
        workers=cfg.workers, seed=training_seed(cfg), rank=run.rank, world=run.world, augment=cfg.augment == "on",
        modality_dropout=cfg.modality_dropout, regions=data.TARGETS[cfg.target])
    val_set = feed.load_slices(cache, split["val"], channels, cfg.context, run.device)
    if (cfg.select == "best" or cfg.postprocess == "val") and not val_set.masks.any():
        raise data.DataError(f"the validation patients ({', '.join(split['val'])}) have no tumour, so nothing can be "
                             f"chosen on them (--select best / --postprocess val): use more volumes or another --seed")
    if run.master and not cfg.resume:
        try:
            run.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise data.UserError(f"--out {run.out}: cannot create the run folder: {e.strerror or e}") from None
        for name in RUN_FILES:  # --overwrite on: the old run goes only now (claim_run_folder refused it otherwise)
            if (run.out / name).exists():
                (run.out / name).unlink()
        for name, obj in (("config.json", asdict(cfg)), ("split.json", split)):
            with data.atomic_path(run.out / name) as tmp:
                tmp.write_text(json.dumps(obj, indent=2))
        print(f"data: {len(cache.volume_ids)} volumes, {cache.meta['kept']} slices with brain ({cache.meta['dropped']} "
              f"without brain dropped); split by patient {len(split['train'])}/{len(split['val'])}/{len(split['test'])} "
              f"volumes ({counts['train']}/{counts['val']}/{counts['test']} slices); channels "
              f"{[data.CHANNELS[c] for c in channels]}, context ±{cfg.context}, crop {cfg.crop}")
        if cfg.train_patients:
            print(f"training on {len(trained_on)} of the patients: {', '.join(trained_on)} ({n_train} slices)")
        if cfg.train_on != "train":
            print(f"training on {'train + val' if cfg.train_on == 'train+val' else 'every patient'}: "
                  f"{len(trained_on)} volumes ({n_train} slices); the validation curve is of patients trained on")
    return cache, split, batches, val_set


# ----------------------------------------------------------------------------------------------------------
# Model, optimiser, one step


def build_model(cfg: TrainConfig) -> UNet:
    inputs = len(channel_list(cfg.channel)) * (2 * cfg.context + 1)
    return UNet(UNetConfig(in_channels=inputs, out_channels=len(data.TARGETS[cfg.target]), base=cfg.base,
                           depth=cfg.depth, norm=cfg.norm))


@dataclass
class Schedule:
    """The learning-rate factor of each step: linear warm-up, then cosine decay to 1% at total_steps. An object
    rather than a closure, so LambdaLR saves its fields in last.pt (--time-budget sets total_steps after epoch 1)."""

    total_steps: int
    warmup_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, total_steps: int,
                   warmup_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused on CUDA) and a per-step Schedule: linear warm-up, then cosine decay to 1% of --lr."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(total_steps, warmup_steps))


def epochs_in_budget(budget_s: float, elapsed_s: float, epoch_s: float, max_epochs: int) -> int:
    """--time-budget: the first epoch (done, epoch_s long, elapsed_s since the start) and as many more of its length
    as end within budget_s of the start; at least 1, at most max_epochs."""
    return max(1, min(max_epochs, 1 + int((budget_s - elapsed_s) // epoch_s)))


def make_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                    cfg: TrainConfig, device: torch.device, speed: inference.Speed):
    """One optimisation step `train_step(x, y) -> (loss, detached logits)` with the fast-path tricks in `speed`:
    channels_last input, autocast (fp16 needs an enabled GradScaler), torch.compile of forward + loss (the fused
    loss is one custom op inside the graph). No host synchronisation: loss and logits stay on the device."""

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=speed.amp or torch.float32, enabled=speed.amp is not None):
            logits = model(x)
        loss = dice_bce_loss(logits, y, bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight,
                             backend=cfg.loss_backend)
        return loss, logits.detach()

    forward = torch.compile(forward_loss) if speed.compile else forward_loss

    def train_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, logits = forward(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss, logits

    return train_step


def make_scaler(device: torch.device, speed: inference.Speed) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast; a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=speed.amp == torch.float16)


# ----------------------------------------------------------------------------------------------------------
# One epoch, validation, the training loop; stopping and resuming


class Stopped(Exception):
    """A signal (SIGINT, SIGTERM) asked the run to stop; last.pt has been written."""

    def __init__(self, signum: int):
        self.signum = signum


class StopOnSignal:
    """While active, SIGINT and SIGTERM only set a flag: the loop finishes its step, saves last.pt and stops. Under
    DDP the ranks agree every SIGNAL_CHECK steps (an all-reduce), so they stop at the same step."""

    SIGNAL_CHECK = 20

    def __init__(self, run: Run):
        self.run, self.signum, self.previous = run, None, {}

    def __enter__(self) -> "StopOnSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.request)
        return self

    def request(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, step: int) -> bool:
        if not self.run.ddp:
            return self.signum is not None
        if step % self.SIGNAL_CHECK:
            return False
        flag = torch.tensor([float(self.signum or 0)], device=self.run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item()) or None
        return self.signum is not None


@dataclass
class Progress:
    """Where training stands, saved in last.pt with the weights: the epoch in progress and its batches done (with
    their running totals and seconds when stopped mid-epoch), the log, the early-stopping state and the epochs the
    schedule runs over (--epochs, or what fits --time-budget)."""

    epoch: int = 1
    batch: int = 0
    totals: list[float] | None = None  # loss, intersection, predicted, true, first non-finite step (-1: none)
    seconds: float = 0.0
    log: list[dict] = field(default_factory=list)
    best_dice: float = -math.inf
    stale: int = 0
    epochs: int = 0


def train_epoch(train_step, batches: feed.TrainBatches, epoch: int, run: Run, progress: Progress,
                stop: StopOnSignal) -> dict:
    """Run epoch `epoch` from batch progress.batch on; train loss (mean over batches) and Dice/IoU pooled over its
    pixels (and regions) at threshold 0.5. Totals stay on the device until the one host synchronisation at the end (summed over
    ranks under DDP). On a stop signal: progress is updated to the step reached and Stopped is raised."""
    start = progress.batch
    totals = torch.tensor(progress.totals or [0.0, 0.0, 0.0, 0.0, -1.0], dtype=torch.float64, device=run.device)
    bar = tqdm(total=len(batches) * batches.batch_size * run.world, initial=start * batches.batch_size * run.world,
               desc=f"epoch {epoch}", unit="slice", disable=None if run.master else True, dynamic_ncols=True)
    t0 = time.perf_counter() - progress.seconds
    for b, (x, y) in enumerate(batches.epoch(epoch, start), start):
        loss, logits = train_step(x, y)
        inter, pred, true = metrics.counts(logits > 0, y)
        first_bad = torch.where((totals[4] < 0) & ~torch.isfinite(loss.detach()), float(b), totals[4])
        totals = torch.stack([totals[0] + loss.detach(), totals[1] + inter.sum(), totals[2] + pred.sum(),
                              totals[3] + true.sum(), first_bad])
        bar.update(x.shape[0] * run.world)
        if stop.requested(b + 1):
            bar.close()
            progress.batch, progress.totals, progress.seconds = b + 1, totals.tolist(), time.perf_counter() - t0
            raise Stopped(stop.signum)
    bar.close()
    if run.ddp:
        totals[4] = torch.where(totals[4] < 0, math.inf, totals[4])
        dist.all_reduce(totals[:4])
        dist.all_reduce(totals[4:], op=dist.ReduceOp.MIN)
    loss, inter, pred, true, first_bad = totals.tolist()  # the one host synchronisation of the epoch
    seconds = time.perf_counter() - t0
    if 0 <= first_bad < math.inf:
        raise data.UserError(f"the loss became NaN or infinite at epoch {epoch}, step {int(first_bad) + 1} of "
                             f"{len(batches)}: training stopped; " + (
                                 f"the last good checkpoint is {run.out / 'last.pt'} (end of epoch {epoch - 1})"
                                 if epoch > 1 else "no checkpoint was written yet") + "; try a lower --lr")
    inter, pred, true = torch.tensor(inter), torch.tensor(pred), torch.tensor(true)
    return {"train_loss": loss / (len(batches) * run.world), "train_dice": metrics.dice_from_counts(inter, pred, true).item(),
            "train_iou": metrics.iou_from_counts(inter, pred, true).item(), "seconds": seconds,
            "slices_per_s": len(batches) * batches.batch_size * run.world / seconds}


@torch.inference_mode()
def validate(model: torch.nn.Module, val_set: feed.SliceSet, cfg: TrainConfig, run: Run, batch_size: int) -> dict:
    """Validation loss (Dice + BCE), and Dice and IoU per volume and region (their mean; with several regions each
    region's Dice too) at the training size and threshold 0.5. Every rank validates (the set is small and
    resident); under DDP rank 0's numbers are every rank's (BatchNorm statistics differ per rank), so all ranks
    stop together."""
    regions = data.TARGETS[cfg.target]
    logits = inference.predict_logits(model, val_set.images, val_set.context, run.device, batch_size, run.speed)
    masks = data.region_masks(val_set.masks.to(run.device), regions)
    loss = dice_bce_loss(logits, masks, bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight, backend="torch")
    volume = val_set.volume.to(run.device)
    dice, iou = [], []
    for i in range(len(regions)):
        per_slice = metrics.counts(logits[:, i] > 0, masks[:, i])
        per_volume = [torch.zeros(len(val_set.volume_ids), dtype=torch.float64, device=run.device).index_add_(0, volume, c)
                      for c in per_slice]
        dice.append(metrics.dice_from_counts(*per_volume).tolist())
        iou.append(metrics.iou_from_counts(*per_volume).tolist())
    val = {"val_loss": loss.item(), "val_dice": metrics.nanmean(sum(dice, [])), "val_iou": metrics.nanmean(sum(iou, []))}
    if len(regions) > 1:
        val.update({f"val_dice_{r}": metrics.nanmean(d) for r, d in zip(regions, dice)})
    if run.ddp:
        agreed = torch.tensor(list(val.values()), dtype=torch.float64, device=run.device)
        dist.broadcast(agreed, 0)
        val = dict(zip(val, agreed.tolist()))
    return val


def save_last(path: Path, model, optimizer, scheduler, scaler, progress: Progress) -> None:
    """last.pt: everything needed to continue exactly (the batches and augmentations are functions of the seed,
    epoch and batch index, so they need no state)."""
    inference.save_checkpoint({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": asdict(progress), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, path)


def load_last(path: Path, model, optimizer, scheduler, scaler) -> Progress:
    """Restore what save_last saved; the Progress to continue from."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(**state["progress"])


def fit(cfg: TrainConfig, run: Run, model: UNet, batches: feed.TrainBatches,
        val_set: feed.SliceSet) -> tuple[list[dict], int]:
    """Train for --epochs (or those that fit --time-budget, or until early stopping), validating after every epoch;
    rank 0 logs each epoch to log.jsonl, keeps best.pt and writes last.pt (with --resume, training continues from
    it). Returns the log and the epochs the schedule ran over."""
    train_model = torch.nn.parallel.DistributedDataParallel(model) if run.ddp else model
    optimizer, scheduler = make_optimizer(model, cfg, run.device, cfg.epochs * len(batches),
                                          max(1, int(cfg.warmup * len(batches))))
    scaler = make_scaler(run.device, run.speed)
    train_step = make_train_step(train_model, optimizer, scheduler, scaler, cfg, run.device, run.speed)
    eval_model = torch.compile(model) if run.speed.compile else model
    progress = load_last(run.out / "last.pt", model, optimizer, scheduler, scaler) if cfg.resume else Progress()
    progress.epochs = progress.epochs or cfg.epochs
    if run.master and cfg.resume:
        print(f"resuming {run.out} at epoch {progress.epoch}, batch {progress.batch} of {len(batches)}")
        with data.atomic_path(run.out / "log.jsonl") as tmp:  # drop lines of an epoch that last.pt does not hold
            tmp.write_text("".join(json.dumps(r) + "\n" for r in progress.log))
    last = run.out / "last.pt"
    with StopOnSignal(run) as stop:
        while progress.epoch <= progress.epochs and not (cfg.patience and progress.stale >= cfg.patience):
            epoch, epochs = progress.epoch, progress.epochs
            train_model.train()
            try:
                record = {"epoch": epoch, **train_epoch(train_step, batches, epoch, run, progress, stop)}
            except Stopped as s:
                if run.master:
                    save_last(last, model, optimizer, scheduler, scaler, progress)
                    print(f"stopped by {signal.Signals(s.signum).name} at epoch {epoch}, batch {progress.batch}: "
                          f"resume with `python train.py --resume {run.out}`", file=sys.stderr)
                raise
            trained = time.perf_counter()
            val = validate(eval_model, val_set, cfg, run, 2 * batches.batch_size)
            record.update(val, lr=optimizer.param_groups[0]["lr"])
            if epoch == 1 and cfg.time_budget:
                epoch_s = record["seconds"] + time.perf_counter() - trained  # training (resumed or not) + validation
                epochs = fit_budget(cfg, run, epoch_s, len(batches), scheduler.lr_lambdas[0])
            improved = record["val_dice"] > progress.best_dice
            progress = Progress(epoch + 1, 0, None, 0.0, progress.log + [record],
                                record["val_dice"] if improved else progress.best_dice, 0 if improved else progress.stale + 1,
                                epochs)
            if run.master:
                print(f"epoch {epoch}/{epochs}: loss {record['train_loss']:.4f}, val loss {val['val_loss']:.4f}, val "
                      f"Dice {val['val_dice']:.4f}, val IoU {val['val_iou']:.4f}, {record['slices_per_s']:.0f} slices/s",
                      flush=True)
                with open(run.out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if improved or cfg.select == "last":
                    best = inference.make_checkpoint(model, asdict(cfg), channel_list(cfg.channel), epoch, val["val_dice"])
                    inference.save_checkpoint(best, run.out / "best.pt")
                save_last(last, model, optimizer, scheduler, scaler, progress)
    if run.master and cfg.patience and progress.stale >= cfg.patience:
        best = max(progress.log, key=lambda r: r["val_dice"])
        print(f"early stop: no better validation Dice for {cfg.patience} epochs (best {best['val_dice']:.4f} at "
              f"epoch {best['epoch']})")
    if run.master and cfg.time_budget:  # the count was estimated from epoch 1: say how it came out
        print(f"training ended {(time.perf_counter() - run.started) / 60:.1f} min after this process set up "
              f"(--time-budget {cfg.time_budget:g})")
    return progress.log, progress.epochs


def fit_budget(cfg: TrainConfig, run: Run, epoch_s: float, steps_per_epoch: int, schedule: Schedule) -> int:
    """After epoch 1: the epochs that fit --time-budget (rank 0's count on every rank); the schedule's cosine is
    laid over them. Epoch 1 was all warm-up (--warmup >= 1), so the run equals one with --epochs COUNT. A run
    resumed during epoch 1 counts the budget from its resumption."""
    elapsed_s = time.perf_counter() - run.started
    epochs = epochs_in_budget(60 * cfg.time_budget, elapsed_s, epoch_s, cfg.epochs)
    if run.ddp:
        agreed = torch.tensor([epochs], device=run.device)
        dist.broadcast(agreed, 0)
        epochs = int(agreed.item())
    schedule.total_steps = epochs * steps_per_epoch
    if run.master:
        print(f"time budget {cfg.time_budget:g} min: {elapsed_s / 60:.1f} min so far, "
              f"{epoch_s:.0f} s an epoch: training for {epochs} epochs (--epochs {cfg.epochs} at most); "
              f"--epochs {epochs} without --time-budget reproduces this run", flush=True)
    return epochs


# ----------------------------------------------------------------------------------------------------------
# Test: post-processing chosen on validation, then one look at the test patients, all at 240 x 240


def test(cfg: TrainConfig, run: Run, cache: data.Cache, split: dict, log: list[dict],
         epochs: int) -> tuple[dict, list[dict], dict, int]:
    """Choose the post-processing on the validation patients (unless --postprocess fixes it; saved into best.pt),
    then evaluate the test patients once. Returns what metrics.json will hold, and the per-slice rows and masks of
    the test patients and the epoch of the model tested, for the figures. With --train-on all there is no test
    patient: metrics.json says so ("test": null) and the figures are the curves alone."""
    regions = list(data.TARGETS[cfg.target])
    predictor = inference.Predictor.from_checkpoints([run.out / "best.pt"], run.device, 2 * cfg.batch_size,
                                                     speed=dataclasses.replace(run.speed, compile=False))
    post, val_best = inference.parse_postprocess(cfg.postprocess, regions), None
    if post is None:
        val_labels = {v: cache.full_labels(v) for v in split["val"]}
        post, val_best = inference.choose_region_postprocessing(
            inference.volume_probs(predictor, cache, split["val"]), val_labels, regions)
    ckpt = torch.load(run.out / "best.pt", map_location="cpu", weights_only=True)
    inference.save_checkpoint({**ckpt, "post": post, "post_chosen": True}, run.out / "best.pt")
    kept = ckpt["epoch"]
    if cfg.train_on == "all":
        result = {"test": None, "regions": regions, "post": post, "train_on": cfg.train_on, "best_epoch": kept,
                  "epochs_run": len(log), "epochs": epochs, "data": cfg.data, "trained_on": len(split["trained_on"])}
        print(f"trained on all {len(split['trained_on'])} patients (model of epoch {kept}, --postprocess "
              f"{inference.format_postprocess(post, regions)}): no unseen patient to test; the cross-validation of the "
              f"same command is this model's estimate")
        return result, [], {}, kept
    summary, records, masks = inference.evaluate(inference.volume_probs(predictor, cache, split["test"]), cache, post,
                                                 regions)
    result = {"test": summary, "regions": regions, "post": post, "val_dice_at_choice": val_best, "train_on": cfg.train_on,
              "best_epoch": kept, "epochs_run": len(log), "epochs": epochs, "time_budget_min": cfg.time_budget,
              "data": cfg.data, "channels": [data.CHANNELS[c] for c in channel_list(cfg.channel)], "size": cfg.size,
              "folds": cfg.folds, "fold": cfg.fold, "split": split}
    print(f"test ({summary['volumes']} unseen patients, 240x240): volume Dice {summary['volume_dice']:.4f} ± "
          f"{summary['volume_dice_std']:.4f} (min {summary['volume_dice_min']:.4f}), IoU {summary['volume_iou']:.4f}, "
          f"HD95 {summary['hd95_mm']:.2f} mm; slice Dice {summary['slice_dice']:.4f} on {summary['tumour_slices']} "
          f"tumour slices; {summary['false_positive_slices']} of {summary['empty_slices']} empty slices with false "
          f"positives ({post}, model of epoch {kept})")
    if len(regions) > 1:
        print("test per region: " + "; ".join(f"{r.upper()} Dice {m['dice']:.4f} (min {m['dice_min']:.4f}), IoU "
                                              f"{m['iou']:.4f}, HD95 {m['hd95_mm']:.2f} mm"
                                              for r, m in summary["regions"].items()))
    return result, records, masks, kept


def save_metrics(out: Path, result: dict) -> None:
    """metrics.json, the mark of a finished run (--resume refuses it): written once the figures are drawn."""
    with data.atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------------------------------------


def main(cfg: TrainConfig) -> None:
    run = set_up(cfg)
    cache, split, batches, val_set = load_data(cfg, run)
    model = build_model(cfg).to(run.device)
    if run.speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if run.master:
        print(f"model: {model.cfg}, {count_parameters(model) / 1e6:.2f} M parameters; device {run.device}, "
              f"{run.speed}; world {run.world}; {len(batches)} batches of {batches.batch_size} per epoch")
    log, epochs = fit(cfg, run, model, batches, val_set)
    if run.ddp:
        dist.destroy_process_group()
    if not run.master:
        return
    try:
        result, records, masks, kept_epoch = test(cfg, run, cache, split, log, epochs)
        figures.run_figures(run.out, cache, log, records, masks, kept_epoch, list(data.TARGETS[cfg.target]))
        save_metrics(run.out, result)  # last: a run with metrics.json is finished
    except data.UserError:
        raise
    except Exception as e:  # training is done and its checkpoints are safe: say so in one line
        raise data.UserError(f"training finished but the test phase failed ({type(e).__name__}: "
                             f"{data.first_line(e)}); best.pt and last.pt in {run.out} are intact: "
                             f"rerun the test with `python train.py --resume {run.out}`") from e
    print(f"wrote {run.out}/: {' '.join(name for name in RUN_FILES if (run.out / name).exists())}")


def cli(argv: list[str] | None = None) -> int:
    cfg = None
    try:
        cfg = parse_args(argv)
        main(cfg)
    except data.UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except Stopped as s:  # the resume line is already printed
        return 128 + s.signum
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (the cache build, the test phase)
        resumable = cfg is not None and (Path(cfg.out) / "last.pt").exists()
        print("train.py: interrupted" + (f"; resume with `python train.py --resume {cfg.out}`" if resumable else
                                         " before any epoch ended: nothing to resume"), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
