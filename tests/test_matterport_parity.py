"""Parity with the original Keras Matterport Mask R-CNN, stage by stage and end to end, on the
fixture in ../shared/fixtures/matterport-parity (weights, 3 images, every intermediate output).

Stages are teacher-forced (fed the recorded inputs) as the fixture's README advises, so a
near-tie reordered by float noise upstream cannot hide a real difference downstream."""
import json

import numpy as np
import pytest
import torch

import maskrcnn
from maskrcnn import Config
from maskrcnn import boxes as B
from maskrcnn.model.detection import detect_boxes, unmold
from maskrcnn.model.preprocess import mold_images, resize_bilinear_uint8, resize_matterport
from maskrcnn.model.proposals import propose_global


def xy(a):
    """Matterport's (y1, x1, y2, x2) / (dy, dx, dh, dw) columns <-> ours."""
    return a[..., [1, 0, 3, 2]]


@pytest.fixture(scope="module")
def cfg(parity_dir):
    raw = json.loads((parity_dir / "config.json").read_text())
    # The fixture's config.json is Matterport's Config.display() dump: every key is ours too.
    return Config.from_dict(raw)


@pytest.fixture(scope="module")
def model(parity_dir, cfg):
    return maskrcnn.MaskRCNN.from_matterport(parity_dir / "mask_rcnn_parity_weights.h5", cfg)


@pytest.fixture(scope="module", params=[1, 2, 3])
def case(request, parity_dir, cfg):
    e = dict(np.load(parity_dir / f"expected_image{request.param}.npz"))
    batch, metas = mold_images([e["image"]], cfg, "cpu")
    return request.param, e, batch, metas


def test_config_json_round_trips(cfg):
    assert cfg.backbone == "resnet50" and cfg.num_classes == 4 and cfg.image_shape == (128, 128, 3)
    assert cfg.detection_min_confidence == 0.0 and cfg.rpn_anchor_scales == (8, 16, 32, 64, 128)


def test_molding_and_anchors_exact(case, model):
    k, e, batch, metas = case
    resized, _, _ = resize_matterport(e["image"], "square", 128, 128)
    np.testing.assert_array_equal(resized, e["resized_image"])
    np.testing.assert_array_equal(batch[0].permute(1, 2, 0).numpy(), e["molded_images"][0].astype(np.float32))
    assert metas[0].window == tuple(e["windows"][0])
    assert metas[0].scale == pytest.approx(float(e["resize_scale"]))
    anchors, _ = model.anchors((128, 128), "cpu")
    np.testing.assert_array_equal(xy(anchors.numpy()), e["anchors"])


