"""ONNX export: the exported graph on ONNX Runtime gives the eager model's detections (same
labels, boxes within 0.01 px, scores within 1e-4, masks differing in at most 1e-4 of the
pixels), for both presets, two molded sizes per model, and an image without detections.

Each model is exported once per module."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import maskrcnn  # noqa: E402
from maskrcnn import Config  # noqa: E402
from maskrcnn.cli import main  # noqa: E402
from maskrcnn.errors import MaskRCNNError  # noqa: E402
from maskrcnn.export import OnnxMaskRCNN, export_onnx  # noqa: E402
from maskrcnn.export.graph import DetectionGraph  # noqa: E402
from maskrcnn.model.detection import unmold  # noqa: E402
from maskrcnn.model.preprocess import mold_images  # noqa: E402

CONFIGS = {
    # torchvision numerics: pytorch ResNet with folded BN, sigmoid RPN per level, roi_align,
    # all-classes detection; molded sizes 320x448 and 480x320
    "torchvision": Config.preset("torchvision", backbone="resnet18", num_classes=4, image_min_dim=320,
                                 image_max_dim=512),
    # Matterport numerics: caffe ResNet, softmax RPN, crop_and_resize, argmax detection; pad64
    # molds to 128x256 and 192x128
    "matterport": Config(backbone="resnet18", num_classes=4, image_resize_mode="pad64", image_min_dim=128,
                         image_max_dim=256, rpn_anchor_scales=(8, 16, 32, 64, 128), detection_min_confidence=0.0),
}


def images(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 240, 320), generator=g, dtype=torch.uint8),
            torch.randint(0, 256, (3, 150, 110), generator=g, dtype=torch.uint8)]


def assert_same(expected, actual, box_tol: float = 1e-2, score_tol: float = 1e-4) -> None:
    """Two Detections of one image: same count and labels, boxes and scores within the
    tolerances, masks differing in at most 1e-4 of their pixels."""
    assert len(actual) == len(expected)
    assert torch.equal(actual.labels, expected.labels)
    if len(expected):
        assert (actual.boxes - expected.boxes).abs().max() <= box_tol
        assert (actual.scores - expected.scores).abs().max() <= score_tol
    assert (actual.masks != expected.masks).sum() <= 1e-4 * expected.masks.numel()
    assert actual.masks.shape == expected.masks.shape


# An export costs ~50 s of CPU (torch.export reasons about every size symbolically): the default
# suite exports the torchvision preset; the Matterport preset and the fixture run with -m slow.
@pytest.fixture(scope="module", params=["torchvision", pytest.param("matterport", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    """(eager model, path of its ONNX file written by `maskrcnn export`)."""
    torch.manual_seed(0)
    config = CONFIGS[request.param]
    model = maskrcnn.MaskRCNN(config, ["BG"] + [f"c{i}" for i in range(1, config.num_classes)]).eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save(folder / "model")
    path = folder / "model.onnx"
    assert main(["export", "--weights", str(folder / "model"), "--format", "onnx", "--out", str(path)]) == 0
    return model, path


def test_onnx_detections_equal_eager(exported):
    model, path = exported
    onnx_model = maskrcnn.load(path)
    assert isinstance(onnx_model, OnnxMaskRCNN)
    assert onnx_model.config == model.config and onnx_model.class_names == model.class_names
    imgs = images()
    sizes = set()
    for image in imgs:
        expected = model.detect([image])[0]
        actual = onnx_model.detect(image)[0]  # one image, as MaskRCNN.detect takes it
        assert len(expected) > 0
        assert_same(expected, actual)
        sizes.add(tuple(mold_images([image], model.config, "cpu")[0].shape[-2:]))
    assert len(sizes) == 2  # two molded sizes through one graph


def test_onnx_metadata_and_opset(exported):
    import onnx
    model, path = exported
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert Config.from_dict(json.loads(meta["maskrcnn.config"])) == model.config
    assert json.loads(meta["maskrcnn.class_names"]) == model.class_names
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[:2]] == [1, 3] and all(d.dim_param for d in dims[2:])


def test_zero_detections(exported):
    """A window of zero area: every box is clipped to a point.  Matterport keeps such boxes
    (no minimum size), torchvision drops them; either way ONNX Runtime gives eager's answer."""
    model, path = exported
    onnx_model = OnnxMaskRCNN.load(path)
    batch, metas = mold_images([images()[0]], model.config, "cpu")
    window = (0, 0, 0, 0)
    raw = onnx_model.run_graph(batch, window)
    with torch.no_grad():
        expected = DetectionGraph(model)(batch, torch.zeros(4))
    assert raw["boxes"].shape[0] == expected[0].shape[0]
    if model.config.detection_min_size > 0:
        assert raw["boxes"].shape == (0, 4) and raw["mask_probs"].shape[0] == 0
        cfg = model.config
        det = unmold(raw, metas[0], tuple(batch.shape[-2:]), cfg.box_frame, cfg.mask_paste, cfg.mask_threshold)
        assert len(det) == 0 and det.masks.shape == (0, 240, 320)


