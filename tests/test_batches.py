"""The batch source (feed.TrainBatches) on a tagged data set: every slice carries its tag in both its image and its
mask (the tag is the number of marked pixels), so pairing, coverage, shuffling, context and rank shares can be
read off the batches themselves."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import data
import feed

SIZE = 16
COUNTS = (5, 7, 6)  # slices per volume: tags 1..5, 6..12, 13..18


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> data.Cache:
    """A cache whose slice k (counting over all volumes from 1) has its first k pixels marked, in the mask and, with
    value 1 + channel, in every image channel."""
    root = tmp_path_factory.mktemp("tagged")
    volumes, tag = [], 0
    for v, n in enumerate(COUNTS):
        images = np.zeros((n, 4, SIZE, SIZE), np.float16)
        masks = np.zeros((n, SIZE, SIZE), np.uint8)
        for k in range(n):
            tag += 1
            marked = (np.arange(SIZE * SIZE) < tag).reshape(SIZE, SIZE)
            masks[k] = marked
            images[k] = marked * (1 + np.arange(4))[:, None, None]
        np.save(root / f"images_v{v}.npy", images)
        np.save(root / f"masks_v{v}.npy", masks)
        volumes.append({"id": f"v{v}", "slices": list(range(n)), "depth": n, "box": [0, 0, SIZE], "spacing": [1, 1, 1]})
    meta = {"size": SIZE, "volumes": volumes}
    (root / "meta.json").write_text(json.dumps(meta))
    return data.Cache(root, meta)


def tags(x: torch.Tensor) -> torch.Tensor:
    """Tag of each (.., H, W) slice: its number of non-zero pixels."""
    return (x != 0).flatten(-2).sum(-1)


def volume_of(tag: int) -> int:
    return int(np.searchsorted(np.cumsum(COUNTS), tag))


def neighbour(tag: int, step: int) -> int:
    """The tag of the slice `step` away in the same volume, the edge slice repeated."""
    start = int(np.cumsum((0,) + COUNTS)[volume_of(tag)]) + 1
    return min(max(tag + step, start), start + COUNTS[volume_of(tag)] - 1)


def epoch_batches(batches: feed.TrainBatches, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches.epoch(epoch, start)]


@pytest.mark.parametrize("resident,workers", [(True, 0), (False, 0), (False, 2)])
@pytest.mark.parametrize("augment", [False, True])
def test_an_epoch_is_a_permutation_of_the_training_slices_each_with_its_own_mask(tagged, resident, workers, augment):
    volumes = ["v0", "v2"]  # tags 1..5 and 13..18: 11 slices, 3 batches of 3 (2 dropped)
    batches = feed.TrainBatches(tagged, volumes, [0, 1, 2, 3], "cpu", 3, context=1, resident=resident,
                                workers=workers, augment=augment, seed=5)
    assert len(batches) == 3
    seen = []
    for x, y in epoch_batches(batches, 1):
        assert x.shape == (3, 12, SIZE, SIZE) and x.dtype == torch.float32
        assert y.shape == (3, 1, SIZE, SIZE) and y.dtype == torch.uint8 and y.is_contiguous()
        middle = tags(x[:, 4:8])  # channels of the slice itself: z - 1 (0..3), z (4..7), z + 1 (8..11)
        assert (middle == tags(y[:, 0])[:, None]).all()  # every channel and the mask: the same slice
        for t, before, after in zip(middle[:, 0].tolist(), tags(x[:, 0]).tolist(), tags(x[:, 8]).tolist()):
            assert (before, after) == (neighbour(t, -1), neighbour(t, 1))
        if augment:  # the geometry moves image and mask together
            assert ((x[:, 4] != 0) == (y[:, 0] == 1)).all()
        seen += middle[:, 0].tolist()
    assert len(seen) == len(set(seen)) == 9
    assert set(seen) <= set(range(1, 6)) | set(range(13, 19))
    second = [t for x, _ in epoch_batches(batches, 2) for t in tags(x[:, 4]).tolist()]
    assert second != seen and seen != sorted(seen)  # shuffled, and differently each epoch


def test_ranks_share_an_epoch_without_overlap(tagged):
    ids = ["v0", "v1", "v2"]
    shares = []
    for rank in range(3):
        batches = feed.TrainBatches(tagged, ids, [0], "cpu", 2, rank=rank, world=3, augment=False, seed=1)
        assert len(batches) == 3  # 18 slices / 3 ranks / batch 2
        shares.append([t for x, _ in epoch_batches(batches, 4) for t in tags(x[:, 0]).tolist()])
    flat = [t for s in shares for t in s]
    assert len(flat) == len(set(flat)) == 18 and set(flat) == set(range(1, 19))


@pytest.mark.parametrize("resident", [True, False])
def test_an_epoch_restarted_at_a_batch_sees_the_same_batches(tagged, resident):
    """What resuming mid-epoch relies on: batch b of epoch e is the same whether the epoch starts at 0 or at b."""
    batches = feed.TrainBatches(tagged, ["v0", "v1", "v2"], [0, 1], "cpu", 4, resident=resident, workers=0,
                                seed=3, modality_dropout=0.5)
    full, tail = epoch_batches(batches, 3), epoch_batches(batches, 3, start=2)
    assert len(full) == 4 and len(tail) == 2
    for (x1, y1), (x2, y2) in zip(full[2:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # a run stopped after the epoch's last step resumes at batch 4 of 4: nothing left, not one empty batch
    # (which crashed fold 7 of records/cv32-recipe on resume: instance norm of a batch of 0)
    assert epoch_batches(batches, 3, start=4) == [] and epoch_batches(batches, 3, start=9) == []


def test_as_device_gives_cuda_an_index():
    """Tensors on CUDA report cuda:N; a bare 'cuda' must compare equal to them (else batches take the host path)."""
    assert feed.as_device("cuda") == torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    assert feed.as_device("cuda:1") == torch.device("cuda:1") and feed.as_device("cpu") == torch.device("cpu")


def test_modality_dropout_blanks_one_modality_on_every_context_copy():
    """Three context copies of two modalities, dropout 0.5: a hit sample has one modality at exactly 0 on all three
    copies and the other untouched; about half the samples are hit, both modalities get dropped; the rest of the
    batch, mask included, is the one drawn without dropout. Dropout 1 hits every sample, never both modalities."""
    g = torch.Generator().manual_seed(0)
    n = 64
    y = torch.zeros(n, 1, 16, 16, dtype=torch.uint8)
    y[:, :, 4:9, 5:11] = 1
    x = (torch.rand(n, 2, 16, 16, generator=g) + 1).repeat(1, 3, 1, 1)  # channels: (m0, m1) at z - 1, z, z + 1
    plain, y_plain = feed.augment(x, y, torch.Generator().manual_seed(5), modalities=2)
    for rate, low, high in ((0.5, 16, 48), (1.0, n, n)):
        out, y_out = feed.augment(x, y, torch.Generator().manual_seed(5), modalities=2, modality_dropout=rate)
        assert torch.equal(y_out, y_plain)
        blank = (out == 0).all(-1).all(-1)  # (N, 6): channel entirely 0
        for k in range(2):  # a modality's three copies go together
            assert torch.equal(blank[:, k], blank[:, k + 2]) and torch.equal(blank[:, k], blank[:, k + 4])
        assert not (blank[:, 0] & blank[:, 1]).any()
        hit = blank[:, 0] | blank[:, 1]
        assert low <= int(hit.sum()) <= high
        assert blank[:, 0].any() and blank[:, 1].any()
        assert torch.equal(out[~blank], plain[~blank])



def test_batches_without_augmentation_are_the_cached_slices(tagged):
    """augment=False: every batch is exactly its slices' images (with context) and masks, in the epoch's order."""
    batches = feed.TrainBatches(tagged, ["v0", "v1", "v2"], [0, 1], "cpu", 3, context=1, augment=False, seed=5)
    raw = feed.load_slices(tagged, ["v0", "v1", "v2"], [0, 1], context=1)
    order = feed.epoch_order(len(raw), 5, 2)[:len(batches) * 3]
    for (x, y), idx in zip(epoch_batches(batches, 2), order.split(3)):
        assert torch.equal(x, raw.inputs(idx).float()) and torch.equal(y, raw.masks[idx].unsqueeze(1))


def test_region_targets_follow_the_augmented_label_map(tmp_path):
    """Slices whose one image channel is the label map itself (0, 1, 2, 4 in bands): after the flips, rotations and
    the intensity change (labels 1, 2, 4 stay apart: 1 ± 0.2, 2 ± 0.3, 4 ± 0.5), the three targets are WT = the
    label's voxels, TC = labels 1 and 4, ET = label 4, pixel for pixel of the augmented image."""
    n, size = 6, 16
    label = np.zeros((n, size, size), np.uint8)
    for k in range(n):
        label[k, k:k + 3, :5], label[k, k:k + 3, 5:9], label[k, k + 3:k + 6, 2:12] = 2, 1, 4
    np.save(tmp_path / "images_v.npy", label[:, None].astype(np.float16))
    np.save(tmp_path / "masks_v.npy", label)
    meta = {"size": size, "volumes": [{"id": "v", "slices": list(range(n)), "depth": n, "box": [0, 0, size],
                                       "spacing": [1, 1, 1]}]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    batches = feed.TrainBatches(data.Cache(tmp_path, meta), ["v"], [0], "cpu", 3, seed=1, regions=("wt", "tc", "et"))
    seen = 0
    for x, y in batches.epoch(1):
        assert y.shape == (3, 3, size, size) and y.dtype == torch.uint8
        value = torch.round(x[:, 0])  # the augmented label: 0.8..1.2 → 1, 1.7..2.3 → 2, 3.5..4.5 → 4
        assert torch.equal(y[:, 0].bool(), value > 0)
        assert torch.equal(y[:, 1].bool(), (value == 1) | (value == 4))
        assert torch.equal(y[:, 2].bool(), value == 4)
        seen += 1
    assert seen == 2
