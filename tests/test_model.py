"""The model's public API on a small randomly initialised network: detect() on any inputs,
save/load, layer regimes, the training forward, config errors."""
import numpy as np
import pytest
import torch

import maskrcnn
from maskrcnn import Config, ConfigError, Detections
from maskrcnn.config import LOSS_NAMES
from maskrcnn.errors import WeightsError


def small_config(**kw):
    base = dict(backbone="resnet18", num_classes=4, image_min_dim=128, image_max_dim=128,
                rpn_anchor_scales=(8, 16, 32, 64, 128), top_down_pyramid_size=32, rpn_conv_channels=32,
                fpn_classif_fc_layers_size=64, mask_head_channels=16, post_nms_rois_inference=200,
                post_nms_rois_training=200, train_rois_per_image=32, detection_min_confidence=0.0,
                images_per_gpu=2)
    base.update(kw)
    return Config(**base)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return maskrcnn.MaskRCNN(small_config()).eval()


def test_detect_takes_numpy_and_tensors_of_any_size(model):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (90, 130, 3), dtype=np.uint8),
            torch.randint(0, 255, (3, 200, 60), dtype=torch.uint8),
            rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)]
    dets = model.detect(imgs)
    assert len(dets) == 3
    for d, (h, w) in zip(dets, [(90, 130), (200, 60), (128, 128)]):
        assert isinstance(d, Detections)
        n = len(d)
        assert n > 0
        assert d.boxes.shape == (n, 4) and d.boxes.dtype == torch.float32 and d.boxes.device.type == "cpu"
        assert d.labels.dtype == torch.int64 and ((d.labels >= 1) & (d.labels < 4)).all()
        assert d.scores.shape == (n,) and (d.scores[:-1] >= d.scores[1:]).all()
        assert d.masks.shape == (n, h, w) and d.masks.dtype == torch.bool
        assert (d.boxes[:, 0] >= 0).all() and (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
        # a mask lies inside its box
        for box, mask in zip(d.boxes.long(), d.masks):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(ys):
                assert xs.min() >= box[0] and xs.max() < box[2] and ys.min() >= box[1] and ys.max() < box[3]
    # the same image alone gives the same result (batching does not change a square-mode image)
    alone = model.detect([imgs[2]])[0]
    torch.testing.assert_close(alone.boxes, dets[2].boxes)


def test_detect_rejects_bad_images_clearly(model):
    from maskrcnn.errors import DataError
    with pytest.raises(DataError, match="uint8"):
        model.detect([np.zeros((10, 10, 3), dtype=np.float32)])
    with pytest.raises(DataError, match=r"\[3, H, W\]"):
        model.detect([torch.zeros(10, 10, 3, dtype=torch.uint8)])


def test_save_load_round_trip(model, tmp_path):
    img = np.random.default_rng(1).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    model.class_names = ["BG", "a", "b", "c"]
    model.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.yaml", "meta.json"}
    again = maskrcnn.MaskRCNN.load(tmp_path / "m")
    assert again.config == model.config and again.class_names == ["BG", "a", "b", "c"]
    a, b = model.detect([img])[0], again.detect([img])[0]
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.masks, b.masks)


def test_load_with_wrong_config_names_layer_and_shapes(model, tmp_path):
    model.save(tmp_path / "m")
    with pytest.raises(WeightsError, match=r"layer box_head\.\S+ has shape \(\d+(, 64)?,?\) in the weights but \(\d+(, 64)?,?\) in the model"):
        maskrcnn.MaskRCNN.load(tmp_path / "m", config=small_config(num_classes=7))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a file")
    (tmp_path / "bad" / "config.yaml").write_text("num_classes: 4\n")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        maskrcnn.MaskRCNN.load(tmp_path / "bad")


def test_layer_regimes():
    m = maskrcnn.MaskRCNN(small_config())
    heads = m.set_trainable("heads")
    assert heads and all(n.split(".")[0] in ("fpn", "rpn", "box_head", "mask_head") for n in heads)
    four = m.set_trainable("4+")
    assert any(n.startswith("backbone.layer3") for n in four) and not any(n.startswith("backbone.layer2") for n in four)
    assert len(m.set_trainable("all")) == len(list(m.parameters()))


def test_training_loss_falls_on_one_batch():
    from maskrcnn.data.shapes import ShapesDataset
    torch.manual_seed(0)
    ds = ShapesDataset(2, seed=3)
    images, targets = zip(*[ds[0], ds[1]])
    m = maskrcnn.MaskRCNN(small_config(train_bn=True)).train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    totals = []
    for _ in range(12):
        losses = m(list(images), list(targets))
        assert set(losses) == set(LOSS_NAMES)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 5.0)
        opt.step()
        totals.append(loss.item())
    assert np.mean(totals[-3:]) < 0.7 * np.mean(totals[:3])


