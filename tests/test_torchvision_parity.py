"""Parity with torchvision's maskrcnn_resnet50_fpn (v1): the same random weights (every
parameter and BN statistic randomised) loaded into both, the same images, the same detections."""
import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

import maskrcnn
from maskrcnn import Config
from maskrcnn.errors import WeightsError
from reference import same_detections

MIN_SIZE, MAX_SIZE = 320, 512


def random_torchvision(num_classes: int, seed: int = 0):
    """torchvision's Mask R-CNN with every weight random but scaled so that activations stay
    O(1), class scores spread over (0, 1) and masks cover part of each box."""
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                               min_size=MIN_SIZE, max_size=MAX_SIZE).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tv.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in tv.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        tv.rpn.head.bbox_pred.weight.mul_(0.1)
        tv.roi_heads.box_predictor.bbox_pred.weight.mul_(0.1)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(5)
        tv.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(30)
        tv.roi_heads.mask_predictor.mask_fcn_logits.bias.add_(4.0)
    return tv


def images(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 240, 320), generator=g, dtype=torch.uint8),
            torch.randint(0, 256, (3, 300, 200), generator=g, dtype=torch.uint8)]


def assert_same_detections(ref: dict, ours):
    """Same detections (reference.same_detections: labels, boxes within 1e-2 px, scores within
    1e-4, masks identical up to 1e-4 of the pixels, which sit on 0.5 within float noise)."""
    assert len(ref["boxes"]) > 0
    ok, note = same_detections(ref, ours)
    assert ok, note
    assert ours.masks.any(dim=(1, 2)).sum() > 0


@pytest.mark.parametrize("num_classes", [5, 91])
def test_same_detections_as_torchvision(num_classes):
    tv = random_torchvision(num_classes)
    cfg = Config.preset("torchvision", num_classes=num_classes, image_min_dim=MIN_SIZE, image_max_dim=MAX_SIZE)
    ours = maskrcnn.MaskRCNN.from_torchvision(tv.state_dict(), cfg)
    imgs = images()
    with torch.no_grad():
        ref = tv([im.float() / 255 for im in imgs])
    dets = ours.detect(imgs)
    for r, d in zip(ref, dets):
        assert_same_detections(r, d)
    # numpy HxWx3 input gives the same result as the tensor input (one image per batch: a batch
    # pads to its largest image, which changes the features near the padded border)
    single = ours.detect([imgs[1]])[0]
    again = ours.detect([imgs[1].permute(1, 2, 0).numpy()])[0]
    torch.testing.assert_close(again.boxes, single.boxes)
    assert torch.equal(again.masks, single.masks)


def test_from_torchvision_file_picks_preset_and_class_count(tmp_path):
    tv = random_torchvision(7)
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    model = maskrcnn.MaskRCNN.from_torchvision(path)
    assert model.config.num_classes == 7 and model.config.backbone_style == "pytorch"
    assert model.config.image_min_dim == 800 and model.config.rpn_objectness == "sigmoid"


def test_class_count_mismatch_names_layer_and_shapes():
    tv = random_torchvision(5)
    with pytest.raises(WeightsError, match=r"box_head\.class_logits\.weight has shape \(5, 1024\).*\(3, 1024\)"):
        maskrcnn.MaskRCNN.from_torchvision(tv.state_dict(), Config.preset("torchvision", num_classes=3))
