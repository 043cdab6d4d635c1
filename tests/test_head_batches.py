"""What the second-stage heads train on: in the torchvision preset the same proposals, sampled
ROIs and positives (the mask head's batch) as torchvision's RoIHeads on the same weights and
batch; and the mask head's batch padded to a bucket with losses and gradients unchanged."""
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import roi_heads

import maskrcnn
from maskrcnn import Config, ConfigError
from maskrcnn.model import training
from maskrcnn.model.preprocess import mold_images
from reference import NUM_CLASSES, build_torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_gpu_train import batch  # noqa: E402

H, W = 320, 427


@pytest.fixture(scope="module")
def models():
    """torchvision's Mask R-CNN (random weights) and ours converted from it, both training."""
    tv = build_torchvision(H, W)
    cfg = Config.preset("torchvision", num_classes=NUM_CLASSES, image_min_dim=H, image_max_dim=W)
    return tv.train(), maskrcnn.MaskRCNN.from_torchvision(tv.state_dict(), cfg).train()


def _torchvision_counts(tv, images, targets, monkeypatch) -> dict:
    """Per image: proposals, sampled ROIs and positives of torchvision's RoIHeads, and the ROIs
    its mask head pooled."""
    counts = {}
    select, mask_loss = roi_heads.RoIHeads.select_training_samples, roi_heads.maskrcnn_loss

    def select_hook(self, proposals, targets):
        counts["proposals"] = [len(p) for p in proposals]
        out = select(self, proposals, targets)
        counts["sampled"] = [len(p) for p in out[0]]
        counts["positives"] = [int((lab > 0).sum()) for lab in out[2]]
        return out

    def mask_loss_hook(mask_logits, proposals, *args):
        counts["mask_rois"] = [len(p) for p in proposals]
        return mask_loss(mask_logits, proposals, *args)

    monkeypatch.setattr(roi_heads.RoIHeads, "select_training_samples", select_hook)
    monkeypatch.setattr(roi_heads, "maskrcnn_loss", mask_loss_hook)
    with torch.no_grad():
        tv([im.float() / 255 for im in images], targets)
    return counts


def _our_counts(ours, images, targets, monkeypatch) -> dict:
    """The same four counts of ours."""
    counts = {k: [] for k in ("proposals", "sampled", "positives")}
    build = training.sample_detection_targets_batch
    mask_logits = type(ours).mask_logits

    def build_hook(proposals, *args, **kwargs):
        out = build(proposals, *args, **kwargs)
        rows = 0
        for props, (size, num_positive) in zip(proposals, out.counts):
            labels = out.labels[rows:rows + size]
            counts["proposals"].append(len(props))
            counts["sampled"].append(size)
            counts["positives"].append(int((labels > 0).sum()))
            assert num_positive == counts["positives"][-1] and (labels[:num_positive] > 0).all()
            rows += size
        assert rows == len(out.rois) and len(out.positive_masks) == sum(p for _, p in out.counts)
        return out

    def mask_logits_hook(self, features, boxes, image_shape):
        counts["mask_rois"] = [len(b) for b in boxes]
        return mask_logits(self, features, boxes, image_shape)

    monkeypatch.setattr(training, "sample_detection_targets_batch", build_hook)
    monkeypatch.setattr(type(ours), "mask_logits", mask_logits_hook)
    with torch.no_grad():
        ours(images, targets)
    return counts


@pytest.mark.parametrize("seed", [0, 1])
def test_torchvision_preset_samples_the_rois_torchvision_samples(models, seed, monkeypatch):
    """2 images of 320x427 with 8 ellipses each: proposals, sampled ROIs, positives and mask-head
    ROIs equal image by image.  With the inference pre-NMS limit in training (1000 a level, not
    torchvision's 2000) ours had 1254 and 1256 proposals and 11 and 21 positives (seed 0)
    against torchvision's 2000, 2000, 13 and 29."""
    tv, ours = models
    images, targets = batch(2, H, W, 8, seed=seed)
    theirs = _torchvision_counts(tv, images, targets, monkeypatch)
    mine = _our_counts(ours, images, targets, monkeypatch)
    assert mine == theirs
    assert all(p > 8 for p in theirs["positives"])  # the 8 gt boxes and some proposals


def test_pre_nms_limit_reaches_the_proposal_layer():
    """first_stage's ``pre_nms_limit`` (training passes ``pre_nms_limit_training``) is the one the
    ProposalLayer keeps: unset means ``pre_nms_limit``, and a smaller one changes the proposals."""
    from test_model import small_config

    for cfg in (small_config(), small_config(proposal_selection="per_level", rpn_objectness="sigmoid")):
        assert cfg.pre_nms_limit_training is None
        torch.manual_seed(0)
        model = maskrcnn.MaskRCNN(cfg).train()
        images = [torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8) for _ in range(2)]
        molded, metas = mold_images(images, cfg, model.device)
        with torch.no_grad():
            default = model.first_stage(molded, metas, cfg.post_nms_rois_training).proposals
            same = model.first_stage(molded, metas, cfg.post_nms_rois_training, cfg.pre_nms_limit).proposals
            fewer = model.first_stage(molded, metas, cfg.post_nms_rois_training, 20).proposals
        for a, b, c in zip(default, same, fewer):
            assert len(a) > 10 and torch.equal(a, b) and len(c) <= 20 * 5 < len(a)  # per level: 20 a level


