"""check_dataset finds every planted problem and names its file and annotation."""
import json

import numpy as np
import pytest
from data_samples import (box_mask, coco_sample, labelme_file, labelme_sample, labelme_shape,
                          planted_coco_sample, via_polygon, via_region, via_sample, write_json)
from PIL import Image

from maskrcnn.data import Dataset, TorchDataset, check_dataset, read_coco
from maskrcnn.data.checks import check_loaded
from maskrcnn.errors import DataError


def test_every_planted_coco_problem_reported(tmp_path):
    ann_path, images = planted_coco_sample(tmp_path)
    report = check_dataset(coco=ann_path, images=images)
    lines = [str(p) for p in report.problems]
    ok = str(images / "ok.png")
    expected = [
        f"{ok}: annotation 201: polygon outside the image: x 50..80, y 5..25 in a 60x40 image; clipped to the image",
        f"{ok}: annotation 202: degenerate polygon: 2 points (needs at least 3)",
        f"{ok}: annotation 203: degenerate polygon: zero area",
        f"{ok}: annotation 204: empty mask (no pixel inside the image)",
        f"{ok}: annotation 205: unknown category id 99",
        f"{ann_path}: annotation 206: duplicate annotation id (both are used)",
        f"{ann_path}: annotation 207: refers to unknown image id 1234",
        f"{ok}: annotation 208: RLE mask size 10x10 (width x height) does not match the image 60x40",
        f"{ok}: annotation 209: empty mask (no pixel inside the image): polygon at x 100..120, y 100..120 in a "
        "60x40 image",
        f"{images / 'dup.png'}: image 1: duplicate image id (also ok.png)",
        f"{ann_path}: category 3: duplicate category id (names 'dog' and 'dog again')",
        f"{images / 'missing.png'}: no such image file",
        f"{images / 'corrupt.png'}: not an image file, or an image format PIL cannot read",
        f"{images / 'wrong_size.png'}: annotations say the image is 50x50 (width x height) but it is 60x40",
    ]
    for line in expected:
        assert line in lines, f"not reported: {line}\nreported:\n" + "\n".join(lines)
    assert len(lines) == len(expected)
    assert not report.ok
    warnings = [str(p) for p in report.warnings]
    assert warnings == [expected[5], expected[0]]  # 206 (read first), 201: both used
    # Used: 201 (clipped), 206 twice; on ok.png 202, 203, 204, 208, 209 are unusable, 205 has an
    # unknown category; 207 refers to no image; 210 is on the missing image.
    assert report.class_counts == {"cat": 3, "dog": 1}
    assert report.used == 3 and report.clipped == 1
    assert dict(report.skipped) == {"unusable segmentation": 3, "no pixel inside the image": 2,
                                    "unknown category": 1, "rejected while reading": 1, "image unreadable": 1}
    assert report.bad_image_ids == [1, 2, 3]  # missing.png, corrupt.png, wrong_size.png
    text = report.format()
    assert f"{len(expected) - 2} errors:" in text and "2 warnings:" in text and "annotation 203" in text
    assert text.endswith("3 annotations used (1 clipped to the image), 8 left out (3 unusable "
                         "segmentation, 2 no pixel inside the image, 1 image unreadable, 1 rejected while reading, "
                         "1 unknown category)")


def test_load_mask_skips_what_the_checks_report(tmp_path):
    ds = read_coco(*planted_coco_sample(tmp_path))
    masks, class_ids = ds.load_mask(0)
    # ok.png has 201..209 minus 205 (unknown category) and 208 (RLE of another size); 202, 203,
    # 204 and 209 rasterise to nothing, so the torch view drops them too.
    assert masks.shape == (40, 60, 7) and class_ids.tolist() == [1, 1, 1, 1, 1, 2, 1]  # 206 twice: cat, dog
    _, target = TorchDataset(ds)[0]
    assert target["boxes"].tolist() == [[50, 5, 60, 25], [10, 5, 30, 25], [10, 5, 30, 25]]


def test_clean_coco_has_no_problems(tmp_path):
    report = check_dataset(coco=coco_sample(tmp_path)[0], images=tmp_path / "images")
    assert report.ok and report.problems == []
    assert report.num_images == 3 and report.num_annotations == 4 and report.crowd_count == 1
    assert report.images_without_annotations == 1
    assert report.class_counts == {"cat": 2, "dog": 2, "bird": 0}
    assert "no problems found" in report.format()


