"""COCO evaluation (pycocotools) and Matterport-style VOC AP on known numbers."""
import numpy as np
import pytest
import torch
from data_samples import box_mask, coco_sample

from maskrcnn import Detections
from maskrcnn.data import TorchDataset, read_coco
from maskrcnn.evaluation import CocoEvaluator, compute_ap, compute_matches, evaluate_detections
from maskrcnn.evaluation.voc import compute_overlaps_masks


def _as_detections(target, scores=None, keep_crowd=False) -> Detections:
    keep = torch.ones_like(target["iscrowd"]) if keep_crowd else ~target["iscrowd"]
    n = int(keep.sum())
    scores = torch.linspace(0.9, 0.5, n) if scores is None else torch.as_tensor(scores, dtype=torch.float32)
    return Detections(target["boxes"][keep], target["labels"][keep], scores, target["masks"][keep])


def _shift_first(det: Detections, dx: int) -> Detections:
    """``det`` with its first instance moved ``dx`` pixels right."""
    boxes, masks = det.boxes.clone(), det.masks.clone()
    boxes[0] += torch.tensor([dx, 0, dx, 0.0])
    masks[0] = torch.roll(masks[0], dx, dims=1)
    return Detections(boxes, det.labels, det.scores, masks)


@pytest.fixture
def coco_dataset(tmp_path):
    return read_coco(*coco_sample(tmp_path))


def test_ground_truth_as_predictions_scores_one(coco_dataset):
    targets = [t for _, t in TorchDataset(coco_dataset)]
    metrics = evaluate_detections(coco_dataset, [_as_detections(t) for t in targets])
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(1.0)
        assert metrics[iou_type]["APs"] == pytest.approx(1.0)  # all instances are < 32x32 pixels
        assert metrics[iou_type]["APm"] is None and metrics[iou_type]["APl"] is None
    assert metrics["voc_mAP50"] == pytest.approx(1.0)
    assert metrics["per_class"]["cat"] == {"instances": 2, "bbox": pytest.approx(1.0), "segm": pytest.approx(1.0)}
    assert metrics["per_class"]["bird"] == {"instances": 0, "bbox": None, "segm": None}
    assert metrics["num_images"] == 3 and metrics["num_detections"] == 3
    assert metrics["pr_curve"]["segm"][:101] == pytest.approx([1.0] * 101)


