"""Mixed precision through the folded frozen-BN convolution: forward and backward agree on one
dtype under autocast, and the gradients equal those of the unfolded conv + FrozenBatchNorm2d."""
import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from maskrcnn.model.fuse import conv_norm


def conv_and_norm(seed: int = 0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=True)
    norm = FrozenBatchNorm2d(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 1.5)
    return conv, norm


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_folded_conv_gradients_match_unfolded(dtype):
    """In training a conv + FrozenBatchNorm2d runs folded whatever the module's ``fold`` choice
    (which keeps Matterport's conv-then-BN numerics at inference only): same outputs and
    gradients as the unfolded pair, and under autocast the activation stays in bf16."""
    conv, norm = conv_and_norm()
    x = torch.randn(2, 8, 12, 10, requires_grad=True)
    results = []
    for variant in ("fold", "module_keeps_unfolded", "reference"):
        conv.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            if variant == "reference":
                y = torch.relu(norm(conv(x)))
            else:
                y = conv_norm(conv, norm, x, relu=True, fold=variant == "fold")
        (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y.detach().float(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
        # folded: the conv's dtype; the unfolded FrozenBatchNorm2d promotes back to its float32 buffers
        assert y.dtype == (torch.float32 if variant == "reference" else dtype or torch.float32)
        assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    tol = 1e-5 if dtype is None else 5e-2
    for variant in results[:2]:
        for folded, plain in zip(variant, results[2]):
            scale = plain.abs().max().clamp(min=1)
            assert float((folded - plain).abs().max() / scale) < tol


def test_a_module_that_keeps_conv_then_bn_does_so_in_eval_mode():
    """``fold=False`` (the Matterport style's parity with Keras) holds outside training: an
    eval-mode conv runs conv then the FrozenBatchNorm2d, bit for bit, with or without autograd."""
    conv, norm = conv_and_norm()
    conv.eval()
    x = torch.randn(2, 8, 12, 10)
    assert torch.equal(conv_norm(conv, norm, x, fold=False), norm(conv(x)))
    with torch.inference_mode():
        assert torch.equal(conv_norm(conv, norm, x, fold=False), norm(conv(x)))


def test_cpu_pooling_of_a_bf16_map_is_torchvisions_autocast_rule():
    """A bf16 map (autocast) is pooled in float32 and the result rounded to bf16, as torchvision's
    autocast rule for roi_align runs its kernel."""
    from torchvision.ops import roi_align

    from maskrcnn.model.roi_align import roi_align_cpu
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 16, 20, 24, generator=g).to(torch.bfloat16)
    xy = torch.rand(30, 2, generator=g) * 70
    rois = torch.cat([torch.randint(0, 2, (30, 1), generator=g).float(), xy, xy + 5 + torch.rand(30, 2, generator=g) * 60], 1)
    ours = roi_align_cpu(feature, rois, 7, 0.25, 2)
    theirs = roi_align(feature.float(), rois, 7, 0.25, 2, aligned=False).to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    # the same float32 sums, rounded once; a sum in another order may round to the next bf16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("roi_pooling", ["crop_and_resize", "roi_align"])
def test_cpu_bf16_training_learns(roi_pooling):
    """``maskrcnn train --amp bf16`` on a CPU (both ROI poolings run embedding_bag on a bf16
    map): finite losses that fall on one batch."""
    import maskrcnn
    from maskrcnn.data.shapes import ShapesDataset
    from test_model import small_config
    images, targets = zip(*[ShapesDataset(2, seed=3)[i] for i in range(2)])
    torch.manual_seed(0)
    m = maskrcnn.MaskRCNN(small_config(train_bn=True, roi_pooling=roi_pooling)).train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    totals = []
    for _ in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = m(list(images), list(targets))
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 5.0)
        opt.step()
        totals.append(loss.item())
    assert sum(totals[-3:]) < 0.8 * sum(totals[:3])