def test_resize_is_skimage_bit_for_bit():
    """Our resize against the skimage call Matterport makes, on random images of many sizes and
    scales (down, up, to 1 pixel), flat regions (exact sums that an ulp would truncate) and
    images whose minimum is above 0 (skimage's clip).  skimage is not a dependency: runs where
    it is installed."""
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(0)
    for i in range(150):
        h, w = (int(v) for v in rng.integers(1, 160, 2))
        scale = float(rng.choice([rng.uniform(0.1, 4.0), 128 / max(h, w), 256 / min(h, w)]))
        scale = min(scale, 320 / max(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        low = int(rng.integers(0, 100))
        image = rng.integers(low, 256, (h, w, 3), dtype=np.uint8)
        if i % 3 == 0:
            image = np.repeat(np.repeat(image[::4, ::4], 4, 0), 4, 1)[:h, :w]
            image = np.pad(image, [(0, h - image.shape[0]), (0, w - image.shape[1]), (0, 0)], mode="edge")
        expected = transform.resize(image, size, order=1, mode="constant", cval=0, clip=True,
                                    preserve_range=True, anti_aliasing=False).astype(np.uint8)
        np.testing.assert_array_equal(resize_bilinear_uint8(image, *size), expected, err_msg=f"{(h, w)} -> {size}")


def test_backbone_and_fpn_features(parity_dir, cfg, model):
    f = np.load(parity_dir / "features_image1.npz")
    e = np.load(parity_dir / "expected_image1.npz")
    batch, _ = mold_images([e["image"]], cfg, "cpu")
    with torch.no_grad():
        c = model.backbone(batch)
        p = model.fpn(c)
    names = ["res2c_out", "res3d_out", "res4f_out", "res5c_out", "fpn_p2", "fpn_p3", "fpn_p4", "fpn_p5", "fpn_p6"]
    for t, name in zip(c + p, names):
        np.testing.assert_allclose(t.permute(0, 2, 3, 1).numpy(), f[name], atol=1e-3, rtol=0, err_msg=name)


def test_rpn_outputs(case, model):
    _, e, batch, _ = case
    with torch.no_grad():
        logits, deltas = model.rpn(model.features(batch))
    np.testing.assert_allclose(logits.numpy(), e["rpn_class_logits"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), e["rpn_class"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(xy(deltas.numpy()), e["rpn_bbox"], atol=1e-3, rtol=0)


def test_proposal_layer_teacher_forced(case, cfg):
    _, e, _, _ = case
    (boxes, _), = propose_global(torch.from_numpy(e["rpn_class"][:1, :, 1]), torch.from_numpy(xy(e["rpn_bbox"][:1])),
                                 torch.from_numpy(xy(e["anchors"])), torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
                                 cfg.pre_nms_limit, cfg.post_nms_rois_inference, cfg.rpn_nms_threshold,
                                 B.std_xy(cfg.rpn_bbox_std_dev))
    assert boxes.shape == (1000, 4)
    # Row for row, including image 3's exactly tied anchors (lower index first).
    np.testing.assert_allclose(xy(boxes.numpy()), e["rpn_rois"][0], atol=5e-7, rtol=0)


def test_heads_teacher_forced(case, model):
    _, e, batch, _ = case
    rois = torch.from_numpy(xy(e["rpn_rois"][0]))
    with torch.no_grad():
        features = model.features(batch)
        logits, deltas = model.classify(features, [rois], (128, 128))
        dets = torch.from_numpy(xy(e["detections"][0][:, :4]))
        masks = torch.sigmoid(model.mask_logits(features, [dets], (128, 128)))
    np.testing.assert_allclose(logits.numpy(), e["mrcnn_class_logits"][0], atol=1e-3, rtol=0)
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), e["mrcnn_class"][0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(xy(deltas.numpy()), e["mrcnn_bbox"][0], atol=1e-3, rtol=0)
    np.testing.assert_allclose(masks.permute(0, 2, 3, 1).numpy(), e["mrcnn_mask"][0], atol=1e-3, rtol=0)


def test_detection_layer_teacher_forced(case, model, cfg):
    _, e, _, metas = case
    det = e["detections"][0]
    n = int((det[:, 4] > 0).sum())
    window = model.frame_window(metas[0], (128, 128), "cpu")
    boxes, class_ids, scores = detect_boxes(
        torch.from_numpy(xy(e["rpn_rois"][0])), torch.log(torch.from_numpy(e["mrcnn_class"][0])),
        torch.from_numpy(xy(e["mrcnn_bbox"][0])), window, B.std_xy(cfg.bbox_std_dev), "argmax",
        cfg.detection_min_confidence, cfg.detection_nms_threshold, cfg.detection_max_instances)
    assert len(boxes) == n == {1: 55, 2: 40, 3: 100}[case[0]]
    np.testing.assert_allclose(xy(boxes.numpy()), det[:n, :4], atol=2e-7, rtol=0)
    np.testing.assert_array_equal(class_ids.numpy(), det[:n, 4])
    np.testing.assert_allclose(scores.numpy(), det[:n, 5], atol=2e-7, rtol=0)


def test_unmold_teacher_forced(case, model):
    _, e, _, metas = case
    det = e["detections"][0]
    n = int((det[:, 4] > 0).sum())
    cls = det[:n, 4].astype(int)
    raw = dict(boxes=torch.from_numpy(xy(det[:n, :4])), class_ids=torch.from_numpy(cls),
               scores=torch.from_numpy(det[:n, 5]),
               mask_probs=torch.from_numpy(e["mrcnn_mask"][0][np.arange(n), :, :, cls]))
    cfg = model.config
    out = unmold(raw, metas[0], (128, 128), cfg.box_frame, cfg.mask_paste, cfg.mask_threshold)
    np.testing.assert_array_equal(xy(out.boxes.numpy()), e["rois"])
    np.testing.assert_array_equal(out.labels.numpy(), e["class_ids"])
    np.testing.assert_array_equal(out.masks.numpy(), e["masks"].transpose(2, 0, 1).astype(bool))


def test_detect_end_to_end(case, model):
    """Final detections matched one to one: same boxes, class ids, masks; scores to 1e-4."""
    _, e, _, _ = case
    d = model.detect([e["image"]])[0]
    assert len(d) == len(e["class_ids"])
    ours = {tuple(b) + (int(c),): i for i, (b, c) in enumerate(zip(xy(d.boxes.numpy()).astype(int), d.labels.numpy()))}
    theirs = [tuple(b) + (int(c),) for b, c in zip(e["rois"], e["class_ids"])]
    assert set(ours) == set(theirs)
    order = [ours[t] for t in theirs]
    np.testing.assert_allclose(d.scores.numpy()[order], e["scores"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(d.masks.numpy()[order], e["masks"].transpose(2, 0, 1).astype(bool))
    assert d.boxes.dtype == torch.float32 and d.labels.dtype == torch.int64 and d.masks.dtype == torch.bool
