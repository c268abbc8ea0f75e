"""Run a trained U-Net the way train.py evaluates it: device and speed settings, checkpoints (written and read),
batched prediction (ensembles and test-time flips), the test metrics of a set of patients, post-processing.
train.py, predict.py and bench/cv.py import it; it imports none of them.

Probabilities are always produced at the original 240 x 240 resolution: the model's logits are resized back to
the box the slices were cropped from (data.uncrop), so every metric and every written mask is at full size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import feed
import metrics
from unet import UNet, UNetConfig

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_COMPONENTS = (0, 10, 25, 50, 100, 200, 400)  # pixels at 240 x 240
MIN_VOLUMES = (0, 50, 100, 200, 500, 1000, 2000)  # voxels: a region predicted smaller than this is removed
UNCHOSEN = {"threshold": 0.5, "min_component": 0, "largest_3d": False, "min_volume": 0}  # a region's post-processing
CHECKPOINT_KEYS = ("model", "unet", "channels", "context", "size", "crop")
# levers removed after commit 60d0b04 (records/README.md): a checkpoint trained with one needs that commit
REMOVED_LEVERS = {"context_step": 1, "asymmetry": False, "planes": 1, "deep_supervision": 0}


# ----------------------------------------------------------------------------------------------------------
# Device and speed settings


def resolve_device(name: str) -> torch.device:
    """--device auto | cpu | cuda | cuda:N → a torch.device with its index on CUDA (see feed.as_device)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise data.UserError(f"--device {name}: no CUDA device is available")
    try:
        return feed.as_device(name)
    except RuntimeError as e:
        raise data.UserError(f"--device {name}: {e}") from None


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo", capability: str | None = None) -> list[str]:
    """The CPU's native bf16 instruction sets (AVX512-BF16, AMX-BF16) from /proc/cpuinfo; empty when none (or unknown),
    and empty when PyTorch's kernels are held below AVX512 (ATEN_CPU_CAPABILITY=avx2 makes such a CPU an AVX2 one)."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return []
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


@dataclass
class Speed:
    """The fast-path tricks in force, and why: the autocast dtype (None = fp32), channels_last, torch.compile."""

    amp: torch.dtype | None
    channels_last: bool
    compile: bool
    why: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp]
        return f"amp {amp}, channels_last {'on' if self.channels_last else 'off'}, compile {'on' if self.compile else 'off'}" \
            + (f" ({'; '.join(self.why)})" if self.why else "")


def resolve_speed(device: torch.device, amp: str = "auto", channels_last: str = "auto", compile: str = "auto") -> Speed:
    """Turn auto | on | off (amp: auto | bf16 | fp16 | off) into the settings for this machine.

    On CUDA, auto turns everything on (bf16 where supported, else fp16 with a GradScaler). On a CPU, auto turns
    bf16 on only where the CPU has native bf16 (AVX512-BF16 or AMX): elsewhere bf16 is emulated (a U-Net step
    measured 7x slower than fp32 on an AVX2-only EPYC). channels_last stays off on a CPU: it was slower on both
    kinds of CPU measured (1.6x in fp32 on the AVX2-only EPYC; 1.2x in bf16 on an AVX512-BF16 EPYC,
    bench/cpu_speed.py). torch.compile stays off on a CPU: on the AVX512-BF16 EPYC it did not speed up the bf16
    step, and an fp32 training epoch only 1.08x, for a minute of compilation (an AVX2-only CPU: not measured).
    """
    why = []
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            native = cpu_bf16_flags()
            amp = "bf16" if native else "off"
            why.append(f"CPU has {' and '.join(native)}: bf16" if native else
                       f"CPU has no native bf16 for PyTorch's {torch.backends.cpu.get_cpu_capability()} kernels: fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    if channels_last == "auto":
        channels_last = "on" if device.type == "cuda" else "off"
        if device.type == "cpu":
            why.append("channels_last off: slower than the default layout on the CPUs measured")
    if compile == "auto":
        compile = "on" if device.type == "cuda" else "off"
    return Speed(dtype, channels_last == "on", compile == "on", why)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(obj: dict, path: Path) -> None:
    """torch.save through a temporary name: a failed write (a full disk) leaves the previous file as it was."""
    try:
        with data.atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        raise data.UserError(f"could not write {path} ({type(e).__name__}: {data.first_line(e)}); "
                             f"the previous {Path(path).name}, if any, is intact") from None


def make_checkpoint(model: UNet, cfg: dict, channels: list[int], epoch: int, val_dice: float) -> dict:
    """What best.pt holds (load_checkpoint reads it): weights, model config and the run's config (train.py's flags),
    the preprocessing, the regions its outputs are (data.REGIONS) and their post-processing (UNCHOSEN until it is
    chosen on validation after training)."""
    regions = list(data.TARGETS[cfg["target"]])
    return {"model": model.state_dict(), "unet": asdict(model.cfg), "config": cfg, "channels": channels,
            "context": cfg["context"], "size": cfg["size"], "crop": cfg["crop"] == "on", "regions": regions,
            "epoch": epoch, "val_dice": val_dice, "post": {r: dict(UNCHOSEN) for r in regions},
            "post_chosen": False}


def region_post(ckpt: dict) -> tuple[list[str], dict]:
    """The regions and post-processing per region of a checkpoint or a run's metrics.json; a whole-tumour one
    written before regions existed keeps its post-processing at the top level."""
    if "post" in ckpt:
        return list(ckpt["regions"]), {r: {**UNCHOSEN, **p} for r, p in ckpt["post"].items()}
    missing = [k for k in ("threshold", "min_component", "largest_3d") if k not in ckpt]
    if missing:
        raise KeyError(f"lacks post or {', '.join(missing)}: not a train.py checkpoint")
    return ["wt"], {"wt": {**UNCHOSEN, **{k: ckpt[k] for k in ("threshold", "min_component", "largest_3d")}}}


def load_checkpoint(path: str | Path, device: torch.device) -> tuple[UNet, dict]:
    """Model (eval mode, on device) and the checkpoint dict; a UserError when it is missing, damaged or not a
    train.py checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if "progress" in ckpt:
            raise ValueError("a training state for --resume (last.pt), not a model: use the run's best.pt")
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing:
            raise KeyError(f"lacks {', '.join(missing)}: not a train.py checkpoint")
        settings = {**ckpt, "deep_supervision": ckpt["unet"].get("deep_supervision", 0)}  # a UNetConfig field then
        used = {k: settings[k] for k, off in REMOVED_LEVERS.items() if settings.get(k, off) != off}
        if used:
            raise ValueError(f"trained with {used}, levers this version no longer has: predict with commit 60d0b04")
        ckpt["regions"], ckpt["post"] = region_post(ckpt)
        model = UNet(UNetConfig(**{k: v for k, v in ckpt["unet"].items() if k != "deep_supervision"}))
        if model.cfg.out_channels != len(ckpt["regions"]):
            raise ValueError(f"{model.cfg.out_channels} outputs for regions {ckpt['regions']}")
        model.load_state_dict(ckpt["model"])
    except FileNotFoundError:
        raise data.UserError(f"checkpoint not found: {path}") from None
    except Exception as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise data.UserError(f"cannot load checkpoint {path}: {type(e).__name__}: {msg.splitlines()[0] if msg else ''}") from None
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------------------------------------
# Prediction


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, context: torch.Tensor, device: torch.device,
                   batch_size: int, speed: Speed) -> torch.Tensor:
    """Logits (N, R, H, W) float32 on `device` (R: the model's outputs, one per region) of the N slices whose context indices into images (M, C, H, W) are the
    rows of `context` (N, K) (feed.context_index), in batches of batch_size, each built only when it is run.
    The last batch is zero-padded to the full size, so a compiled model sees one shape and never recompiles."""
    model.eval()
    outs = []
    for i in range(0, context.shape[0], batch_size):
        x = feed.with_context(images, context[i:i + batch_size]).to(device, non_blocking=True).float()
        n = x.shape[0]
        if n < batch_size and context.shape[0] > batch_size:
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, batch_size - n))
        if speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=speed.amp or torch.float32, enabled=speed.amp is not None):
            outs.append(model(x)[:n].float())
    return torch.cat(outs) if outs else torch.zeros((0, model.cfg.out_channels, *images.shape[2:]), device=device)


