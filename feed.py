"""What feeds the model: a set of cached slices held in memory (device or pinned host), neighbour slices as
context (2.5D), the augmentation, and TrainBatches, the one batch source of train.py and bench/throughput.py.

Every epoch is a pure function of (seed, epoch, rank, batch): a run resumed at any batch sees the batches it would
have seen, and DDP ranks share an epoch without overlap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from data import Cache, region_masks

INTENSITY = 0.1  # augmentation: brain intensities scaled by 1 ± INTENSITY and shifted by ± INTENSITY (0.3 was no better)


def as_device(device: torch.device | str) -> torch.device:
    """The device with its index on CUDA ("cuda" → "cuda:<current>"), so it compares equal to its tensors' device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def context_index(counts: list[int], context: int) -> torch.Tensor:
    """For slices stacked volume after volume (`counts` slices each): the (N, 2 * context + 1) indices of each
    slice's neighbours z - context, .., z, .., z + context in its own volume; the first and last slice repeat
    beyond the ends."""
    rows, start = [], 0
    offsets = torch.arange(-context, context + 1)
    for c in counts:
        z = torch.arange(c)[:, None] + offsets
        rows.append(start + z.clamp(0, max(c - 1, 0)))
        start += c
    return torch.cat(rows) if rows else torch.zeros((0, 2 * context + 1), dtype=torch.long)


