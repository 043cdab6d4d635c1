"""build_rpn_targets / build_detection_targets on small cases whose IoUs are worked out by hand."""
import math

import numpy as np
import pytest
import torch

from torchvision.ops import box_iou

from maskrcnn.model.targets import build_detection_targets, build_rpn_targets

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
NO_CROWD = torch.tensor([False])
STD = (0.1, 0.1, 0.2, 0.2)


def test_rpn_thresholds_and_deltas():
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1.0   -> positive
        [0.0, 0.0, 10.0, 5.0],     # IoU 50/100 = 0.5 -> between 0.3 and 0.7: ignored
        [20.0, 20.0, 30.0, 30.0],  # IoU 0 -> negative
        [0.0, 0.0, 10.0, 8.0],     # IoU 80/100 = 0.8 -> positive
    ])
    labels, deltas = build_rpn_targets(anchors, GT, NO_CROWD, num_samples=256, std=STD)
    assert labels.tolist() == [1, -1, 0, 1]
    # anchor 3: w 10, h 8, centre (5, 4); gt centre (5, 5): dy = 1/8, dh = log(10/8)
    expected = torch.tensor([0.0, 0.125 / 0.1, 0.0, math.log(10 / 8) / 0.2])
    torch.testing.assert_close(deltas[3], expected)
    assert deltas[0].abs().max() == 0 and deltas[1:3].abs().max() == 0


def test_rpn_best_anchor_of_each_gt_is_positive_ties_included():
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 4.0],    # IoU 0.4, the gt's best
        [0.0, 6.0, 10.0, 10.0],   # IoU 0.4 as well: tie, also positive
        [0.0, 0.0, 10.0, 2.0],    # IoU 0.2 -> negative
        [50.0, 50.0, 60.0, 60.0], # IoU 0 -> negative
    ])
    labels, _ = build_rpn_targets(anchors, GT, NO_CROWD)
    assert labels.tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("block", [3, 8, 40, 1 << 22])
def test_rpn_targets_do_not_depend_on_the_iou_block(monkeypatch, block):
    """The anchors x gt IoU matrix is computed in blocks of IOU_BLOCK_ELEMENTS entries (one block
    when it fits): labels and deltas are the same however it is cut, including a gt's best anchors
    tied across blocks."""
    from maskrcnn.model import targets
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(500, 2, generator=g) * 80
    anchors = torch.cat([corners, corners + 4 + torch.rand(500, 2, generator=g) * 30], dim=1)
    gt = torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 5.0, 90.0, 25.0], [0.0, 60.0, 12.0, 75.0]])
    best = box_iou(anchors, gt).argmax(dim=0)
    # an anchor near gt 0 (IoU >= 0.7) mid-way, and each gt's best anchor again at the end: ties
    # far apart in row order
    anchors = torch.cat([anchors[:250], torch.tensor([[10.0, 10.0, 30.0, 37.0]]), anchors[250:], anchors[best]])
    crowd = torch.zeros(3, dtype=torch.bool)
    expected = build_rpn_targets(anchors, gt, crowd, num_samples=10_000)
    monkeypatch.setattr(targets, "IOU_BLOCK_ELEMENTS", block)
    labels, deltas = build_rpn_targets(anchors, gt, crowd, num_samples=10_000)
    assert torch.equal(labels, expected[0]) and torch.equal(deltas, expected[1])
    assert (labels == 1).sum() == 2 * 2 + 1  # gt 0's best is the near anchor; gts 1, 2 tie


def test_rpn_gt_touching_no_anchor_makes_no_positive():
    anchors = torch.tensor([[50.0, 50.0, 60.0, 60.0], [70.0, 70.0, 80.0, 80.0]])
    labels, _ = build_rpn_targets(anchors, GT, NO_CROWD)
    assert labels.tolist() == [0, 0]