def test_detection_on_a_crowd_region_is_ignored(coco_dataset):
    targets = [t for _, t in TorchDataset(coco_dataset)]
    metrics = evaluate_detections(coco_dataset, [_as_detections(t, keep_crowd=True) for t in targets])
    assert metrics["segm"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_perturbed_predictions_score_lower(coco_dataset):
    targets = [t for _, t in TorchDataset(coco_dataset)]
    exact = [_as_detections(t) for t in targets]
    # The 20x20 cat polygon moved 6 pixels right: IoU 14/26 = 0.54 passes 0.5 but not 0.75.
    shifted = [_shift_first(exact[0], 6)] + exact[1:]
    metrics = evaluate_detections(coco_dataset, shifted)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP75"] < 1.0
        assert metrics[iou_type]["AP"] < 1.0
    none = evaluate_detections(coco_dataset, [Detections.empty(*t["masks"].shape[1:]) for t in targets])
    assert none["bbox"]["AP"] == 0.0 and none["segm"]["AP"] == 0.0 and none["voc_mAP50"] == 0.0


def test_targets_list_and_default_class_names():
    masks = torch.from_numpy(np.stack([box_mask(50, 50, 0, 10, 0, 10), box_mask(50, 50, 20, 40, 20, 40)]))
    target = {"boxes": torch.tensor([[0, 0, 10, 10], [20, 20, 40, 40.0]]), "labels": torch.tensor([1, 2]),
              "masks": masks, "iscrowd": torch.tensor([False, False])}
    # A confident false positive (class 2 on the first object) ranks above the true class-2 hit.
    fp = Detections(torch.tensor([[0, 0, 10, 10.0], [20, 20, 40, 40], [0, 0, 10, 10]]), torch.tensor([1, 2, 2]),
                    torch.tensor([0.9, 0.5, 0.95]), torch.cat([masks, masks[:1]]))
    metrics = evaluate_detections([target], [fp])
    assert list(metrics["per_class"]) == ["class 1", "class 2"]
    assert metrics["per_class"]["class 1"]["segm"] == pytest.approx(1.0)
    assert metrics["per_class"]["class 2"]["segm"] == pytest.approx(0.5, abs=0.01)  # precision 1/2 at recall 1
    with pytest.raises(ValueError, match="2 predictions for 1"):
        evaluate_detections([target], [fp, fp])


def test_repeated_class_names_kept_apart():
    assert CocoEvaluator(["BG", "car", "car", "bus"]).class_names == ["BG", "car (1)", "car (2)", "bus"]


def test_evaluator_checks_sizes():
    evaluator = CocoEvaluator(["BG", "a"])
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 8, 8, dtype=torch.bool), "iscrowd": torch.zeros(0, dtype=torch.bool)}
    det = Detections(torch.tensor([[0, 0, 2, 2.0]]), torch.tensor([1]), torch.tensor([0.5]),
                     torch.ones(1, 9, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="detections are"):
        evaluator.add(target, det)


# ---- Matterport's VOC AP -------------------------------------------------------------------------
def test_mask_overlaps_known_values():
    a = np.stack([box_mask(10, 10, 0, 4, 0, 4)])                               # 16 pixels
    b = np.stack([box_mask(10, 10, 0, 4, 2, 6), box_mask(10, 10, 6, 8, 6, 8)])  # overlap 8, union 24
    np.testing.assert_allclose(compute_overlaps_masks(a, b), [[8 / 24, 0.0]])
    assert compute_overlaps_masks(a[:0], b).shape == (0, 2)


def test_compute_ap_hand_computed():
    gt = np.stack([box_mask(20, 20, 0, 5, 0, 5), box_mask(20, 20, 10, 15, 10, 15)])
    miss = box_mask(20, 20, 0, 3, 15, 18)
    pred = np.stack([gt[0], miss, gt[1]])
    # In score order: hit, miss, hit -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # Interpolated: AP = 0.5 * 1 + 0.5 * 2/3.
    ap, precisions, recalls, overlaps = compute_ap(np.array([1, 1]), gt, np.array([1, 1, 1]),
                                                   np.array([0.9, 0.8, 0.7]), pred)
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    np.testing.assert_allclose(recalls, [0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(precisions, [1, 1, 2 / 3, 2 / 3, 0])
    assert overlaps.shape == (3, 2)


def test_compute_matches_respects_class_and_order():
    gt = np.stack([box_mask(10, 10, 0, 5, 0, 5)])
    pred = np.stack([gt[0], gt[0]])
    # The higher-scored prediction (index 1, wrong class) comes first and does not match.
    gt_match, pred_match, _ = compute_matches(np.array([2]), gt, np.array([2, 3]), np.array([0.1, 0.9]), pred)
    assert gt_match.tolist() == [1] and pred_match.tolist() == [-1, 0]
    ap, *_ = compute_ap(np.zeros(0, int), gt[:0], np.zeros(0, int), np.zeros(0), pred[:0])
    assert np.isnan(ap)


# ---- Equality with pycocotools on the original annotation file ------------------------------------
def _polygon_sample(root, num_images: int, seed: int):
    """A COCO file whose polygon areas differ from their pixel counts (by factors 0.3..6, so
    instances change size range), category ids with gaps (1, 3, 7), a crowd RLE now and then,
    and a results file with hits, near misses, wrong classes and false positives."""
    import json

    from PIL import Image
    from pycocotools import mask as mask_utils

    from maskrcnn.data.segmentation import ellipse_polygon, segmentation_to_mask

    rng = np.random.default_rng(seed)
    h, w = 96, 128
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, annotations, results = [], [], []

    def rle(mask):
        r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}

    def shape():
        cx, cy = rng.uniform(10, w - 10), rng.uniform(10, h - 10)
        rx, ry = rng.uniform(3, 40), rng.uniform(3, 30)
        return ellipse_polygon(cx, cy, rx, ry, rng.uniform(0, 3), vertices=12)

    def box(mask):
        ys, xs = np.nonzero(mask)
        return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]

    for k in range(num_images):
        image_id = 100 + 3 * k
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(images_dir / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for _ in range(rng.integers(1, 6)):
            ring = shape()
            mask = segmentation_to_mask([ring], h, w)
            if not mask.any():
                continue
            crowd = rng.random() < 0.1
            category = int(rng.choice([1, 3, 7]))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "iscrowd": int(crowd), "bbox": box(mask),
                                "area": float(mask.sum() * rng.uniform(0.3, 6.0)),
                                "segmentation": rle(mask) if crowd else [ring]})
            if rng.random() < 0.8:
                shifted = np.roll(mask, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
                if shifted.any():
                    wrong = rng.random() < 0.1
                    results.append({"image_id": image_id, "category_id": 3 if wrong else category,
                                    "bbox": box(shifted), "score": float(rng.uniform(0.05, 1.0)),
                                    "segmentation": rle(shifted)})
        for _ in range(rng.integers(0, 3)):
            mask = segmentation_to_mask([shape()], h, w)
            if mask.any():
                results.append({"image_id": image_id, "category_id": int(rng.choice([1, 3, 7])), "bbox": box(mask),
                                "score": float(rng.uniform(0.05, 1.0)), "segmentation": rle(mask)})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "disc"}, {"id": 3, "name": "blob"}, {"id": 7, "name": "ring"}]}
    (root / "ann.json").write_text(json.dumps(data))
    (root / "results.json").write_text(json.dumps(results))
    return root / "ann.json", images_dir, root / "results.json"