def test_labelme_planted_problems(tmp_path):
    folder = labelme_sample(tmp_path)
    write_json(folder / "bad.json", labelme_file("street.png", 32, 48, [
        labelme_shape("person", [[1, 1], [4, 4]]),                          # 2-point polygon
        labelme_shape("car", [[40, 20], [60, 40]], "rectangle"),            # beyond 48x32
        labelme_shape("car", [[1, 1], [9, 9]], "line"),                     # not a region
    ]))
    write_json(folder / "gone.json", labelme_file("gone.png", 10, 10, [labelme_shape("car", [[1, 1], [5, 1], [5, 5]])]))
    report = check_dataset(labelme=folder)
    lines = [str(p) for p in report.problems]
    bad = folder / "bad.json"
    expected = [
        f"{bad}: shape 2 ('car'): shape type 'line' is not a region (use polygon, rectangle, circle, "
        "oriented_rectangle, mask); skipped",
        f"{folder / 'street.json'}: annotates street.png, which bad.json annotates too",
        f"{bad}: shape 0 ('person'): degenerate polygon: 2 points (needs at least 3)",
        f"{bad}: shape 1 ('car'): polygon outside the image: x 40..60, y 20..40 in a 48x32 image; clipped to the image",
        f"{(folder / 'gone.png').resolve()}: no such image file",
    ]
    assert sorted(lines) == sorted(expected), "\n".join(lines)
    assert report.class_counts == {"car": 4, "person": 1}  # bad.json's 2-point person is left out


def test_via_planted_problems(tmp_path):
    path, images = via_sample(tmp_path, 2)
    import json
    data = json.loads(path.read_text())
    data["b2.jpg99"]["regions"] = [
        via_region(via_polygon([10, 30, 30], [10, 10, 30]), kind="red"),   # beyond 24x24
        via_region(via_polygon([1, 5, 5], [1, 1, 5])),                      # no 'kind'
        via_region({"name": "point", "cx": 3, "cy": 3}, kind="red"),       # not a region
    ]
    data["again"] = {"filename": "b1.jpg", "regions": []}
    data["lost"] = {"filename": "lost.jpg", "regions": []}
    write_json(path, data)
    report = check_dataset(via=path, images=images, class_attribute="kind")
    b2 = images / "b2.jpg"
    expected = [
        f"{b2}: region 0: polygon outside the image: x 10..30, y 10..30 in a 24x24 image; clipped to the image",
        f"{b2}: region 1: no class in region attribute 'kind'; skipped",
        f"{b2}: region 2: shape 'point' is not a region (use polygon, rect, circle, ellipse); skipped",
        f"{images / 'b1.jpg'}: image listed twice in the VIA file",
        f"{images / 'lost.jpg'}: no such image file",
    ]
    assert sorted(str(p) for p in report.problems) == sorted(expected)


def test_matterport_subclass_checked_through_load_mask(tmp_path):
    class Odd(Dataset):
        def load_mask(self, image_id):
            masks = np.zeros((5, 5, 2), bool)
            masks[1:3, 1:3, 0] = True
            return masks, np.array([1, 1], np.int32)

    Image.new("RGB", (8, 6)).save(tmp_path / "a.png")
    ds = Odd()
    ds.add_class("odd", 1, "thing")
    ds.add_image("odd", "a", tmp_path / "a.png")
    ds.prepare()
    report = check_loaded(ds)
    # Masks of another size make the image unusable (TorchDataset would refuse it mid-run).
    assert [str(p) for p in report.problems] == [f"{tmp_path / 'a.png'}: masks are 5x5 (width x height) "
                                                 "but the image is 8x6"]
    assert report.bad_image_ids == [0]

    class Empty(Odd):
        def load_mask(self, image_id):
            masks, class_ids = super().load_mask(image_id)
            return np.pad(masks, ((0, 1), (0, 3), (0, 0))), class_ids

    ds = Empty()
    ds.add_class("odd", 1, "thing")
    ds.add_image("odd", "a", tmp_path / "a.png")
    ds.prepare()
    report = check_loaded(ds)
    assert [str(p) for p in report.problems] == [f"{tmp_path / 'a.png'}: instance 1: empty mask"]
    assert report.used == 1 and dict(report.skipped) == {"no pixel inside the image": 1}


def test_unreadable_annotation_file_raises(tmp_path):
    (tmp_path / "a.json").write_text('{"images": [')
    with pytest.raises(DataError, match="malformed JSON"):
        check_dataset(coco=tmp_path / "a.json", images=tmp_path)