def test_rpn_crowd_is_neither_positive_nor_negative():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 60.0, 60.0]])
    crowd = torch.tensor([False, True])
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],      # the object: positive
        [40.0, 40.0, 60.0, 60.0],    # IoU 1 with the crowd box: ignored, not positive
        [55.0, 55.0, 65.0, 65.0],    # IoU 25/475 = 0.053 with the crowd (>= 0.001): ignored
        [100.0, 100.0, 110.0, 110.0],  # far from everything: negative
    ])
    labels, _ = build_rpn_targets(anchors, gt, crowd)
    assert labels.tolist() == [1, -1, -1, 0]


def test_rpn_no_gt_samples_only_negatives():
    anchors = torch.tensor([[float(i), 0.0, i + 5.0, 5.0] for i in range(10)])
    labels, deltas = build_rpn_targets(anchors, torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool),
                                       num_samples=4)
    assert (labels == 0).sum() == 4 and (labels == -1).sum() == 6
    assert deltas.abs().max() == 0


def test_rpn_subsampling_is_balanced_and_seeded():
    # 10 anchors equal to the gt (positives), 20 far away (negatives)
    anchors = torch.cat([GT.repeat(10, 1), torch.tensor([[50.0, 50.0, 60.0, 60.0]]).repeat(20, 1)])
    runs = [build_rpn_targets(anchors, GT, NO_CROWD, num_samples=8, positive_ratio=0.5,
                              generator=torch.Generator().manual_seed(3))[0] for _ in range(2)]
    labels = runs[0]
    assert (labels == 1).sum() == 4 and (labels == 0).sum() == 4 and (labels == -1).sum() == 22
    assert (labels[:10] != 0).all() and (labels[10:] != 1).all()
    assert torch.equal(runs[0], runs[1])
    # fewer positives than the quota: negatives fill up to num_samples
    labels, _ = build_rpn_targets(anchors[8:], GT, NO_CROWD, num_samples=8)
    assert (labels == 1).sum() == 2 and (labels == 0).sum() == 6


def _left_half_mask(size=32):
    masks = torch.zeros(1, size, size, dtype=torch.bool)
    masks[0, 0:10, 0:5] = True  # the object's visible part: the left half of its 10x10 box
    return masks


def test_detection_targets_hand_checked():
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],   # IoU 1 -> positive
        [0.0, 0.0, 10.0, 4.0],    # IoU 0.4 -> negative
        [0.0, 0.0, 10.0, 6.0],    # IoU 0.6 -> positive
    ])
    rois, labels, deltas, masks = build_detection_targets(
        proposals, GT, torch.tensor([2]), _left_half_mask(), NO_CROWD, num_samples=8,
        positive_ratio=0.5, std=STD, mask_shape=(28, 28))
    # the gt box is added as a fourth candidate (a positive): 3 positives first, then 1 negative
    assert labels.tolist() == [2, 2, 2, 0]
    assert {tuple(r) for r in rois[:3].tolist()} == {(0, 0, 10, 10), (0, 0, 10, 6)}
    assert rois[3].tolist() == [0, 0, 10, 4]
    i = [tuple(r) for r in rois.tolist()].index((0, 0, 10, 6))
    # roi (0,0,10,6): centre (5, 3), h 6; gt centre (5, 5), h 10
    torch.testing.assert_close(deltas[i], torch.tensor([0.0, (2 / 6) / 0.1, 0.0, math.log(10 / 6) / 0.2]))
    assert deltas[3].abs().max() == 0 and masks[3].abs().max() == 0
    j = [tuple(r) for r in rois.tolist()].index((0, 0, 10, 10))
    # the left 5 of 10 pixels are the object -> the left 14 of 28 mask columns.  Column 13 samples
    # x = 4.23 and 4.41 (pixel 4 is in, 5 out): 0.77 and 0.59, mean 0.68 -> 1; column 14: 0.32 -> 0.
    # The bottom row also straddles the box edge (y = 9.23, 9.41: mean 0.68), so the corner
    # (27, 13) averages to 0.68 * 0.68 = 0.46 -> 0.
    expected = torch.zeros(28, 28)
    expected[:, :14] = 1
    expected[27, 13] = 0
    assert torch.equal(masks[j], expected)
    assert masks.shape == (4, 28, 28) and set(masks.unique().tolist()) <= {0.0, 1.0}