def _pycocotools_stats(ann, results) -> dict:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        dt = gt.loadRes(str(results))
        stats = {}
        for iou_type in ("bbox", "segm"):
            e = COCOeval(gt, dt, iou_type)
            e.evaluate()
            e.accumulate()
            e.summarize()
            stats[iou_type] = [float(v) for v in e.stats]
    return stats


@pytest.mark.parametrize("num_images", [6, 50])
def test_evaluate_equals_pycocotools_on_the_original_file(tmp_path, num_images, capsys):
    import json

    from maskrcnn.cli import main
    from maskrcnn.evaluation.coco_eval import STAT_NAMES

    ann, images, results = _polygon_sample(tmp_path, num_images, seed=num_images)
    out = tmp_path / "eval" / "metrics.json"
    assert main(["evaluate", "--coco", str(ann), "--images", str(images), "--results", str(results),
                 "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    written = tmp_path / "eval" / "metrics_results.json"
    assert json.loads(written.read_text()) == json.loads(results.read_text())
    expected = _pycocotools_stats(ann, written)
    for iou_type in ("bbox", "segm"):
        ours = [-1.0 if metrics[iou_type][n] is None else metrics[iou_type][n] for n in STAT_NAMES]
        assert ours == expected[iou_type], iou_type  # exactly, all 12
    # the areas in the file matter: scoring rasterised ground truth gives other size-range numbers
    assert metrics["segm"]["APs"] is not None and 0.0 < metrics["segm"]["AP"] < 1.0
    printed = capsys.readouterr().out
    assert "AR100" in printed and f"{metrics['segm']['AR100']:.3f}" in printed


# ---- Matterport's result dict and dataset ids in results ----------------------------------------
def test_detections_as_matterport_dict():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4:6, 0:1] = True
    det = Detections(torch.tensor([[2.0, 1, 5, 3], [0, 4, 1, 6]]), torch.tensor([3, 1]), torch.tensor([0.9, 0.4]),
                     masks)
    r = det.to_matterport()
    assert r["rois"].dtype == np.int32 and r["rois"].tolist() == [[1, 2, 3, 5], [4, 0, 6, 1]]  # y1, x1, y2, x2
    assert r["class_ids"].dtype == np.int32 and r["class_ids"].tolist() == [3, 1]
    assert r["scores"].dtype == np.float32 and r["masks"].dtype == bool and r["masks"].shape == (6, 8, 2)
    assert np.array_equal(r["masks"][:, :, 1], masks[1].numpy())
    assert np.array_equal(det["rois"], r["rois"]) and set(det.keys()) == set(r)
    empty = Detections.empty(6, 8).to_matterport()
    assert empty["rois"].shape == (0, 4) and empty["masks"].shape == (6, 8, 0)
    with pytest.raises(KeyError, match="rois"):
        det["boxes"]


def test_model_keeps_category_ids_and_results_use_them(tmp_path):
    from test_cli_data import tiny_config

    from maskrcnn import MaskRCNN

    model = MaskRCNN(tiny_config(4), ["BG", "disc", "blob", "ring"], [0, 1, 3, 7])
    model.save(tmp_path / "m")
    again = MaskRCNN.load(tmp_path / "m")
    assert again.category_ids == [0, 1, 3, 7] and again.class_names == ["BG", "disc", "blob", "ring"]
    det = Detections(torch.tensor([[0, 0, 2, 2.0]]), torch.tensor([3]), torch.tensor([0.5]),
                     torch.ones(1, 4, 4, dtype=torch.bool))
    assert det.to_coco(42, again.category_ids)[0]["category_id"] == 7


def test_torchvision_coco_weights_carry_the_91_id_table(monkeypatch, tmp_path):
    """`convert --from torchvision coco`: class id = COCO category id, "N/A" where COCO has none
    (the download is replaced by random weights of the same shapes)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    import maskrcnn.weights.torchvision as tv_weights
    from maskrcnn import MaskRCNN
    from maskrcnn.cli import main

    state = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    monkeypatch.setattr(tv_weights, "read_torchvision",
                        lambda source: (state, tv_weights.coco_class_names()) if source == "coco" else None)
    assert main(["convert", "--from", "torchvision", "coco", str(tmp_path / "tv")]) == 0
    model = MaskRCNN.load(tmp_path / "tv")
    assert model.category_ids == list(range(91))
    names = model.class_names
    assert names[1] == "person" and names[12] == "N/A" and names[13] == "stop sign" and names[90] == "toothbrush"
    assert sum(n == "N/A" for n in names) == 10  # COCO's 80 categories use 80 of the ids 1..90


def test_encode_rle_is_pycocotools_on_the_fortran_array():
    from pycocotools import mask as mask_utils

    from maskrcnn.structures import encode_rle
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 37, 53, generator=g) < 0.3
    masks[1] = False
    masks[2] = True
    expected = mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8)))
    got = encode_rle(masks)
    assert [r["counts"].encode() for r in got] == [r["counts"] for r in expected]
    assert all(r["size"] == [37, 53] for r in got)
    assert encode_rle(masks.numpy()) == got and encode_rle(torch.zeros(0, 37, 53, dtype=torch.bool)) == []