@pytest.mark.parametrize("objectness", ["softmax", "sigmoid"])
def test_training_on_an_image_without_instances(objectness):
    """Nothing to find: every sampled anchor and ROI is a negative, so the classifiers still
    learn (positive class losses) and the box and mask regressions have nothing to fit (exactly
    0), yet stay in the graph (a zero gradient, not None, as DistributedDataParallel needs)."""
    torch.manual_seed(0)
    m = maskrcnn.MaskRCNN(small_config(train_bn=True, rpn_objectness=objectness)).train()
    img = torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)
    target = dict(masks=torch.zeros(0, 128, 128, dtype=torch.bool), labels=torch.zeros(0, dtype=torch.int64))
    losses = m([img], [target])
    assert losses["rpn_bbox_loss"].item() == 0.0
    assert losses["mrcnn_bbox_loss"].item() == 0.0 and losses["mrcnn_mask_loss"].item() == 0.0
    assert losses["rpn_class_loss"].item() > 0 and losses["mrcnn_class_loss"].item() > 0
    sum(losses.values()).backward()
    for name, p in m.named_parameters():
        if name.startswith(("rpn.deltas", "box_head.bbox", "mask_head.logits")):
            assert p.grad is not None and not p.grad.any(), name
        if name.startswith(("rpn.objectness", "box_head.class_logits")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_presets_files_and_errors(tmp_path):
    c = Config()
    assert c.backbone == "resnet101" and c.rpn_anchor_scales == (32, 64, 128, 256, 512)
    assert c.pre_nms_limit == 6000 and c.detection_min_confidence == 0.7 and c.image_resize_mode == "square"
    assert Config.preset("matterport") == c
    tv = Config.preset("torchvision", num_classes=91)
    assert tv.roi_pooling == "roi_align" and tv.num_classes == 91 and tv.box_frame == "pixel"
    for name in ("c.yaml", "c.json"):
        tv.save(tmp_path / name)
        assert Config.load(tmp_path / name) == tv
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        Config.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="roi_pooling='nearest'"):
        Config(roi_pooling="nearest")
    with pytest.raises(ConfigError, match="num_classes"):
        Config(num_classes=0)
    with pytest.raises(ConfigError, match="image_min_dim=500 must be a multiple of 64 for pad64"):
        Config(image_resize_mode="pad64", image_min_dim=500)
    (tmp_path / "bad.yaml").write_text("num_classes: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        Config.load(tmp_path / "bad.yaml")
    assert Config().with_overrides(["num_classes=3", "rpn_anchor_scales=[8,16,32,64,128]"]).num_classes == 3
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        Config().with_overrides(["nope=1"])


def test_convert_cli_matches_fixture(parity_dir, tmp_path):
    """`maskrcnn convert --from matterport` then MaskRCNN.load reproduces Matterport's detect()."""
    from maskrcnn.cli import main
    cfg = Config.from_dict(__import__("json").loads((parity_dir / "config.json").read_text()))
    cfg.save(tmp_path / "parity.yaml")
    assert main(["convert", "--from", "matterport", str(parity_dir / "mask_rcnn_parity_weights.h5"),
                 str(tmp_path / "out"), "--config", str(tmp_path / "parity.yaml")]) == 0
    m = maskrcnn.MaskRCNN.load(tmp_path / "out")
    e = np.load(parity_dir / "expected_image2.npz")
    d = m.detect([e["image"]])[0]
    assert sorted(map(tuple, d.boxes[:, [1, 0, 3, 2]].int().tolist())) == sorted(map(tuple, e["rois"].tolist()))


def test_convert_cli_errors(tmp_path, capsys):
    from maskrcnn.cli import main
    assert main(["convert", "--from", "matterport", str(tmp_path / "missing.h5"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing.h5" in err[0]
    (tmp_path / "junk.h5").write_bytes(b"junk")
    assert main(["convert", "--from", "matterport", str(tmp_path / "junk.h5"), str(tmp_path / "o")]) == 2
    assert "not a readable HDF5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_matterport_import_names_the_extra_when_h5py_is_missing(tmp_path, capsys, monkeypatch):
    from maskrcnn.cli import main
    monkeypatch.setitem(__import__("sys").modules, "h5py", None)  # `import h5py` raises ImportError
    (tmp_path / "w.h5").write_bytes(b"")
    assert main(["convert", "--from", "matterport", str(tmp_path / "w.h5"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'w.h5'}: reading Matterport .h5 weights needs h5py, which is not "
                   "installed: pip install 'maskrcnn[matterport]'"]
