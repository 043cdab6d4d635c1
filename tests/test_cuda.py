"""On a GPU the model gives the CPU's detections (skipped where CUDA is absent)."""
import pytest
import torch

import maskrcnn
from maskrcnn import Config
from test_torchvision_parity import MAX_SIZE, MIN_SIZE, assert_same_detections, images, random_torchvision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_detect_on_cuda_equals_cpu_and_torchvision():
    tv = random_torchvision(91)
    cfg = Config.preset("torchvision", num_classes=91, image_min_dim=MIN_SIZE, image_max_dim=MAX_SIZE)
    cpu = maskrcnn.MaskRCNN.from_torchvision(tv.state_dict(), cfg)
    gpu = maskrcnn.MaskRCNN.from_torchvision(tv.state_dict(), cfg).to("cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    imgs = images()
    on_cpu, on_gpu = cpu.detect(imgs), gpu.detect([im.cuda() for im in imgs])
    for c, g in zip(on_cpu, on_gpu):
        assert g.boxes.device.type == "cpu" and len(g) == len(c) > 0
        torch.testing.assert_close(g.boxes, c.boxes, atol=1e-2, rtol=0)
        torch.testing.assert_close(g.scores, c.scores, atol=1e-4, rtol=0)
        assert torch.equal(g.labels, c.labels)
        assert (g.masks != c.masks).sum() <= 1e-4 * c.masks.numel()
    with torch.no_grad():
        ref = tv.cuda()([im.cuda().float() / 255 for im in imgs])
    for r, g in zip(ref, on_gpu):
        assert_same_detections({k: v.cpu() for k, v in r.items()}, g)