FLIPS = ((), (-1,), (-2,), (-1, -2))  # test-time augmentation: the identity and the three flips


@dataclass
class Predictor:
    """One model or an ensemble, with the preprocessing it was trained with, the regions it predicts and their
    post-processing (a dict per region: threshold, min_component, largest_3d, min_volume)."""

    models: list[torch.nn.Module]
    channels: list[int]  # indices into data.CHANNELS
    context: int         # neighbour slices on each side
    size: int
    crop: bool
    device: torch.device
    speed: Speed
    batch_size: int = 32
    tta: bool = False    # average over the four flips
    regions: list[str] = field(default_factory=lambda: ["wt"])
    post: dict = field(default_factory=lambda: {"wt": dict(UNCHOSEN)})
    unchosen: list[str] = field(default_factory=list)  # checkpoints whose post-processing was never chosen

    @classmethod
    def from_checkpoints(cls, paths: list[Path], device: torch.device, batch_size: int = 32, tta: bool = False,
                         speed: Speed | None = None) -> "Predictor":
        """Load one checkpoint or an ensemble (which must share preprocessing and regions). The ensemble's
        post-processing of each region is the median threshold, minimum component and minimum volume of its members,
        largest-3D by majority."""
        loaded = [load_checkpoint(p, device) for p in paths]
        ckpts = [c for _, c in loaded]
        prep = [(list(c["channels"]), c["context"], c["size"], c["crop"]) for c in ckpts]
        if any(p != prep[0] for p in prep):
            raise data.UserError(f"checkpoints disagree on channels/context/size/crop: {prep}: an ensemble needs one "
                                 f"preprocessing")
        regions = ckpts[0]["regions"]
        if any(c["regions"] != regions for c in ckpts):
            raise data.UserError(f"checkpoints predict different regions ({[c['regions'] for c in ckpts]}): an "
                                 f"ensemble needs one --target")
        config = ckpts[0].get("config", {})  # the run's own amp / channels_last settings, resolved for this device
        speed = speed or resolve_speed(device, config.get("amp", "auto"), config.get("channels_last", "auto"), "off")
        models = [m.to(memory_format=torch.channels_last) if speed.channels_last else m for m, _ in loaded]
        post = {r: {"threshold": float(np.median([c["post"][r]["threshold"] for c in ckpts])),
                    "min_component": int(np.median([c["post"][r]["min_component"] for c in ckpts])),
                    "largest_3d": 2 * sum(bool(c["post"][r]["largest_3d"]) for c in ckpts) > len(ckpts),
                    "min_volume": int(np.median([c["post"][r]["min_volume"] for c in ckpts]))} for r in regions}
        unchosen = [str(p) for p, c in zip(paths, ckpts) if c.get("post_chosen") is False]  # older files: chosen
        return cls(models, *prep[0], device, speed, batch_size, tta, list(regions), post, unchosen)

    def probs(self, images: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
        """Probabilities (S, R, 240, 240) float16 of each region of one volume's preprocessed slices (S, 4, size,
        size) (as data.preprocess_volume or the cache give them), averaged over the models (and the flips)."""
        x = torch.from_numpy(np.ascontiguousarray(images[:, self.channels]))
        context = feed.context_index([len(x)], self.context)
        total, n = None, 0
        for model in self.models:
            for dims in (FLIPS if self.tta else FLIPS[:1]):
                logits = predict_logits(model, x.flip(dims) if dims else x, context, self.device, self.batch_size,
                                        self.speed)
                p = torch.sigmoid(data.uncrop(logits.flip(dims) if dims else logits, tuple(box), fill=-math.inf))
                total, n = (p, 1) if total is None else (total + p, n + 1)
        return (total / n).half().cpu().numpy()

    def segment(self, image: np.ndarray) -> np.ndarray:
        """Raw image (S, 240, 240, 4) → nested boolean region masks (S, R, 240, 240) (postprocess_regions); slices
        without brain are empty."""
        keep, images, box = data.preprocess_volume(image, self.size, self.crop)
        masks = np.zeros((image.shape[0], len(self.regions), *image.shape[1:3]), bool)
        if len(keep):
            masks[keep] = postprocess_regions(self.probs(images, box), self.regions, self.post)
        return masks


# ----------------------------------------------------------------------------------------------------------
# Evaluation: how train.py and bench/cv.py score a model on patients at 240 x 240


def volume_probs(predictor: Predictor, cache: data.Cache, volume_ids: list[str]) -> dict[str, np.ndarray]:
    """Per volume: the region probabilities (S, R, 240, 240) of its kept slices, from the cached inputs."""
    return {vid: predictor.probs(cache.images(vid, mmap=True), cache.volume(vid)["box"]) for vid in volume_ids}


def evaluate(probs: dict[str, np.ndarray], cache: data.Cache, post: dict, regions: list[str]) -> tuple[dict, list[dict], dict]:
    """Test metrics at 240 x 240 of the post-processed, nested regions (postprocess_regions): per volume and region
    Dice, IoU and HD95 (mm) with BraTS's empty-region conventions (metrics.region_scores), their mean, std and min
    over volumes; per-slice Dice and IoU on tumour slices and false-positive slices, of the whole tumour (the first
    region). Returns (summary, per-slice rows (each region's Dice, tumour pixels and wrong pixels: false positives
    + false negatives), masks (S, R, 240, 240) per volume).

    The summary's volume_dice, volume_iou, hd95_mm (and per_volume's dice, iou, hd95_mm) are the whole tumour's;
    summary["regions"] holds every region's."""
    per_volume, slice_dice, slice_iou, fp, empty, records, masks = [], [], [], 0, 0, [], {}
    for vid, p in probs.items():
        meta, labels = cache.volume(vid), cache.full_labels(vid)
        truth_regions = data.region_masks(labels, regions)
        masks[vid] = pred_regions = postprocess_regions(p, regions, post)
        pred, truth = torch.from_numpy(pred_regions[:, 0]), torch.from_numpy(truth_regions[:, 0])
        region_slice_dice = [metrics.dice_score(torch.from_numpy(pred_regions[:, i]),
                                                torch.from_numpy(truth_regions[:, i])).tolist() for i in range(len(regions))]
        dice, iou = torch.tensor(region_slice_dice[0]), metrics.iou_score(pred, truth)
        slice_dice += dice.tolist()
        slice_iou += iou.tolist()
        fp += metrics.false_positive_slices(pred, truth)
        area = truth.flatten(1).sum(1)  # tumour pixels of each slice at 240 x 240
        empty += int((area == 0).sum())
        x_mm, y_mm, z_mm = meta["spacing"]  # slices are stacked (z, x, y)
        scores = {}
        for i, region in enumerate(regions):
            full_pred = np.zeros((meta["depth"], data.RAW_SIZE, data.RAW_SIZE), bool)  # dropped slices: no brain
            full_true = np.zeros_like(full_pred)
            full_pred[meta["slices"]], full_true[meta["slices"]] = pred_regions[:, i], truth_regions[:, i]
            scores[region] = {**metrics.region_scores(full_pred, full_true, spacing=(z_mm, x_mm, y_mm)),
                              "voxels": int(full_true.sum()), "predicted_voxels": int(full_pred.sum())}
        wt = scores[regions[0]]
        per_volume.append({"id": vid, "dice": wt["dice"], "iou": wt["iou"], "hd95_mm": wt["hd95_mm"],
                           "tumour_voxels": wt["voxels"], "regions": scores})
        region_area = truth_regions.reshape(*truth_regions.shape[:2], -1).sum(2)
        wrong = (pred_regions != truth_regions).reshape(*truth_regions.shape[:2], -1).sum(2)  # FP + FN pixels
        records += [{"volume": vid, "slice": z, "dice": d, "area": a,
                     **{f"dice_{r}": region_slice_dice[i][k] for i, r in enumerate(regions)},
                     **{f"area_{r}": int(region_area[k, i]) for i, r in enumerate(regions)},
                     **{f"wrong_{r}": int(wrong[k, i]) for i, r in enumerate(regions)}}
                    for k, (z, d, a) in enumerate(zip(meta["slices"], dice.tolist(), area.tolist()))]

    def over_volumes(region: str) -> dict:
        dice = [v["regions"][region]["dice"] for v in per_volume]
        return {"dice": metrics.nanmean(dice), "dice_std": float(np.nanstd(dice)) if dice else math.nan,
                "dice_min": float(np.nanmin(dice)) if dice else math.nan,
                "iou": metrics.nanmean([v["regions"][region]["iou"] for v in per_volume]),
                "hd95_mm": metrics.nanmean([v["regions"][region]["hd95_mm"] for v in per_volume])}

    by_region = {r: over_volumes(r) for r in regions}
    wt = by_region[regions[0]]
    summary = {
        "volumes": len(per_volume),
        "volume_dice": wt["dice"],
        "volume_dice_std": wt["dice_std"],
        "volume_dice_min": wt["dice_min"],
        "volume_iou": wt["iou"],
        "hd95_mm": wt["hd95_mm"],
        "slice_dice": metrics.nanmean(slice_dice),
        "slice_iou": metrics.nanmean(slice_iou),
        "tumour_slices": int(np.sum(~np.isnan(slice_dice))),
        "empty_slices": empty,
        "false_positive_slices": fp,
        "regions": by_region,
        "per_volume": per_volume,
    }
    return summary, records, masks


# ----------------------------------------------------------------------------------------------------------
# Post-processing


def parse_postprocess(text: str, regions: list[str] | tuple[str, ...] = ("wt",)) -> dict | None:
    """--postprocess: None for 'val' (chosen on validation), else the fixed post-processing of each region: one
    THRESHOLD,MIN_PIXELS,on|off[,MIN_VOXELS] for every region, or one per region in order, joined by '/'
    (e.g. 0.4,25,on/0.5,25,on/0.5,0,off,200 for wt/tc/et); a UserError for anything else."""
    if text == "val":
        return None
    specs = text.split("/")
    usage = (f"--postprocess must be val, or THRESHOLD,MIN_PIXELS,on|off[,MIN_VOXELS] with 0 < THRESHOLD < 1 (e.g. "
             f"0.3,50,on) once or once per region ({'/'.join(regions)}) joined by '/', got {text!r}")
    if len(specs) not in (1, len(regions)):
        raise data.UserError(usage)
    post = {}
    for region, spec in zip(regions, specs * len(regions) if len(specs) == 1 else specs):
        parts = spec.split(",")
        try:
            threshold, min_component, largest = float(parts[0]), int(parts[1]), parts[2]
            min_volume = int(parts[3]) if len(parts) == 4 else 0
            if len(parts) not in (3, 4) or not 0 < threshold < 1 or min(min_component, min_volume) < 0 \
                    or largest not in ("on", "off"):
                raise ValueError
        except (ValueError, IndexError):
            raise data.UserError(usage) from None
        post[region] = {"threshold": threshold, "min_component": min_component, "largest_3d": largest == "on",
                        "min_volume": min_volume}
    return post


def format_postprocess(post: dict, regions: list[str]) -> str:
    """The --postprocess that parse_postprocess reads back as `post`: one spec per region, joined by '/'."""
    return "/".join(f"{post[r]['threshold']:g},{post[r]['min_component']},{'on' if post[r]['largest_3d'] else 'off'}"
                    + (f",{post[r]['min_volume']}" if post[r]["min_volume"] else "") for r in regions)


def postprocess(probs: np.ndarray, threshold: float, min_component: int, largest_3d: bool = False,
                min_volume: int = 0) -> np.ndarray:
    """Binary mask of a volume's stacked slices (S, H, W) from probabilities: threshold, drop 2D components under
    min_component pixels, if asked keep only the largest 3D component (one tumour per patient), and remove
    everything when fewer than min_volume voxels are left (BraTS practice for small enhancing-tumour predictions)."""
    mask = metrics.remove_small_components(probs >= threshold, min_component)
    mask = metrics.keep_largest_component(mask) if largest_3d else mask
    return np.zeros_like(mask) if mask.sum() < min_volume else mask


def postprocess_regions(probs: np.ndarray, regions: list[str], post: dict) -> np.ndarray:
    """Region probabilities (S, R, H, W) → boolean masks (S, R, H, W), each region post-processed with its own
    settings, then nested as a BraTS label map nests them (data.labels_from_regions): an inner region predicted
    outside its outer one widens the outer one. What predict.py writes is exactly what is evaluated."""
    masks = np.stack([postprocess(probs[:, i].astype(np.float32), **post[r]) for i, r in enumerate(regions)], 1)
    return data.region_masks(data.labels_from_regions(masks, regions), regions) if len(regions) > 1 else masks


def choose_postprocessing(probs: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                          inner: dict[str, np.ndarray] | None = None) -> tuple[dict, float]:
    """The post-processing (threshold, minimum component size, largest 3D component or not) with the best mean
    per-volume Dice on these volumes, and that Dice. Ties go to the first setting tried (lower threshold, smaller
    size, no largest-3D rule). `inner`: per volume, a mask always added to the result (the inner regions that
    nesting adds to an outer one, postprocess_regions), so the choice is scored on the mask that is evaluated.

    Components are labelled once per threshold; every size cut is then a sum over component areas (outside
    `inner`, whose own area and overlap with the truth are counted once per volume).
    """
    import cv2

    inner = inner or {v: np.zeros(probs[v].shape, bool) for v in probs}
    true = torch.tensor([float(t.sum()) for t in truth.values()], dtype=torch.float64)
    inner_hit = torch.tensor([float((inner[v] & truth[v].astype(bool)).sum()) for v in probs], dtype=torch.float64)
    inner_area = torch.tensor([float(inner[v].sum()) for v in probs], dtype=torch.float64)
    best = (0.5, 0, -1.0)
    for th in THRESHOLDS:
        inter = inner_hit[:, None].repeat(1, len(MIN_COMPONENTS))
        pred = inner_area[:, None].repeat(1, len(MIN_COMPONENTS))
        for v, vid in enumerate(probs):
            for p, t, fixed in zip(probs[vid] >= th, truth[vid].astype(bool), inner[vid]):
                if not p.any():
                    continue
                n, labels, stats, _ = cv2.connectedComponentsWithStats(p.astype(np.uint8), connectivity=8)
                area = torch.from_numpy(np.bincount(labels[~fixed], minlength=n)[1:].astype(np.float64))
                hit = torch.from_numpy(np.bincount(labels[t & ~fixed], minlength=n)[1:].astype(np.float64))
                size = torch.from_numpy(stats[1:, cv2.CC_STAT_AREA].astype(np.float64))
                for j, m in enumerate(MIN_COMPONENTS):
                    keep = size >= m
                    inter[v, j] += hit[keep].sum()
                    pred[v, j] += area[keep].sum()
        dice = metrics.dice_from_counts(inter, pred, true[:, None].expand_as(inter))
        for j, m in enumerate(MIN_COMPONENTS):
            score = metrics.nanmean(dice[:, j].tolist())
            if score > best[2] + 1e-9:
                best = (th, m, score)
    th, m, score = best
    largest = [metrics.dice_score(torch.from_numpy(postprocess(probs[v].astype(np.float32), th, m, True) | inner[v])[None],
                                  torch.from_numpy(truth[v].astype(bool))[None]).item() for v in probs]
    use_largest = metrics.nanmean(largest) > score + 1e-9
    return {"threshold": th, "min_component": m, "largest_3d": use_largest, "min_volume": 0}, \
        max(score, metrics.nanmean(largest))


def choose_min_volume(probs: dict[str, np.ndarray], truth: dict[str, np.ndarray], post: dict,
                      inner: dict[str, np.ndarray] | None = None) -> tuple[int, float]:
    """Given a region's other settings: the smallest of MIN_VOLUMES with the best mean Dice under BraTS's
    empty-region conventions (metrics.region_scores: a patient without the region scores 1 only when nothing is
    predicted), and that Dice. The volume counts the region's own mask; `inner` (as in choose_postprocessing) is
    added after. Where every patient has the region, removing a prediction can only lose: 0 wins."""
    inner = inner or {v: np.zeros(probs[v].shape, bool) for v in probs}
    masks = {v: postprocess(probs[v].astype(np.float32), **{**post, "min_volume": 0}) for v in probs}
    best = (0, -1.0)
    for min_volume in MIN_VOLUMES:
        dice = [metrics.region_dice((m if m.sum() >= min_volume else np.zeros_like(m)) | inner[v], truth[v])
                for v, m in masks.items()]
        if np.mean(dice) > best[1] + 1e-9:
            best = (min_volume, float(np.mean(dice)))
    return best


def choose_region_postprocessing(probs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                                 regions: list[str]) -> tuple[dict, dict]:
    """Each region's post-processing chosen on these volumes (probabilities (S, R, H, W), label maps (S, H, W)),
    innermost region first: threshold, minimum component and largest-3D rule by choose_postprocessing (volumes
    without the region skipped), then the minimum volume by choose_min_volume (every volume counts), each scored on
    the region as evaluated, i.e. with the inner regions' chosen masks added (postprocess_regions' nesting).
    Returns (post, the validation Dice of each region under it, BraTS conventions)."""
    post, dice = {}, {}
    inner = {v: np.zeros(probs[v][:, 0].shape, bool) for v in probs}
    for i in sorted(range(len(regions)), key=lambda i: len(data.REGIONS[regions[i]])):  # innermost first
        region = regions[i]
        p = {v: probs[v][:, i] for v in probs}
        t = {v: data.region_masks(labels[v], [region])[:, 0] for v in labels}
        post[region], _ = choose_postprocessing(p, t, inner)
        post[region]["min_volume"], dice[region] = choose_min_volume(p, t, post[region], inner)
        inner = {v: inner[v] | postprocess(p[v].astype(np.float32), **post[region]) for v in probs}
    return {r: post[r] for r in regions}, {r: dice[r] for r in regions}
