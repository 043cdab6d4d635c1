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
    conv, norm = conv_and_norm()
    x = torch.randn(2, 8, 12, 10, requires_grad=True)
    results = []
    for fold in (True, False):
        conv.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y = conv_norm(conv, norm, x, relu=True, fold=fold)
        (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y.detach().float(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
        if fold:  # the unfolded FrozenBatchNorm2d promotes back to its float32 buffers
            assert y.dtype == (dtype or torch.float32)
        assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    tol = 1e-5 if dtype is None else 5e-2
    for folded, plain in zip(*results):
        scale = plain.abs().max().clamp(min=1)
        assert float((folded - plain).abs().max() / scale) < tol