def with_context(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Model input: each slice's neighbours stacked as channels, (N, C, H, W) + (M, K) → (M, K * C, H, W),
    ordered neighbour by neighbour (z - context first)."""
    return images[index].flatten(1, 2)


@dataclass
class SliceSet:
    """Slices of some volumes as tensors: images (N, C, H, W) float16, masks (N, H, W) uint8 BraTS label maps (0, 1,
    2, 4; data.region_masks makes them targets), the volume of each
    slice (N,) as an index into volume_ids (CPU), and each slice's context indices (N, 2 * context + 1)."""

    images: torch.Tensor
    masks: torch.Tensor
    volume: torch.Tensor
    volume_ids: list[str]
    context: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """Model inputs (float16, with context) of the slices `idx`."""
        return with_context(self.images, self.context[idx])


def load_slices(cache: Cache, volume_ids: list[str], channels: list[int], context: int = 0,
                device: torch.device | str = "cpu") -> SliceSet:
    """Load the cached slices of these volumes into one tensor on `device`, volume by volume.

    On CUDA, when the set does not fit in free memory (with 4 GB headroom), it stays in pinned host memory
    and batches are copied over without blocking; one line says so.
    """
    device = as_device(device)
    size = cache.meta["size"]
    counts = [len(cache.volume(v)["slices"]) for v in volume_ids]
    n = sum(counts)
    target = device
    if device.type == "cuda":
        need = n * (len(channels) + 1) * size * size * 2
        free, _ = torch.cuda.mem_get_info(device)
        if need + 4 * 2**30 > free:
            print(f"dataset ({need / 2**30:.1f} GB) does not fit in free GPU memory ({free / 2**30:.1f} GB): "
                  "keeping it in pinned host memory")
            target = torch.device("cpu")
    pin = device.type == "cuda" and target.type == "cpu"
    images = torch.empty((n, len(channels), size, size), dtype=torch.float16, device=target, pin_memory=pin)
    masks = torch.empty((n, size, size), dtype=torch.uint8, device=target, pin_memory=pin)
    start = 0
    for vid, c in zip(volume_ids, counts):
        img = torch.from_numpy(np.ascontiguousarray(cache.images(vid, mmap=True)[:, channels]))
        mask = torch.from_numpy(cache.masks(vid))
        images[start:start + c].copy_(img)
        masks[start:start + c].copy_(mask)
        start += c
    volume = torch.repeat_interleave(torch.arange(len(volume_ids)), torch.tensor(counts, dtype=torch.long))
    return SliceSet(images, masks, volume, list(volume_ids), context_index(counts, context).to(target))


def augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, modalities: int = 0,
            modality_dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random dihedral transform (flips and 90° rotations) of image (N, C, H, W) float and mask (N, K, H, W) uint8
    alike; brain intensities scaled by 1 ± INTENSITY and shifted by ± INTENSITY per channel (scanners and sites
    differ in contrast). With modality_dropout > 0, that fraction of the samples loses one of the `modalities`
    (default: every channel is one), drawn at random, on every context slice (channels repeat the modalities once
    per slice, with_context's order): set to 0, the brain's mean after normalisation and the background, so the
    model learns to find a tumour faint in one modality from the others (ModDrop). Returns contiguous tensors, the
    mask still uint8."""
    n, c, dev = x.shape[0], x.shape[1], x.device
    k = modalities or c

    def coin() -> torch.Tensor:
        return torch.rand(n, 1, 1, 1, device=dev, generator=generator) < 0.5

    if x.shape[-1] == x.shape[-2]:  # transposition: square slices only
        t = coin()
        x, y = torch.where(t, x.transpose(-1, -2), x), torch.where(t, y.transpose(-1, -2), y)
    for dim in (-1, -2):
        f = coin()
        x, y = torch.where(f, x.flip(dim), x), torch.where(f, y.flip(dim), y)
    scale = 1 + INTENSITY * (2 * torch.rand(n, c, 1, 1, device=dev, generator=generator) - 1)
    shift = INTENSITY * (2 * torch.rand(n, c, 1, 1, device=dev, generator=generator) - 1)
    x = torch.where(x != 0, x * scale + shift, x)
    if modality_dropout:  # drawn last, so the draws above are the same with or without it
        dropped = torch.randint(k, (n, 1), device=dev, generator=generator)
        hit = torch.rand(n, 1, device=dev, generator=generator) < modality_dropout
        keep = ~(hit & (torch.arange(k, device=dev) == dropped))  # (N, k)
        x = x * keep.repeat(1, c // k)[:, :, None, None].to(x.dtype)
    return x.contiguous(), y.contiguous()


def rng_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers (seed, epoch, ...): the same on every run and every machine."""
    return hash(tuple(parts)) & (2**63 - 1)  # ints hash to themselves: no per-process hash randomisation


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's share of epoch `epoch`'s permutation of n slices (CPU, int64). The order depends only on
    (seed, epoch), so every rank draws the same one and takes every world-th slice from its rank on (ranks never
    share a slice in an epoch), and a resumed run replays the same epochs."""
    generator = torch.Generator().manual_seed(rng_seed(seed, epoch))
    return torch.randperm(n, generator=generator)[rank::world]


class DiskSlices(torch.utils.data.Dataset):
    """Slices read one at a time from the memory-mapped disk cache, for DataLoader workers (the --resident off
    path): (image float16 (K * C, H, W) with its context, mask uint8 (H, W))."""

    def __init__(self, cache: Cache, volume_ids: list[str], channels: list[int], context: int = 0):
        self.cache, self.channels = cache, channels
        counts = [len(cache.volume(v)["slices"]) for v in volume_ids]
        self.index = [(v, k) for v, c in zip(volume_ids, counts) for k in range(c)]
        self.context = context_index(counts, context)
        self.arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # opened lazily, per worker process

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        vid, k = self.index[i]
        if vid not in self.arrays:
            self.arrays[vid] = (self.cache.images(vid, mmap=True), self.cache.masks(vid, mmap=True))
        images, masks = self.arrays[vid]
        ks = (self.context[i] - self.context[i, self.context.shape[1] // 2] + k).tolist()  # neighbours, in-volume
        x = np.ascontiguousarray(images[ks][:, self.channels]).reshape(-1, *images.shape[2:])
        return torch.from_numpy(x), torch.from_numpy(np.array(masks[k]))


class OrderSampler(torch.utils.data.Sampler):
    """Yields the indices it was last given: the DataLoader path follows epoch_order like the resident path."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class TrainBatches:
    """Epochs of shuffled, augmented training batches on `device`: the one batch source of train.py and bench/.

    resident=True: the training slices live in device memory (or pinned host memory when they do not fit) and a
    batch is one indexing; False: DataLoader workers read them from the memory-mapped disk cache (DiskSlices).
    Both follow epoch_order, and each batch's augmentation is seeded by (seed, epoch, rank, batch), so an epoch is
    a pure function of its number: a run resumed at any batch sees the batches it would have seen.
    Yields (images float32 (B, K * C, H, W), targets uint8 (B, R, H, W): the masks of `regions`, data.REGIONS),
    contiguous, on `device`.
    """

    def __init__(self, cache: Cache, volume_ids: list[str], channels: list[int], device: torch.device | str,
                 batch_size: int, *, context: int = 0, resident: bool = True, workers: int = 2, seed: int = 0,
                 rank: int = 0, world: int = 1, augment: bool = True, modality_dropout: float = 0.0,
                 regions: tuple[str, ...] = ("wt",)):
        self.device, self.batch_size, self.resident, self.regions = as_device(device), batch_size, resident, regions
        self.seed, self.rank, self.world = seed, rank, world
        self.augment, self.modality_dropout, self.modalities = augment, modality_dropout, len(channels)
        if resident:
            self.slices = load_slices(cache, volume_ids, channels, context, self.device)
            self.n = len(self.slices)
        else:
            dataset = DiskSlices(cache, volume_ids, channels, context)
            self.n, self.sampler = len(dataset), OrderSampler()
            self.loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True, num_workers=workers,
                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)
        self.aug_generator = torch.Generator(device=self.device)

    def __len__(self) -> int:
        """Batches per epoch on each rank (the same on every rank; the remainder of the permutation is dropped)."""
        return (self.n // self.world) // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start, start + 1, ... of epoch `epoch` (epochs count from 1); none when start is past the last
        (a run stopped after its epoch's last step resumes there)."""
        if start >= len(self):
            return
        order = epoch_order(self.n, self.seed, epoch, self.rank, self.world)[:len(self) * self.batch_size]
        order = order[start * self.batch_size:]
        if self.resident:
            order = order.to(self.slices.images.device)
            raw = ((self.slices.inputs(idx), self.slices.masks[idx]) for idx in order.split(self.batch_size))
        else:
            self.sampler.order = order.tolist()
            raw = iter(self.loader)
        for b, (x, y) in enumerate(raw, start):
            if x.device != self.device:  # host memory → device: pinned, so the copy does not block
                if self.device.type == "cuda":
                    x, y = x.pin_memory(), y.pin_memory()
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            x, y = x.float(), y.unsqueeze(1)
            if self.augment:
                self.aug_generator.manual_seed(rng_seed(self.seed, epoch, self.rank, b))
                x, y = augment(x, y, self.aug_generator, self.modalities, self.modality_dropout)
            yield x, region_masks(y[:, 0], self.regions).to(torch.uint8)