def test_detect_cli_runs_the_onnx_file(exported, tmp_path, capsys):
    from PIL import Image
    model, path = exported
    image = images()[0]
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["detect", "--weights", str(path), str(tmp_path / "a.png"), "--out", str(out), "--no-overlays"]) == 0
    records = json.loads((out / "results.json").read_text())
    expected = model.detect([image])[0].to_coco(0)
    assert [r["category_id"] for r in records] == [r["category_id"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in records], [r["score"] for r in expected], atol=1e-4)
    np.testing.assert_allclose([r["bbox"] for r in records], [r["bbox"] for r in expected], atol=2e-2)
    assert main(["detect", "--weights", str(path), "--set", "detection_min_confidence=0.5",
                 str(tmp_path / "a.png")]) == 2
    assert "config is fixed" in capsys.readouterr().err


def test_evaluate_cli_onnx_equals_eager(exported, tmp_path):
    from data_samples import coco_sample
    _, path = exported
    ann, folder = coco_sample(tmp_path)
    metrics = {}
    for name, weights in (("eager", path.parent / "model"), ("onnx", path)):
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "--weights", str(weights), "--coco", str(ann), "--images", str(folder),
                     "--limit", "1", "--out", str(out)]) == 0
        metrics[name] = json.loads(out.read_text())
    for kind in ("bbox", "segm"):
        for key, value in metrics["eager"][kind].items():
            assert metrics["onnx"][kind][key] == pytest.approx(value, abs=1e-6), (kind, key)


def test_missing_onnxruntime_is_one_error_line(monkeypatch, tmp_path, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("onnx") else real(name, *a))
    with pytest.raises(MaskRCNNError, match=r"pip install 'maskrcnn\[onnx\]'"):
        OnnxMaskRCNN(tmp_path / "m.onnx")
    model = maskrcnn.MaskRCNN(CONFIGS["matterport"])
    model.save(tmp_path / "model")
    assert main(["export", "--weights", str(tmp_path / "model"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "maskrcnn[onnx]" in err[0]


def test_export_refuses_old_opset(tmp_path):
    with pytest.raises(MaskRCNNError, match="opset 16"):
        export_onnx(maskrcnn.MaskRCNN(CONFIGS["matterport"]), tmp_path / "m.onnx", opset=16)


@pytest.mark.slow
def test_matterport_fixture_exported(parity_dir, tmp_path):
    """The parity fixture's model (ResNet-50, crop_and_resize) exported: ONNX Runtime gives
    the eager detections, and the fixture's own (the Keras original's) detections."""
    cfg = Config.from_dict(json.loads((parity_dir / "config.json").read_text()))
    model = maskrcnn.MaskRCNN.from_matterport(parity_dir / "mask_rcnn_parity_weights.h5", cfg)
    onnx_model = OnnxMaskRCNN.load(export_onnx(model, tmp_path / "parity.onnx"))
    for k in (1, 2, 3):
        e = dict(np.load(parity_dir / f"expected_image{k}.npz"))
        expected = model.detect([e["image"]])[0]
        actual = onnx_model.detect([e["image"]])[0]
        assert_same(expected, actual)
        assert sorted(actual.labels.tolist()) == sorted(e["class_ids"].tolist())