def _head_inputs(model, images, targets):
    """The heads' inputs of one batch: features (leaves that take gradients), each image's
    proposals and ground truth in molded pixels, the molded shape."""
    cfg = model.config
    molded, metas = mold_images(images, cfg, model.device)
    shape = tuple(molded.shape[-2:])
    gts = [training.mold_target(t, m, shape, model.device, cfg.max_gt_instances,
                                cfg.mini_mask_shape if cfg.use_mini_mask else None) for t, m in zip(targets, metas)]
    with torch.no_grad():
        stage = model.first_stage(molded, metas, cfg.post_nms_rois_training, cfg.pre_nms_limit_training)
        proposals = [training.to_pixels(model, p, shape) for p in stage.proposals]
    return [f.detach().requires_grad_() for f in stage.features], proposals, gts, shape


def _head_losses_and_grads(model, inputs, bucket: int, monkeypatch):
    """(losses, gradients of the heads' parameters and the features, the mask head's batch)
    of :func:`training.head_losses` with ``mask_batch_bucket=bucket``, sampling seeded."""
    features, proposals, gts, shape = inputs
    monkeypatch.setattr(model.config, "mask_batch_bucket", bucket)
    pooled = []
    mask_logits = type(model).mask_logits
    monkeypatch.setattr(type(model), "mask_logits",
                        lambda self, f, boxes, s: pooled.append(sum(map(len, boxes))) or mask_logits(self, f, boxes, s))
    model.zero_grad()
    for f in features:
        f.grad = None
    torch.manual_seed(0)
    losses = training.head_losses(model, features, proposals, gts, shape)
    sum(losses.values()).backward()
    params = [*model.box_head.parameters(), *model.mask_head.parameters()]
    leaves = [p for p in params if p.requires_grad] + features  # a level no ROI was pooled from has none
    grads = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in leaves]
    return {k: v.detach() for k, v in losses.items()}, grads, pooled[0]


def _assert_padding_changes_nothing(model, inputs, monkeypatch, positives: int, padded: int):
    losses, grads, pooled = _head_losses_and_grads(model, inputs, 1, monkeypatch)
    padded_losses, padded_grads, padded_pooled = _head_losses_and_grads(model, inputs, 32, monkeypatch)
    assert (pooled, padded_pooled) == (positives, padded)
    assert losses == padded_losses  # the same floats
    assert len(grads) == len(padded_grads)
    for g, pg in zip(grads, padded_grads):
        # equal but for the order of a weight gradient's sum over the batch (the padding adds zeros)
        torch.testing.assert_close(pg, g, rtol=1e-5, atol=1e-7)


def test_mask_batch_padding_keeps_losses_and_gradients_torchvision_preset(models, monkeypatch):
    """The 42 positive ROIs of a 2-image batch padded to 64 with bucket 32: the five losses are
    the same floats, every gradient of the heads and of the features equal (to rounding)."""
    _, ours = models
    images, targets = batch(2, H, W, 8, seed=0)
    _assert_padding_changes_nothing(ours, _head_inputs(ours, images, targets), monkeypatch, 42, 64)


def test_mask_batch_padding_keeps_losses_and_gradients_matterport_preset(monkeypatch):
    """The same in the Matterport layout: mask head with frozen BatchNorm, normalized boxes,
    crop_and_resize pooling, mini masks."""
    from test_model import small_config

    torch.manual_seed(0)
    model = maskrcnn.MaskRCNN(small_config()).train()
    images, targets = batch(2, 96, 128, 6, seed=2)
    targets = [{**t, "labels": t["labels"] % 3 + 1} for t in targets]
    _assert_padding_changes_nothing(model, _head_inputs(model, images, targets), monkeypatch, 12, 32)


def test_mask_batch_bucket_defaults_and_batch_statistics():
    """None: 32 on CUDA, 1 on the CPU; a mask head whose BatchNorm learns is never padded."""
    from maskrcnn.config import MASK_BATCH_BUCKET_CUDA
    from test_model import small_config

    frozen = maskrcnn.MaskRCNN(small_config()).train().mask_head
    learning = maskrcnn.MaskRCNN(small_config(train_bn=True)).train().mask_head
    assert training.mask_batch_bucket(None, torch.device("cuda"), frozen) == MASK_BATCH_BUCKET_CUDA == 32
    assert training.mask_batch_bucket(None, torch.device("cpu"), frozen) == 1
    assert training.mask_batch_bucket(16, torch.device("cpu"), frozen) == 16
    assert training.mask_batch_bucket(16, torch.device("cuda"), learning) == 1
    assert training.mask_batch_bucket(16, torch.device("cuda"), learning.eval()) == 16
    with pytest.raises(ConfigError, match="mask_batch_bucket=0 must be an integer > 0 or null"):
        Config(mask_batch_bucket=0)


def test_pad_to_bucket():
    rois = [torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]), torch.zeros(0, 4), torch.tensor([[9.0, 9, 10, 10]])]
    padded = training.pad_to_bucket(rois, 4)
    assert [len(r) for r in padded] == [2, 0, 2]
    assert torch.equal(padded[2], torch.tensor([[9.0, 9, 10, 10], [1, 2, 3, 4]]))
    assert training.pad_to_bucket(rois, 3) is rois and training.pad_to_bucket(rois, 1) is rois
    assert training.pad_to_bucket([torch.zeros(0, 4)], 32)[0].shape == (0, 4)