def test_detection_targets_respect_the_positive_quota():
    proposals = GT.repeat(10, 1)
    neg = torch.tensor([[20.0, 20.0, 30.0, 30.0]]).repeat(10, 1)
    _, labels, _, _ = build_detection_targets(
        torch.cat([proposals, neg]), GT, torch.tensor([1]), _left_half_mask(), NO_CROWD,
        num_samples=6, positive_ratio=0.33)
    assert labels.tolist() == [1, 0, 0, 0, 0, 0]  # int(6 * 0.33) = 1 positive, 5 negatives


def test_detection_targets_crowd():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :10, :10] = True
    masks[1, 20:30, 20:30] = True
    proposals = torch.tensor([
        [20.0, 20.0, 30.0, 30.0],  # on the crowd: neither positive nor negative
        [0.0, 20.0, 8.0, 30.0],    # IoU 0 with the object, 0 with the crowd: negative
    ])
    rois, labels, _, _ = build_detection_targets(
        proposals, gt, torch.tensor([1, 3]), masks, torch.tensor([False, True]), num_samples=10,
        positive_ratio=0.5)
    # candidates: 2 proposals + the non-crowd gt box; the crowd gt is not added
    assert labels.tolist() == [1, 0]
    assert rois.tolist() == [[0, 0, 10, 10], [0, 20, 8, 30]]


def test_detection_targets_without_gt_are_all_negative():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [1.0, 2.0, 3.0, 4.0]])
    rois, labels, deltas, masks = build_detection_targets(
        proposals, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, 32, 32, dtype=torch.bool), torch.zeros(0, dtype=torch.bool),
        num_samples=2, positive_ratio=0.33)
    assert labels.tolist() == [0, 0] and rois.shape == (2, 4)
    assert deltas.abs().max() == 0 and masks.shape == (2, 28, 28)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_targets_on_cuda_match_cpu():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [20.0, 20.0, 30.0, 30.0]])
    cpu = build_rpn_targets(anchors, GT, NO_CROWD, std=STD)
    gpu = build_rpn_targets(anchors.cuda(), GT.cuda(), NO_CROWD.cuda(), std=STD)
    assert torch.equal(cpu[0], gpu[0].cpu())
    torch.testing.assert_close(cpu[1], gpu[1].cpu())
    out = build_detection_targets(anchors.cuda(), GT.cuda(), torch.tensor([2]).cuda(),
                                  _left_half_mask().cuda(), NO_CROWD.cuda(), 8, 0.5)
    assert all(t.is_cuda for t in out)


def test_empty_gt_boxes_are_ignored():
    # an instance whose mask vanished in resizing has the box (0, 0, 0, 0)
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    crowd = torch.tensor([False, False])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 1.0, 1.0], [50.0, 50.0, 60.0, 60.0]])
    labels, deltas = build_rpn_targets(anchors, gt, crowd)
    assert labels.tolist() == [1, 0, 0] and torch.isfinite(deltas).all()
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, :10, :10] = True
    rois, labels, deltas, _ = build_detection_targets(anchors, gt, torch.tensor([1, 2]), masks, crowd, 8, 0.5)
    assert labels.tolist() == [1, 1, 0, 0] and torch.isfinite(deltas).all()


# ---- Matterport's knobs: mini masks, max_gt_instances, random ROIs, crop --------------------------
def _ellipse(height, width, cx, cy, rx, ry) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1


