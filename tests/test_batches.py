"""The batch source (data.TrainBatches) on a tagged data set: every slice carries its tag in both its image and its
mask (the tag is the number of marked pixels), so pairing, coverage, shuffling, context and rank shares can be
read off the batches themselves."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import data

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


def epoch_batches(batches: data.TrainBatches, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches.epoch(epoch, start)]


@pytest.mark.parametrize("resident,workers", [(True, 0), (False, 0), (False, 2)])
@pytest.mark.parametrize("augment", [False, True])
def test_an_epoch_is_a_permutation_of_the_training_slices_each_with_its_own_mask(tagged, resident, workers, augment):
    volumes = ["v0", "v2"]  # tags 1..5 and 13..18: 11 slices, 3 batches of 3 (2 dropped)
    batches = data.TrainBatches(tagged, volumes, [0, 1, 2, 3], "cpu", 3, context=1, resident=resident,
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


@pytest.mark.parametrize("resident", [True, False])
def test_a_context_step_takes_the_neighbours_that_many_slices_away(tagged, resident):
    """--context 2 --context-step 2: channels z - 4, z - 2, z, z + 2, z + 4 of the slice's own volume, the edge
    slices repeated beyond its ends (volume v1 has 7 slices, so most slices reach past an end)."""
    batches = data.TrainBatches(tagged, ["v1"], [0], "cpu", 7, context=2, context_step=2, resident=resident,
                                workers=0, augment=False)
    (x, y), = epoch_batches(batches, 1)
    assert x.shape == (7, 5, SIZE, SIZE)
    for row, t in zip(tags(x).tolist(), tags(y[:, 0]).tolist()):
        assert row == [neighbour(t, -4), neighbour(t, -2), t, neighbour(t, 2), neighbour(t, 4)]


def test_ranks_share_an_epoch_without_overlap(tagged):
    ids = ["v0", "v1", "v2"]
    shares = []
    for rank in range(3):
        batches = data.TrainBatches(tagged, ids, [0], "cpu", 2, rank=rank, world=3, augment=False, seed=1)
        assert len(batches) == 3  # 18 slices / 3 ranks / batch 2
        shares.append([t for x, _ in epoch_batches(batches, 4) for t in tags(x[:, 0]).tolist()])
    flat = [t for s in shares for t in s]
    assert len(flat) == len(set(flat)) == 18 and set(flat) == set(range(1, 19))


def test_extremity_weights_mark_the_slices_with_a_little_tumour(tmp_path):
    """Hand-made tumour areas per slice: the slices with some tumour but under a quarter of the volume's largest
    section get the factor; empty slices, the bulk, and a volume without tumour keep weight 1."""
    areas = {"a": [0, 1, 4, 10, 16, 3, 0], "b": [0, 0, 0], "c": [8, 2, 1]}  # a: max 16, cut 4; c: max 8, cut 2
    volumes = []
    for vid, per_slice in areas.items():
        masks = np.zeros((len(per_slice), SIZE, SIZE), np.uint8)
        for k, area in enumerate(per_slice):
            masks[k].flat[:area] = 1
        np.save(tmp_path / f"masks_{vid}.npy", masks)
        volumes.append({"id": vid, "slices": list(range(len(per_slice))), "depth": len(per_slice),
                        "box": [0, 0, SIZE], "spacing": [1, 1, 1]})
    cache = data.Cache(tmp_path, {"size": SIZE, "volumes": volumes})
    weights = data.extremity_weights(cache, ["a", "b", "c"], 3.0)
    assert weights.tolist() == [1, 3, 1, 1, 1, 3, 1] + [1, 1, 1] + [1, 1, 3]
    assert data.extremity_weights(cache, ["c", "a"], 2.5).tolist() == [1, 1, 2.5] + [1, 2.5, 1, 1, 1, 2.5, 1]


def test_oversampled_extremities_are_drawn_that_many_times_as_often(tagged):
    """--oversample 5 on the tagged volumes: only slice 1 is an extremity (area 1 under a quarter of v0's largest,
    5; the others' smallest sections exceed theirs), so over many epochs it is drawn about 5 times as often as each
    other slice, an epoch still has 18 draws, an epoch replays the same draws, and the disk path draws them too."""
    batches = data.TrainBatches(tagged, ["v0", "v1", "v2"], [0], "cpu", 3, augment=False, seed=2, oversample=5.0)
    assert len(batches) == 6
    drawn = [t for epoch in range(1, 201) for x, _ in epoch_batches(batches, epoch) for t in tags(x[:, 0]).tolist()]
    counts = np.bincount(drawn, minlength=19)[1:]
    assert len(drawn) == 200 * 18 and counts.sum() == len(drawn)
    expected_others = len(drawn) / (17 + 5)  # 17 slices of weight 1, one of weight 5
    assert abs(counts[0] / expected_others - 5) < 0.6
    assert (np.abs(counts[1:] / expected_others - 1) < 0.3).all()
    again = [t for x, _ in epoch_batches(batches, 7) for t in tags(x[:, 0]).tolist()]
    assert again == drawn[6 * 18:7 * 18]
    disk = data.TrainBatches(tagged, ["v0", "v1", "v2"], [0], "cpu", 3, resident=False, workers=0, augment=False,
                             seed=2, oversample=5.0)
    assert [t for x, _ in epoch_batches(disk, 7) for t in tags(x[:, 0]).tolist()] == again


def test_oversample_1_is_the_permutation(tagged):
    """The default draws every slice once an epoch, the same order as without the argument."""
    plain = data.TrainBatches(tagged, ["v0", "v1", "v2"], [0], "cpu", 3, augment=False, seed=4)
    one = data.TrainBatches(tagged, ["v0", "v1", "v2"], [0], "cpu", 3, augment=False, seed=4, oversample=1.0)
    order = [t for x, _ in epoch_batches(one, 2) for t in tags(x[:, 0]).tolist()]
    assert order == [t for x, _ in epoch_batches(plain, 2) for t in tags(x[:, 0]).tolist()]
    assert sorted(order) == list(range(1, 19))


@pytest.mark.parametrize("resident", [True, False])
def test_an_epoch_restarted_at_a_batch_sees_the_same_batches(tagged, resident):
    """What resuming mid-epoch relies on: batch b of epoch e is the same whether the epoch starts at 0 or at b."""
    batches = data.TrainBatches(tagged, ["v0", "v1", "v2"], [0, 1], "cpu", 4, resident=resident, workers=0,
                                affine=True, seed=3)
    full, tail = epoch_batches(batches, 3), epoch_batches(batches, 3, start=2)
    assert len(full) == 4 and len(tail) == 2
    for (x1, y1), (x2, y2) in zip(full[2:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_affine_augmentation_warps_image_and_mask_alike():
    """Thin off-centre bars, rotated by up to 15° and zoomed by up to 10%: image and mask stay on each other, and
    the bars did move."""
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(32, 1, 48, 48, dtype=torch.uint8)
    y[:, :, 6:10, 4:44] = 1  # a horizontal bar near the top
    y[:, :, 14:40, 34:37] = 1  # a vertical bar on the right
    x = y.float().repeat(1, 2, 1, 1) * 3
    xa, ya = data.augment(x, y, g, affine=True, intensity=0.0)

    def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.flatten(1).bool(), b.flatten(1).bool()
        return (a & b).sum(1) / (a | b).sum(1).clamp_min(1)

    aligned = iou(xa[:, 0] > 1.5, ya[:, 0])
    assert aligned.min() > 0.75, aligned
    moved = iou(ya[:, 0], y[:, 0])
    assert (moved < 0.6).sum() >= 8  # most draws rotate the thin bars off themselves


def test_as_device_gives_cuda_an_index():
    """Tensors on CUDA report cuda:N; a bare 'cuda' must compare equal to them (else batches take the host path)."""
    assert data.as_device("cuda") == torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    assert data.as_device("cuda:1") == torch.device("cuda:1") and data.as_device("cpu") == torch.device("cpu")


def test_fade_lesion_pulls_the_tumour_toward_the_rest_of_the_brain():
    """Hand-made: brain pixels 1, 3, 5 with the tumour on the 5 and on a background pixel; the rest of the brain
    averages 2, so factor 0.5 gives 2 + 0.5 * (5 - 2) = 3.5; factor 1 and a channel with no other brain change nothing."""
    x = torch.tensor([[[[1.0, 3.0, 5.0, 0.0]], [[1.0, 3.0, 5.0, 0.0]], [[0.0, 0.0, 4.0, 0.0]]]])  # (1, 3, 1, 4)
    y = torch.tensor([[[[0, 0, 1, 1]]]], dtype=torch.uint8)
    out = data.fade_lesion(x, y, torch.tensor([0.5, 1.0, 0.5]).view(1, 3, 1, 1))
    assert out[0, 0, 0].tolist() == [1.0, 3.0, 3.5, 0.0]
    assert torch.equal(out[0, 1:], x[0, 1:])


def test_lesion_fade_is_drawn_per_modality_for_half_the_samples():
    """Three context copies of two modalities: a faded sample's copies of one modality fade alike, its two modalities
    by different factors in [1 - fade, 1]; about half the samples are left as they are; outside the tumour, and
    in the geometry, the batch is the one drawn without the fade."""
    g = torch.Generator().manual_seed(0)
    n = 64
    y = torch.zeros(n, 1, 16, 16, dtype=torch.uint8)
    y[:, :, 4:9, 5:11] = 1
    modality = torch.rand(n, 2, 16, 16, generator=g) + 1 + y * 2.0  # brain everywhere, a brighter tumour
    x = modality.repeat(1, 3, 1, 1)  # channels: (m0, m1) at z - 1, z, z + 1
    plain, y_plain = data.augment(x, y, torch.Generator().manual_seed(5), intensity=0.0)
    faded, y_faded = data.augment(x, y, torch.Generator().manual_seed(5), intensity=0.0, lesion_fade=0.8,
                                  modalities=2)
    assert torch.equal(y_plain, y_faded)
    tumour = y_faded.bool().expand_as(faded)
    assert torch.equal(faded[~tumour], plain[~tumour])
    rest_mean = (plain * ~tumour).sum((-1, -2)) / (~tumour).sum((-1, -2))
    factor = ((faded - rest_mean[..., None, None]) / (plain - rest_mean[..., None, None]))[tumour].view(n, 6, -1)
    assert torch.allclose(factor, factor[..., :1], atol=1e-4)  # one factor a channel
    factor = factor[..., 0]
    for k in (2, 4):  # every context copy of a modality as the first
        torch.testing.assert_close(factor[:, k:k + 2], factor[:, :2])
    assert factor.min() >= 0.2 - 1e-4 and factor.max() <= 1 + 1e-4
    untouched = ((factor - 1).abs() < 1e-5).all(1)
    assert 16 <= int(untouched.sum()) <= 48
    assert ((factor[~untouched, 0] - factor[~untouched, 1]).abs() > 1e-3).all()


def test_modality_dropout_blanks_one_modality_on_every_context_copy():
    """Three context copies of two modalities, dropout 0.5: a hit sample has one modality at exactly 0 on all three
    copies and the other untouched; about half the samples are hit, both modalities get dropped; the rest of the
    batch, mask included, is the one drawn without dropout. Dropout 1 hits every sample, never both modalities."""
    g = torch.Generator().manual_seed(0)
    n = 64
    y = torch.zeros(n, 1, 16, 16, dtype=torch.uint8)
    y[:, :, 4:9, 5:11] = 1
    x = (torch.rand(n, 2, 16, 16, generator=g) + 1).repeat(1, 3, 1, 1)  # channels: (m0, m1) at z - 1, z, z + 1
    plain, y_plain = data.augment(x, y, torch.Generator().manual_seed(5), intensity=0.1, lesion_fade=0.5,
                                  modalities=2)
    for rate, low, high in ((0.5, 16, 48), (1.0, n, n)):
        out, y_out = data.augment(x, y, torch.Generator().manual_seed(5), intensity=0.1, lesion_fade=0.5,
                                  modalities=2, modality_dropout=rate)
        assert torch.equal(y_out, y_plain)
        blank = (out == 0).all(-1).all(-1)  # (N, 6): channel entirely 0
        for k in range(2):  # a modality's three copies go together
            assert torch.equal(blank[:, k], blank[:, k + 2]) and torch.equal(blank[:, k], blank[:, k + 4])
        assert not (blank[:, 0] & blank[:, 1]).any()
        hit = blank[:, 0] | blank[:, 1]
        assert low <= int(hit.sum()) <= high
        assert blank[:, 0].any() and blank[:, 1].any()
        assert torch.equal(out[~blank], plain[~blank])


def test_asymmetry_appends_the_difference_from_the_left_right_mirror():
    """Hand-made 2 x 3 slice: left-right is H (data.LEFT_RIGHT_DIM), so the mirror swaps the two rows; a sample the
    augmentation transposed has left-right along W, so its mirror reverses each row."""
    x = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]]).reshape(1, 1, 2, 3)
    out = data.with_asymmetry(x)
    assert out.shape == (1, 2, 2, 3) and torch.equal(out[:, :1], x)
    assert torch.equal(out[0, 1], torch.tensor([[-7.0, -14.0, -28.0], [7.0, 14.0, 28.0]]))
    swapped = data.with_asymmetry(x.repeat(2, 1, 1, 1), torch.tensor([False, True]).reshape(2, 1, 1, 1))
    assert torch.equal(swapped[0, 1], out[0, 1])
    assert torch.equal(swapped[1, 1], torch.tensor([[-3.0, 0.0, 3.0], [-24.0, 0.0, 24.0]]))


def test_augment_mirrors_across_the_axis_left_right_became():
    """Each sample of a batch gets a random flip / transpose; the appended channels must be the augmented image minus
    its mirror across where the original H (left-right) went: H for the four transforms that keep the axes, W for
    the four that swap them (found here by matching each output against the eight transforms of its input). The
    image channels and the mask are exactly those drawn without asymmetry."""
    g = torch.Generator().manual_seed(0)
    n, c = 32, 2
    x = torch.rand(n, c, 8, 8, generator=g) + 1
    y = (torch.rand(n, 1, 8, 8, generator=g) > 0.5).to(torch.uint8)
    plain, y_plain = data.augment(x, y, torch.Generator().manual_seed(3), intensity=0.0, modalities=c,
                                  modality_dropout=0.5)
    out, y_out = data.augment(x, y, torch.Generator().manual_seed(3), intensity=0.0, modalities=c,
                              modality_dropout=0.5, asymmetry=True)
    assert out.shape == (n, 2 * c, 8, 8) and torch.equal(out[:, :c], plain) and torch.equal(y_out, y_plain)
    kept = transposed = 0
    for i in range(n):
        keeps_axes = [torch.equal(y_out[i], y[i].flip(dims) if dims else y[i]) for dims in ((), (-1,), (-2,), (-1, -2))]
        swaps_axes = [torch.equal(y_out[i], (y[i].transpose(-1, -2).flip(dims) if dims else y[i].transpose(-1, -2)))
                      for dims in ((), (-1,), (-2,), (-1, -2))]
        assert any(keeps_axes) != any(swaps_axes)  # a random mask matches exactly one transform
        left_right = -2 if any(keeps_axes) else -1
        kept, transposed = kept + any(keeps_axes), transposed + any(swaps_axes)
        assert torch.equal(out[i, c:], out[i, :c] - out[i, :c].flip(left_right))
    assert kept and transposed


def test_batches_without_augmentation_carry_the_asymmetry_too(tagged):
    """--augment off --asymmetry on: the model still reads the mirror difference (the input it is evaluated with)."""
    batches = data.TrainBatches(tagged, ["v0"], [0, 1], "cpu", 2, augment=False, asymmetry=True)
    x, _ = next(iter(batches.epoch(1)))
    assert x.shape[1] == 4 and torch.equal(x[:, 2:], x[:, :2] - x[:, :2].flip(-2))


def test_three_planes_add_each_volumes_slices_across_h_and_w(tmp_path):
    """planes=3: each volume's slices across z, then its SIZE slices across H and its SIZE across W (z in rows
    top..top + n, the rest 0; the box is the frame and the voxels cubes, so z is not resampled), images and masks
    (random, unrelated to each other) together, each stack with its own context, all of a volume's slices its own."""
    rng = np.random.default_rng(5)
    volumes = []
    for v, n in enumerate(COUNTS[:2]):
        np.save(tmp_path / f"images_v{v}.npy", rng.normal(size=(n, 4, SIZE, SIZE)).astype(np.float16))
        np.save(tmp_path / f"masks_v{v}.npy", (rng.random((n, SIZE, SIZE)) < 0.3).astype(np.uint8))
        volumes.append({"id": f"v{v}", "slices": list(range(n)), "depth": n, "box": [0, 0, SIZE], "spacing": [1, 1, 1]})
    cache = data.Cache(tmp_path, {"size": SIZE, "volumes": volumes})
    s = data.load_slices(cache, ["v0", "v1"], [0, 1, 2, 3], context=1, planes=3)
    assert len(s) == COUNTS[0] + COUNTS[1] + 4 * SIZE
    start = 0
    for v, n in enumerate(COUNTS[:2]):
        images = cache.images(f"v{v}").astype(np.float32)
        masks = cache.masks(f"v{v}")
        top = (SIZE - n) // 2
        padded_images = np.zeros((SIZE, 4, SIZE, SIZE), np.float32)
        padded_images[top:top + n] = images
        padded_masks = np.zeros((SIZE, SIZE, SIZE), np.uint8)
        padded_masks[top:top + n] = masks
        expected = [(images, masks),  # [z, k, h, w]
                    (padded_images.transpose(2, 1, 0, 3), padded_masks.transpose(1, 0, 2)),  # [h, k, z, w]
                    (padded_images.transpose(3, 1, 0, 2), padded_masks.transpose(2, 0, 1))]  # [w, k, z, h]
        for want_images, want_masks in expected:
            end = start + len(want_images)
            np.testing.assert_array_equal(s.images[start:end].float().numpy(), want_images)
            np.testing.assert_array_equal(s.masks[start:end].numpy(), want_masks)
            assert (s.volume[start:end] == v).all()
            assert s.context[start].tolist() == [start, start, start + 1]  # the stack's first slice repeats
            assert s.context[end - 1].tolist() == [end - 2, end - 1, end - 1]
            start = end


@pytest.mark.parametrize("kwargs,flag", [({"resident": False, "workers": 0}, "--resident off"),
                                         ({"oversample": 2.0}, "--oversample"), ({"asymmetry": True}, "--asymmetry on"),
                                         ({"planes": 2}, "--planes must be one of")])
def test_three_planes_refuse_what_is_defined_across_z_only(tagged, kwargs, flag):
    with pytest.raises(data.UserError, match=flag):
        data.TrainBatches(tagged, ["v0"], [0], "cpu", 2, **{"planes": 3, **kwargs})
