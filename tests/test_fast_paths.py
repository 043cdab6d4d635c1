"""The speed paths give the reference path's answers: BN folded into convs, channels-last
features, the CPU's embedding_bag ROI pooling and its Winograd 3x3 convolutions, the GPU's
batched mask paste."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import roi_align
from torchvision.ops.misc import FrozenBatchNorm2d

import maskrcnn
from maskrcnn import Config
from maskrcnn.model import conv
from maskrcnn.model import roi_align as RA
from maskrcnn.model.fuse import conv_norm, fold, set_bn_folding
from test_torchvision_parity import MAX_SIZE, MIN_SIZE, assert_same_detections, images, random_torchvision


def random_norm(norm: nn.Module, channels: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(channels, generator=g))
        norm.running_mean.copy_(torch.randn(channels, generator=g))
        norm.running_var.copy_(torch.rand(channels, generator=g) + 0.1)
    return norm


@pytest.mark.parametrize("norm_kind", ["frozen", "eval_bn"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_conv_equals_conv_then_norm(norm_kind, bias, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, 2, 1, bias=bias)
    norm = FrozenBatchNorm2d(16, eps=1e-3) if norm_kind == "frozen" else nn.BatchNorm2d(16, eps=1e-3).eval()
    random_norm(norm, 16, 1)
    x = torch.randn(2, 8, 17, 23)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = torch.relu(norm(conv(x)))
    with torch.inference_mode():
        fast = conv_norm(conv, norm, x, relu=True)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert fast.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_training_bn_is_not_folded_and_folded_gradients_match():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6).train()
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(conv_norm(conv, bn, x), bn(conv(x)))  # batch statistics, unfolded
    frozen = random_norm(FrozenBatchNorm2d(6), 6, 2)
    conv_norm(conv, frozen, x, relu=True).square().sum().backward()
    folded_grad = conv.weight.grad.clone()
    conv.weight.grad = None
    torch.relu(frozen(conv(x))).square().sum().backward()
    torch.testing.assert_close(folded_grad, conv.weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_folded_conv_gradients(bias, channels_last):
    """Training through a folded conv + FrozenBatchNorm2d: output and the gradients of input,
    weight and bias equal the unfolded pair's."""
    torch.manual_seed(1)
    conv, frozen = nn.Conv2d(4, 6, 3, 2, 1, bias=bias), random_norm(FrozenBatchNorm2d(6), 6, 4)
    x = torch.randn(2, 4, 11, 9, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    g = torch.randn(2, 6, 6, 5)
    out = conv_norm(conv, frozen, xin, relu=True)
    out.backward(g)
    fast = [x.grad.clone(), conv.weight.grad.clone()] + ([conv.bias.grad.clone()] if bias else [])
    x.grad = None
    conv.zero_grad()
    ref = torch.relu(frozen(conv(xin)))
    ref.backward(g)
    slow = [x.grad, conv.weight.grad] + ([conv.bias.grad] if bias else [])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fold_cache_follows_weight_updates():
    conv, norm = nn.Conv2d(3, 4, 1), random_norm(FrozenBatchNorm2d(4), 4, 3)
    x = torch.randn(1, 3, 5, 5)
    with torch.inference_mode():
        first = conv_norm(conv, norm, x)
    with torch.no_grad():
        conv.weight.mul_(2)  # an optimiser step: same storage, new version
        norm.running_mean.add_(1)
    with torch.inference_mode():
        second = conv_norm(conv, norm, x)
    torch.testing.assert_close(second, norm(conv(x)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, second)
    w, b = fold(conv, norm, exact=False)
    torch.testing.assert_close(w, fold(conv, norm)[0])


def random_rois(count: int, g: torch.Generator, extent: float = 200.0) -> torch.Tensor:
    """[count, (image 0/1, x1, y1, x2, y2)]: boxes inside, across and beyond the map's edges,
    down to sub-pixel sizes and degenerate ones."""
    xy = torch.rand(count, 2, generator=g) * (extent * 1.3) - extent * 0.15
    size = torch.rand(count, 2, generator=g) ** 3 * extent * 0.5
    size[::7] = 0.0  # zero width and height
    return torch.cat([torch.randint(0, 2, (count, 1), generator=g).float(), xy, xy + size], dim=1)


@pytest.mark.parametrize("sampling_ratio,output_size", [(2, 7), (1, 14), (3, 5)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_cpu_roi_align_equals_torchvision(sampling_ratio, output_size, channels_last):
    """embedding_bag pooling = torchvision's kernel, to float rounding, on boxes that reach past
    every edge (samples below -1 or above H count as zero there, clamp to the edge between)."""
    g = torch.Generator().manual_seed(sampling_ratio * 100 + output_size)
    feature = torch.randn(2, 16, 40, 52, generator=g)
    rois = random_rois(300, g)
    ref = roi_align(feature, rois, output_size, 0.25, sampling_ratio, aligned=False)
    if channels_last:
        feature = feature.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fast = RA.roi_align_cpu(feature, rois, output_size, 0.25, sampling_ratio)
    assert fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, atol=2e-6, rtol=0)


def test_cpu_crop_and_resize_equals_gather_path():
    """On a CPU crop_and_resize pools with embedding_bag; on a GPU and in export by gathering
    corners: the same values and gradients to rounding, boxes beyond [0, 1] and one-sample
    crops included."""
    g = torch.Generator().manual_seed(5)
    feature = torch.randn(2, 8, 33, 47, generator=g).contiguous(memory_format=torch.channels_last)
    rois = random_rois(200, g, extent=1.0)
    index, boxes = rois[:, 0].long(), rois[:, 1:]
    for size in [(14, 14), (7, 5), (1, 1)]:
        upstream = torch.randn(200, 8, *size, generator=g)
        results = []
        for bags in (False, True):
            leaf = feature.clone().requires_grad_()
            out = RA.crop_and_resize(leaf, boxes, index, size, bags=bags)
            out.backward(upstream)
            results.append((out.detach(), leaf.grad))
        (ref, ref_grad), (fast, fast_grad) = results
        torch.testing.assert_close(fast, ref, atol=2e-6, rtol=0)
        torch.testing.assert_close(fast_grad, ref_grad, atol=1e-5, rtol=0)


def test_cpu_roi_align_gradient_equals_torchvision():
    """The embedding_bag pooling's backward (CPU training) = torchvision roi_align's, to rounding."""
    g = torch.Generator().manual_seed(11)
    feature = torch.randn(2, 16, 40, 52, generator=g)
    rois = random_rois(300, g)
    upstream = torch.randn(300, 16, 7, 7, generator=g)
    ref_leaf = feature.clone().requires_grad_()
    roi_align(ref_leaf, rois, 7, 0.25, 2, aligned=False).backward(upstream)
    leaf = feature.contiguous(memory_format=torch.channels_last).requires_grad_()
    RA.roi_align_cpu(leaf, rois, 7, 0.25, 2).backward(upstream)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=1e-5, rtol=0)


def test_fast_path_detections_equal_reference_path():
    """Channels-last + folded BN + embedding_bag pooling + Winograd vs NCHW, conv then BN,
    direct convolutions, one thread."""
    tv = random_torchvision(91)
    cfg = Config.preset("torchvision", num_classes=91, image_min_dim=MIN_SIZE, image_max_dim=MAX_SIZE)
    fast = maskrcnn.MaskRCNN.from_torchvision(tv.state_dict(), cfg)
    ref = maskrcnn.MaskRCNN.from_torchvision(tv.state_dict(), cfg)
    assert set_bn_folding(ref, False) > 0
    ref.backbone.channels_last = False
    ref.config.cpu_inference_conv = "direct"
    imgs = images()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = ref.detect(imgs)
    finally:
        torch.set_num_threads(threads)
    for e, d in zip(expected, fast.detect(imgs)):
        assert len(d) == len(e) > 0
        torch.testing.assert_close(d.boxes, e.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(d.scores, e.scores, atol=1e-5, rtol=0)
        assert torch.equal(d.labels, e.labels)
        assert (d.masks != e.masks).sum() <= 1e-4 * e.masks.numel()
    # and the fast path still matches torchvision itself
    with torch.no_grad():
        tv_out = tv([im.float() / 255 for im in imgs])
    for r, d in zip(tv_out, fast.detect(imgs)):
        assert_same_detections(r, d)


needs_nnpack = pytest.mark.skipif(not conv.nnpack_available(), reason="this PyTorch build has no NNPACK")


@needs_nnpack
@pytest.mark.parametrize("shape", [(1, 128, 60, 70), (31, 256, 14, 14), (4, 128, 37, 51)])
def test_winograd_convolution_equals_direct(shape):
    """NNPACK's Winograd 3x3 = the direct convolution to ~1e-5 of the output's scale, from NCHW
    and channels-last input, with a module's weights and with given (folded) ones."""
    g = torch.Generator().manual_seed(shape[1])
    layer = nn.Conv2d(shape[1], 128, 3, padding=1)
    x = torch.randn(*shape, generator=g)
    weight, bias = layer.weight * 0.5, layer.bias + 1
    with torch.inference_mode():
        expected = layer(x)
        expected_given = torch.nn.functional.conv2d(x, weight, bias, padding=1)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            with conv.winograd():
                assert conv.applies(inp, layer)
                out = conv.convolve(layer, inp)
                given = conv.convolve(layer, inp, weight, bias)
            assert out.is_contiguous()
            # F(6x6, 3x3) rounds ~10x float32's direct noise (see maskrcnn.model.conv)
            assert (out - expected).abs().max() <= 3e-5 * expected.abs().max()
            assert (given - expected_given).abs().max() <= 3e-5 * expected_given.abs().max()
            assert (out - expected).pow(2).mean().sqrt() <= 1e-5 * expected.pow(2).mean().sqrt()


@needs_nnpack
def test_winograd_applies_only_where_it_should():
    c = conv.MIN_CHANNELS
    layer = nn.Conv2d(c, c, 3, padding=1)
    big, small = torch.randn(1, c, 60, 60), torch.randn(1, c, 20, 20)
    crops, few_crops = torch.randn(31, c, 14, 14), torch.randn(30, c, 14, 14)
    with torch.inference_mode():
        assert not conv.applies(big, layer)  # outside the context
        with conv.winograd():
            assert conv.applies(big, layer) and conv.applies(crops, layer)
            assert not conv.applies(small, layer)  # fewer than MIN_PIXELS outputs
            assert not conv.applies(few_crops, layer)  # fewer than MIN_BATCHED_PIXELS
            assert not conv.applies(big.double(), layer)
            for other in (nn.Conv2d(c, c, 3, stride=2, padding=1), nn.Conv2d(c, c, 1),
                          nn.Conv2d(c, c, 3, padding=1, groups=2), nn.Conv2d(c, c, 3, padding=2, dilation=2),
                          nn.Conv2d(c, c // 2, 3, padding=1)):  # thin
                assert not conv.applies(big, other)
            with conv.winograd(False):
                assert not conv.applies(big, layer)
    with conv.winograd():
        assert not conv.applies(big, layer)  # autograd on: training keeps the direct convolution


@needs_nnpack
def test_direct_setting_never_runs_winograd(monkeypatch):
    """``cpu_inference_conv="direct"``: no NNPACK call anywhere in detect; "winograd": the FPN,
    RPN (and mask head on enough detections) call it."""
    tv = random_torchvision(91)
    cfg = Config.preset("torchvision", num_classes=91, image_min_dim=MIN_SIZE, image_max_dim=MAX_SIZE)
    model = maskrcnn.MaskRCNN.from_torchvision(tv.state_dict(), cfg)
    calls = []
    original = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda x, *a: calls.append(x.shape) or original(x, *a))
    imgs = images()[:1]
    model.config.cpu_inference_conv = "direct"
    model.detect(imgs)
    assert calls == []
    model.config.cpu_inference_conv = "winograd"
    model.detect(imgs)
    assert len(calls) >= 2 and all(s[1] == 256 for s in calls)


def test_nchw_features_are_pooled_channels_last():
    with torch.inference_mode():
        maps = [torch.randn(1, 8, 6, 7), torch.randn(1, 8, 3, 4).contiguous(memory_format=torch.channels_last)]
        out = RA.pooling_layout(maps)
        assert all(o.is_contiguous(memory_format=torch.channels_last) for o in out)
        assert out[1] is maps[1] and torch.equal(out[0], maps[0])


def test_mask_head_logits_of_the_given_classes_only():
    """``class_ids``: each ROI's class map of the full logits, NCHW or channels-last input."""
    from maskrcnn.model.heads import MaskHead
    head = MaskHead(16, 7, channels=16, use_bn=False)
    crops = torch.randn(5, 16, 14, 14)
    ids = torch.tensor([3, 0, 6, 3, 1])
    with torch.inference_mode():
        full = head(crops)
        for x in (crops, crops.contiguous(memory_format=torch.channels_last)):
            picked = head(x, ids)
            assert picked.shape == (5, 28, 28)
            torch.testing.assert_close(picked, full[torch.arange(5), ids], atol=1e-5, rtol=1e-5)


def test_device_constant_is_made_once_off_the_cpu_and_fresh_on_it():
    """Host-known values (std-devs, windows, the mean pixel) reach a GPU once, not with a
    blocking copy at every call; on the CPU each call gets its own tensor, as torch.tensor."""
    from maskrcnn.device import device_constant
    a, b = device_constant((0.1, 0.1, 0.2, 0.2), "cpu"), device_constant((0.1, 0.1, 0.2, 0.2), "cpu")
    assert a is not b and torch.equal(a, torch.tensor([0.1, 0.1, 0.2, 0.2]))
    two = device_constant(2.0, "cpu", torch.float64)
    assert two.shape == () and two.dtype == torch.float64 and two.item() == 2.0
    with torch.inference_mode():  # first made inside a detect ...
        kept = device_constant((0.1, 0.1, 0.2, 0.2), "meta")
    again = device_constant([0.1, 0.1, 0.2, 0.2], "meta")
    assert again is kept and kept.shape == (4,) and kept.dtype == torch.float32
    assert not kept.is_inference() and not kept.requires_grad  # ... usable by training afterwards
    assert device_constant((0.1, 0.1, 0.2, 0.2), "meta", torch.float64) is not kept
    assert device_constant((0.1, 0.1, 0.2, 0.3), "meta") is not kept


@pytest.mark.parametrize("block", [1 << 24, 5000])
def test_batched_mask_paste_equals_the_per_mask_interpolate(monkeypatch, block):
    """The batched paste (used on CUDA) gives the per-mask ``interpolate`` paste pixel for pixel:
    boxes inside, across and past the image's edges, zero-width boxes, one mask per block too."""
    from maskrcnn.model import detection
    from maskrcnn.model.detection import paste_masks_torchvision
    monkeypatch.setattr(detection, "PASTE_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(0)
    pasted = 0
    for trial in range(40):
        n = int(torch.randint(1, 12, (1,), generator=g))
        h, w = (int(v) for v in torch.randint(20, 160, (2,), generator=g))
        masks = torch.rand(n, 28, 28, generator=g)
        centre = (torch.rand(n, 2, generator=g) * 1.4 - 0.2) * torch.tensor([w, h])
        size = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.8 + 0.01
        if trial % 5 == 0:
            size[0, 0] = 0.0
        boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
        loop = paste_masks_torchvision(masks, boxes, (h, w), batched=False)
        batched = paste_masks_torchvision(masks, boxes, (h, w), batched=True)
        assert batched.shape == (n, h, w) and torch.equal(batched, loop), trial
        pasted += int(loop.sum())
    assert pasted > 10_000  # the comparison saw masks, not only empty images


@pytest.mark.parametrize("count", [300, 3000])  # torchvision's CPU form: one offset NMS, then one NMS a group
def test_offset_nms_keeps_what_torchvision_batched_nms_keeps(count):
    """The GPU's NMS within groups (one NMS of group-offset boxes, no host value) keeps the
    boxes torchvision's batched_nms keeps, in the same order: five groups of crowded boxes, as
    the per-level proposals are."""
    from maskrcnn.boxes import offset_nms
    g = torch.Generator().manual_seed(count)
    xy = torch.rand(count, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 2 + torch.rand(count, 2, generator=g) * 60], dim=1)
    scores = torch.rand(count, generator=g)
    groups = torch.randint(0, 5, (count,), generator=g)
    ours = offset_nms(boxes, scores, groups, 0.3)
    assert torch.equal(ours, torchvision.ops.batched_nms(boxes, scores, groups, 0.3))
    assert 0 < len(ours) < count
    assert len(offset_nms(boxes[:0], scores[:0], groups[:0], 0.7)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_crop_and_resize_of_all_levels_at_once_equals_one_call_per_level(dtype, monkeypatch):
    """The GPU's Matterport pooling gathers every box from its own level in one pass over a
    table of all levels' pixels: the crops and the maps' gradients of one gather per level, bit
    for bit, on a 4-level pyramid of odd sizes with boxes on every level and beyond the image."""
    g = torch.Generator().manual_seed(7)
    shapes = [(33, 47), (17, 24), (9, 12), (5, 6)]
    maps = [torch.randn(2, 8, h, w, generator=g).to(dtype) for h, w in shapes]
    rois = random_rois(300, g, extent=1.0)
    index, boxes = rois[:, 0].long(), rois[:, 1:]
    levels = RA.matterport_levels(boxes, (1024, 1024))
    assert set(levels.tolist()) == {2, 3, 4, 5}
    upstream = torch.randn(300, 8, 7, 7, generator=g)
    results = []
    for together in (True, False):
        leaves = [m.clone().requires_grad_() for m in maps]
        if together:
            out = RA.crop_and_resize_levels(leaves, boxes, index, levels - 2, (7, 7))
        else:
            out = torch.zeros(300, 8, 7, 7)
            for lvl, leaf in enumerate(leaves):
                idx = torch.nonzero(levels - 2 == lvl)[:, 0]
                out[idx] = RA.crop_and_resize(leaf, boxes[idx], index[idx], (7, 7), bags=False).float()
        out.float().backward(upstream)
        results.append((out.detach().float(), [leaf.grad for leaf in leaves]))
    assert torch.equal(results[0][0], results[1][0])
    for together, apart in zip(results[0][1], results[1][1]):
        assert torch.equal(together, apart)
    # and pyramid_roi_align takes that path where it does not pool with embedding_bag (GPU, export)
    monkeypatch.setattr(RA, "fast_pooling", lambda feature: False)
    pooled = RA.pyramid_roi_align(maps, [boxes[index == 0], boxes[index == 1]], 7, (1024, 1024), (4, 8, 16, 32))
    order = torch.cat([torch.nonzero(index == 0)[:, 0], torch.nonzero(index == 1)[:, 0]])
    assert torch.equal(pooled, results[0][0][order].to(dtype)) and pooled.is_contiguous()


def test_any_along_and_mask_boxes_equal_torchs_any():
    """boxes.any_along (the bytes' amax, vectorised where bool ``any`` is not) equals ``any``:
    contiguous, strided and transposed masks, one dim or several, empty dims; masks_to_boxes
    built on it gives each mask's tight box and (0, 0, 0, 0) for an empty one."""
    from maskrcnn.boxes import any_along, masks_to_boxes
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 37, 51, generator=gen) > 0.97
    masks[2] = False
    for m in (masks, masks[:, ::3, 1::2], masks.transpose(1, 2)):
        for dim in (0, 1, 2, (1, 2), (0, 2)):
            assert torch.equal(any_along(m, dim), m.any(dim=dim)), dim
    for shape in ((2, 0, 3), (0, 4, 4)):
        empty = torch.zeros(shape, dtype=torch.bool)
        assert torch.equal(any_along(empty, (1, 2)), empty.any(dim=(1, 2)))
    box = torch.zeros(3, 20, 30, dtype=torch.bool)
    box[0, 4:9, 7:21] = True
    box[1, 19, 0] = True
    assert masks_to_boxes(box).tolist() == [[7, 4, 21, 9], [0, 19, 1, 20], [0, 0, 0, 0]]