def test_mask_targets_from_mini_masks_match_full_masks():
    from maskrcnn.boxes import masks_to_boxes
    from maskrcnn.model.targets import crop_mask_targets, minimize_masks

    full = torch.stack([_ellipse(300, 400, 150, 120, 90, 60), _ellipse(300, 400, 300, 200, 40, 70)])
    boxes = masks_to_boxes(full).float()
    mini = minimize_masks(full, boxes, (56, 56))
    assert mini.shape == (2, 56, 56) and mini.dtype == torch.bool
    assert mini.element_size() * mini.numel() == 2 * 56 * 56  # 6 KB whatever the image size
    rois = torch.tensor([[70.0, 50, 230, 190], [100, 80, 200, 160], [250, 120, 350, 280]])
    index = torch.tensor([0, 0, 1])
    from_full = crop_mask_targets(full, index, rois)
    from_mini = crop_mask_targets(mini, index, rois, gt_boxes=boxes)
    agree = (from_full == from_mini).float().mean().item()
    assert agree > 0.98, agree  # the same targets up to the mini mask's resampling
    assert from_full.sum() > 500


def test_keep_largest_logs_what_it_drops(caplog):
    from maskrcnn.model.targets import keep_largest

    keep = keep_largest(torch.tensor([5.0, 50, 1, 20, 30]), 3, "image 7")
    assert keep.tolist() == [1, 3, 4]
    assert "image 7 has 5 instances: kept the 3 largest, dropped 2" in caplog.text
    assert keep_largest(torch.tensor([1.0, 2]), 3).tolist() == [0, 1]


def test_random_rois_cover_the_gt_and_the_image():
    from torchvision.ops import box_iou

    from maskrcnn.model.targets import random_rois

    gt = torch.tensor([[40.0, 30, 60, 70], [100, 100, 120, 110]])
    rois = random_rois((128, 160), 200, gt, torch.Generator().manual_seed(0))
    assert rois.shape == (200, 4)
    assert (rois[:, 2:] > rois[:, :2]).all() and rois.min() >= 0
    assert (rois[:, 2] <= 160).all() and (rois[:, 3] <= 128).all()
    size = gt[:, 2:] - gt[:, :2]
    grown = torch.cat([gt[:, :2] - size, gt[:, 2:] + size], dim=1)  # each box grown by its size
    inside = ((rois[:180, None, :2] >= grown[None, :, :2]) & (rois[:180, None, 2:] <= grown[None, :, 2:] + 1))
    assert inside.all(dim=2).any(dim=1).all()  # 90% (180) are drawn around the boxes
    assert (box_iou(rois, gt).max(dim=0).values >= 0.5).all()  # each object gets positives


def test_random_crop_moves_masks_with_the_image():
    from maskrcnn.model.training import random_crop

    torch.manual_seed(0)
    masks = torch.stack([_ellipse(100, 150, 40, 50, 20, 30), _ellipse(100, 150, 140, 10, 5, 5)])
    image = np.zeros((100, 150, 3), np.uint8)
    image[masks[0].numpy()] = 255
    crops = [random_crop(image, {"masks": masks, "labels": torch.tensor([1, 2])}, 64) for _ in range(5)]
    for cropped, target in crops:
        assert cropped.shape == (64, 64, 3)
        assert target["masks"].shape[1:] == (64, 64) and len(target["labels"]) == len(target["masks"])
        if len(target["masks"]) and target["labels"][0] == 1:
            assert np.array_equal(cropped[:, :, 0] == 255, target["masks"][0].numpy())
    big, target = random_crop(image[:50, :60], {"masks": masks[:, :50, :60], "labels": torch.tensor([1, 2])}, 64)
    assert big.shape == (64, 64, 3)  # scaled up first: the short side 50 -> 64


@pytest.mark.parametrize("knobs", [dict(image_resize_mode="crop", image_min_dim=64, use_mini_mask=True),
                                   dict(use_rpn_rois=False, max_gt_instances=1, use_mini_mask=False)])
def test_training_step_honours_matterport_knobs(knobs, caplog):
    import maskrcnn
    from maskrcnn.data.shapes import ShapesDataset
    from test_model import small_config

    torch.manual_seed(0)
    ds = ShapesDataset(2, seed=3)
    images, targets = zip(*[ds[0], ds[1]])
    m = maskrcnn.MaskRCNN(small_config(train_bn=True, **knobs)).train()
    losses = m(list(images), list(targets))
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["mrcnn_mask_loss"] > 0
    if knobs.get("max_gt_instances") == 1:
        assert "kept the 1 largest" in caplog.text
    if knobs.get("image_resize_mode") == "crop":
        det = m.eval().detect([np.zeros((90, 130, 3), np.uint8)])[0]  # the whole image at inference
        assert det.masks.shape[1:] == (90, 130)