def test_box_mask_helper_is_exclusive():
    assert box_mask(4, 4, 1, 3, 0, 2).sum() == 4


def labelme_coco_export(root):
    """What labelme's own COCO export looks like (examples/instance_segmentation of its sdist):
    category 0 ``_background_`` with no annotations, image ids from 0, float polygons, and one
    vertex a fraction of a pixel below the image (y = 30.385 in a 30-high image)."""
    (root / "JPEGImages").mkdir(parents=True)
    Image.new("RGB", (40, 30), (120, 90, 60)).save(root / "JPEGImages" / "a.jpg")
    Image.new("RGB", (24, 20), (20, 90, 60)).save(root / "JPEGImages" / "b.jpg")
    data = {
        "info": {"description": None}, "licenses": [{"url": None, "id": 0, "name": None}], "type": "instances",
        "images": [{"license": 0, "url": None, "file_name": "JPEGImages/a.jpg", "height": 30, "width": 40,
                    "date_captured": None, "id": 0},
                   {"license": 0, "url": None, "file_name": "JPEGImages/b.jpg", "height": 20, "width": 24,
                    "date_captured": None, "id": 1}],
        "categories": [{"supercategory": None, "id": 0, "name": "_background_"},
                       {"supercategory": None, "id": 1, "name": "person"}, {"supercategory": None, "id": 2, "name": "bus"}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 1, "iscrowd": 0, "area": 150.0, "bbox": [2.0, 2.0, 10.0, 15.0],
             "segmentation": [[2.3, 2.1, 12.1, 2.1, 12.1, 17.2, 2.3, 17.2]]},
            {"id": 1, "image_id": 0, "category_id": 2, "iscrowd": 0, "area": 300.0, "bbox": [15.0, 18.0, 20.0, 12.0],
             "segmentation": [[15.705, 18.948, 35.705, 18.948, 35.705, 30.385, 15.705, 30.385]]},
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 40.0, "bbox": [3.0, 3.0, 8.0, 5.0],
             "segmentation": [[3.0, 3.0, 11.0, 3.0, 11.0, 8.0, 3.0, 8.0]]},
        ],
    }
    return write_json(root / "annotations.json", data), root


def test_labelme_coco_export_passes_and_every_instance_trains(tmp_path, capsys):
    from maskrcnn.cli import main

    ann, images = labelme_coco_export(tmp_path)
    report = check_dataset(coco=ann, images=images)
    assert report.ok and not report.passed(strict=True)
    assert [str(p) for p in report.warnings] == [
        f"{images / 'JPEGImages' / 'a.jpg'}: annotation 1: polygon outside the image: x 15.705..35.705, "
        "y 18.948..30.385 in a 40x30 image; clipped to the image"]
    assert report.class_counts == {"person": 2, "bus": 1} and report.used == 3 and report.clipped == 1
    ds = read_coco(ann, images)
    assert ds.class_names == ["BG", "person", "bus"]
    assert sum(len(TorchDataset(ds)[i][1]["labels"]) for i in range(2)) == 3
    _, target = TorchDataset(ds)[0]
    assert target["boxes"][1].tolist() == [16, 19, 36, 30]     # reaches the bottom row, clipped there
    assert main(["check-data", "--coco", str(ann), "--images", str(images)]) == 0
    assert main(["check-data", "--coco", str(ann), "--images", str(images), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "1 warning:" in out and "3 annotations used (1 clipped to the image)" in out


def test_training_keeps_clipped_annotations_and_says_what_it_left_out(tmp_path, caplog):
    from maskrcnn.cli import main
    from test_mask_datasets import SMALL

    ann, images = labelme_coco_export(tmp_path / "data")
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 3, "image_id": 1, "category_id": 2, "iscrowd": 0,
                                "segmentation": [[1.0, 1.0, 4.0, 4.0]]})   # 2 points: left out
    write_json(ann, data)
    with caplog.at_level("INFO", logger="maskrcnn"):
        assert main(["train", "--coco", str(ann), "--images", str(images), "--out", str(tmp_path / "run"),
                     "--workers", "0", "--device", "cpu", "--steps", "1",
                     *[a for kv in SMALL for a in ("--set", kv)]]) == 0
    assert ("3 annotations used (1 clipped to the image), 1 left out (1 unusable segmentation)"
            in caplog.text)