# ---- the sampler and the host's waits -------------------------------------------------------------
@pytest.mark.parametrize("n, count", [(10, 3), (10, 10), (10, 25), (1000, 7), (200_000, 256), (5, 0)])
def test_random_choice_is_distinct_in_range_and_seeded(n, count):
    from maskrcnn.model.targets import random_choice
    pick = random_choice(n, count, torch.Generator().manual_seed(1))
    assert pick.dtype == torch.int64 and pick.numel() == min(n, count)
    assert pick.unique().numel() == pick.numel() and (pick >= 0).all() and (pick < n).all()
    assert torch.equal(pick, random_choice(n, count, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("n", [12, 400])  # a permutation's prefix, and draws with repeats skipped
def test_random_choice_is_uniform(n):
    """Every element equally likely to be chosen, and to be chosen first (chi-square, 4000 draws
    of 3): sequential draws that skip repeats are a uniform sample without replacement."""
    from maskrcnn.model.targets import random_choice
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([random_choice(n, 3, g) for _ in range(4000)])
    for counts, total in ((torch.bincount(draws.flatten(), minlength=n), 12000),
                          (torch.bincount(draws[:, 0], minlength=n), 4000)):
        expected = total / n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        dof = n - 1
        assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)  # about 5 sigma


class _HostWaits(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make a host wait for a GPU: ``nonzero`` and indexing with a bool mask
    (whose kernel runs ``nonzero``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put_", "_index_put_impl_") and any(
            t is not None and t.dtype == torch.bool for t in args[1])
        self.count += name in ("nonzero", "masked_select") or bool_index
        return func(*args, **(kwargs or {}))


def test_targets_wait_for_the_gpu_only_to_sample():
    """With crowd and empty gt in the image, the targets still select nothing by a bool mask:
    the host waits twice per stage (the positives' and negatives' counts, for the sampler),
    for one image or a batch."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 60.0, 60.0], [0.0, 0.0, 0.0, 0.0]])
    crowd = torch.tensor([False, True, False])
    corners = torch.rand(300, 2, generator=torch.Generator().manual_seed(0)) * 60
    anchors = torch.cat([corners, corners + 12], dim=1)
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, :10, :10] = True
    with _HostWaits() as waits:
        labels, _ = build_rpn_targets(anchors, gt, crowd, num_samples=16)
    assert waits.count == 2 and (labels == 1).any()
    with _HostWaits() as waits:
        _, labels, _, _ = build_detection_targets(anchors, gt, torch.tensor([1, 2, 3]), masks, crowd, 16, 0.25)
    assert waits.count == 2 and (labels == 1).any()
    # a batch of four: still the two nonzero (and one read of the per-image counts, a tolist)
    from maskrcnn.model.targets import sample_detection_targets_batch
    with _HostWaits() as waits:
        out = sample_detection_targets_batch([anchors] * 4, [gt] * 4, [torch.tensor([1, 2, 3])] * 4, [masks] * 4,
                                             [crowd] * 4, 16, 0.25)
    assert waits.count == 2 and len(out.counts) == 4 and all(p > 0 for _, p in out.counts)


@pytest.mark.parametrize("block", [None, 18_000, 5_000])  # all images in one pass, two at a time, one by one
def test_rpn_targets_for_a_batch_equal_one_call_per_image(block, monkeypatch):
    """build_rpn_targets_batch gives what calling build_rpn_targets image by image gives with the
    same generator: images with more positives than the quota, no gt, only crowd, an empty box;
    whether the images' IoUs are computed together, two at a time or one by one."""
    from maskrcnn.model import targets as T
    from maskrcnn.model.targets import build_rpn_targets_batch
    g = torch.Generator().manual_seed(5)
    corners = torch.rand(3000, 2, generator=g) * 200
    anchors = torch.cat([corners, corners + 6 + torch.rand(3000, 2, generator=g) * 40], dim=1)
    gts = [torch.tensor([[20.0, 20.0, 60.0, 50.0], [100.0, 80.0, 170.0, 160.0], [0.0, 0.0, 0.0, 0.0]]),
           torch.zeros(0, 4),
           torch.tensor([[30.0, 30.0, 90.0, 90.0]]),
           torch.tensor([[10.0, 120.0, 50.0, 190.0], [120.0, 10.0, 190.0, 40.0]])]
    crowds = [torch.tensor([False, False, False]), torch.zeros(0, dtype=torch.bool), torch.tensor([True]),
              torch.tensor([False, True])]
    kwargs = dict(num_samples=64, positive_ratio=0.5, positive_iou=0.3, negative_iou=0.2, std=STD)
    if block is not None:
        monkeypatch.setattr(T, "IOU_BLOCK_ELEMENTS", block)
    out = build_rpn_targets_batch(anchors, gts, crowds, generator=torch.Generator().manual_seed(9), **kwargs)
    monkeypatch.undo()  # the reference: one image at a time, in one block
    labels, deltas = out.labels, out.deltas
    # the indices the losses read are the bool-mask selections' of the labels, in the same order
    assert torch.equal(out.positive, torch.nonzero(labels.view(-1) == 1)[:, 0])
    assert torch.equal(out.sampled, torch.nonzero(labels.view(-1) >= 0)[:, 0])
    one_by_one = torch.Generator().manual_seed(9)
    for i, (gt, crowd) in enumerate(zip(gts, crowds)):
        expected = build_rpn_targets(anchors, gt, crowd, generator=one_by_one, **kwargs)
        assert torch.equal(labels[i], expected[0]) and torch.equal(deltas[i], expected[1]), i
    assert (labels[0] == 1).sum() == 32  # more positives than the quota: a random half of 64
    assert (labels[1] == 0).sum() == 64 and (labels[2] == 1).sum() == 0 and (labels >= 0).sum() == 4 * 64


def _reference_detection_targets(proposals, gt, labels, masks, crowd, num_samples, ratio, pos_iou, neg_iou,
                                 mask_shape, generator, mini):
    """One image's ROI targets by the rules, written out plainly: candidates = proposals + usable
    gt, torchvision's box_iou, bool-mask selection, the sampler drawing positives then negatives."""
    from maskrcnn.boxes import box_deltas
    from maskrcnn.model.targets import _subset_positions, crop_mask_targets
    usable = ~crowd & (gt[:, 2] > gt[:, 0]) & (gt[:, 3] > gt[:, 1])
    candidates = torch.cat([proposals, gt])
    valid = torch.cat([torch.ones(len(proposals), dtype=torch.bool), usable])
    if len(gt):
        iou = box_iou(candidates, gt)
        near_crowd = ((iou >= 0.001) & crowd).any(dim=1)
        best_iou, best_gt = iou.masked_fill(~usable, -1).max(dim=1)
        positive = (best_iou >= pos_iou) & valid
        negative = (best_iou < neg_iou) & ~near_crowd & ~positive & valid
    else:
        positive, negative, best_gt = torch.zeros_like(valid), valid, torch.zeros(len(valid), dtype=torch.long)
    pos, neg = torch.nonzero(positive)[:, 0], torch.nonzero(negative)[:, 0]
    pos = pos[_subset_positions(len(pos), int(num_samples * ratio), generator)]
    neg = neg[_subset_positions(len(neg), num_samples - len(pos), generator)]
    keep = torch.cat([pos, neg])
    matched = best_gt[pos]
    deltas = torch.zeros(len(keep), 4)
    deltas[:len(pos)] = box_deltas(candidates[pos], gt[matched], STD)
    roi_labels = torch.zeros(len(keep), dtype=torch.long)
    roi_labels[:len(pos)] = labels[matched]
    pos_masks = crop_mask_targets(masks, matched, candidates[pos], mask_shape, gt if mini else None)
    return candidates[keep], roi_labels, deltas, pos_masks, (len(keep), len(pos))


@pytest.mark.parametrize("mini", [False, True])
@pytest.mark.parametrize("block", [None, 50])
def test_detection_targets_for_a_batch_follow_the_rules_image_by_image(mini, block, monkeypatch):
    """sample_detection_targets_batch over four images of different proposal and gt counts (more
    positives than the quota, no gt, only crowd gt and an empty box, no proposals) gives each
    image what the rules written out plainly give it, drawing from one generator in image order;
    also with the IoU matrix cut into blocks of rows."""
    from maskrcnn.model import targets as T
    if block is not None:
        monkeypatch.setattr(T, "IOU_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(3)

    def boxes(count, extent=120.0):
        xy = torch.rand(count, 2, generator=g) * extent
        return torch.cat([xy, xy + 4 + torch.rand(count, 2, generator=g) * 40], dim=1).floor()
    gts = [boxes(3), torch.zeros(0, 4), torch.tensor([[20.0, 20.0, 60.0, 70.0], [5.0, 5.0, 5.0, 9.0]]), boxes(5)]
    crowds = [torch.tensor([False, True, False]), torch.zeros(0, dtype=torch.bool), torch.tensor([True, False]),
              torch.zeros(5, dtype=torch.bool)]
    proposals = [torch.cat([gts[0][[0, 2]].repeat(20, 1) + torch.randn(40, 4, generator=g) * 0.5, boxes(60)]),
                 boxes(30), boxes(45), torch.zeros(0, 4)]
    labels = [torch.randint(1, 5, (len(b),), generator=g) for b in gts]
    shape = (14, 14) if mini else (170, 170)
    masks = [torch.rand(len(b), *shape, generator=g) > 0.4 for b in gts]
    kwargs = dict(num_samples=24, positive_ratio=0.25, positive_iou=0.5, negative_iou=0.4, mask_shape=(7, 7))
    out = T.sample_detection_targets_batch(proposals, gts, labels, masks, crowds, std=STD, mini_masks=mini,
                                           generator=torch.Generator().manual_seed(8), **kwargs)
    one_by_one = torch.Generator().manual_seed(8)
    rows = positives = 0
    for i in range(4):
        rois, roi_labels, deltas, pos_masks, counts = _reference_detection_targets(
            proposals[i], gts[i], labels[i], masks[i], crowds[i], 24, 0.25, 0.5, 0.4, (7, 7), one_by_one, mini)
        assert out.counts[i] == counts, i
        size, num_pos = counts
        torch.testing.assert_close(out.rois[rows:rows + size], rois, rtol=0, atol=0)
        assert torch.equal(out.labels[rows:rows + size], roi_labels), i
        torch.testing.assert_close(out.deltas[rows:rows + size], deltas, rtol=1e-6, atol=1e-6)
        assert torch.equal(out.positive_labels[positives:positives + num_pos], roi_labels[:num_pos])
        assert torch.equal(out.positive_masks[positives:positives + num_pos], pos_masks), i
        rows, positives = rows + size, positives + num_pos
    assert rows == len(out.rois) and positives == len(out.positive_masks)
    assert torch.equal(out.positive_rows, torch.nonzero(out.labels > 0)[:, 0])
    # image 3 has no proposals: its gt boxes are its candidates, all positive
    assert out.counts[0] == (24, 6) and out.counts[1] == (24, 0) and out.counts[2][1] == 0 and out.counts[3] == (5, 5)
    # the batch's targets are those of its images, one call each, put together (how a batch whose
    # images bring masks of different shapes is built)
    one_by_one = torch.Generator().manual_seed(8)
    parts = T.DetectionTargets.cat([
        T.sample_detection_targets_batch([proposals[i]], [gts[i]], [labels[i]], [masks[i]], [crowds[i]], std=STD,
                                         mini_masks=mini, generator=one_by_one, **kwargs) for i in range(4)])
    assert parts.counts == out.counts
    for together, apart in zip(out[:6], parts[:6]):
        torch.testing.assert_close(together, apart, rtol=0, atol=0)

