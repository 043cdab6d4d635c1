"""Mask-image datasets: instance label images (--labels) and Matterport's nucleus folders
(--mask-dirs), read through the Dataset API, checked, trained on and evaluated from the CLI."""
import json

import numpy as np
import pytest
from PIL import Image

from maskrcnn.cli import main
from maskrcnn.data import TorchDataset, check_dataset, open_dataset, read_labels, read_mask_dirs
from maskrcnn.data.masks import read_label_image
from maskrcnn.errors import DataError

SMALL = ["backbone=resnet18", "backbone_style=pytorch", "image_min_dim=64", "image_max_dim=64",
         "rpn_anchor_scales=[8,16,32,64,128]", "top_down_pyramid_size=32", "rpn_conv_channels=32",
         "fpn_classif_fc_layers_size=64", "mask_head_channels=32", "train_rois_per_image=16",
         "post_nms_rois_training=100", "post_nms_rois_inference=50", "images_per_gpu=2", "train_bn=true"]


def label_image(height=40, width=48):
    """Three instances: labels 3 (a box), 7 (a box), 300 (a box, needs 16 bits)."""
    labels = np.zeros((height, width), np.int32)
    labels[2:10, 3:12] = 3
    labels[20:30, 30:40] = 7
    labels[12:16, 20:26] = 300
    return labels


def nuclei(root, dtype=np.uint16, suffix=".tif", label_suffix=""):
    """images/a.png (16-bit, 12-bit values), images/b.png with label images in labels/."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 4096, (40, 48)).astype(np.uint16)).save(root / "images" / f"{name}.png")
        labels = label_image().astype(dtype)
        if suffix == ".png":
            Image.fromarray(labels).save(root / "labels" / f"{name}{label_suffix}.png")
        else:
            Image.fromarray(labels).save(root / "labels" / f"{name}{label_suffix}{suffix}")
    return root / "images", root / "labels"


@pytest.mark.parametrize("dtype, suffix", [(np.uint16, ".tif"), (np.uint16, ".png"), (np.int32, ".tif"),
                                           (np.float32, ".tif")])
def test_label_images_every_integer_kind(tmp_path, dtype, suffix):
    images, labels = nuclei(tmp_path, dtype, suffix)
    ds = read_labels(images, labels)
    assert ds.class_names == ["BG", "object"] and len(ds.image_info) == 2
    masks, class_ids = ds.load_mask(0)
    assert masks.shape == (40, 48, 3) and class_ids.tolist() == [1, 1, 1]
    for k, value in enumerate((3, 7, 300)):
        np.testing.assert_array_equal(masks[:, :, k], label_image() == value)
    image, target = TorchDataset(ds)[1]
    assert image.shape == (3, 40, 48) and image.max() == 255  # 12-bit values stretched, not 255/65535
    assert target["boxes"].tolist() == [[3, 2, 12, 10], [30, 20, 40, 30], [20, 12, 26, 16]]


def test_eight_bit_label_png_and_cellpose_names_in_one_folder(tmp_path):
    folder = tmp_path / "cellpose"
    folder.mkdir()
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(folder / "img1.png")
    Image.fromarray((label_image() % 256).astype(np.uint8)).save(folder / "img1_masks.png")
    ds = open_dataset(labels=folder, images=folder, class_name="cell")
    assert [info["id"] for info in ds.image_info] == ["img1"] and ds.class_names == ["BG", "cell"]
    assert ds.load_mask(0)[0].shape[2] == 3 and ds.problems == []


def test_classes_file_gives_each_instance_its_class(tmp_path):
    images, labels = nuclei(tmp_path)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"a": {"3": "tumour", "7": "immune", "300": "tumour"},
                                   "b": {"3": "immune", "7": "immune"}}))
    ds = read_labels(images, labels, classes=classes)
    assert ds.class_names == ["BG", "immune", "tumour"]
    assert ds.load_mask(0)[1].tolist() == [2, 1, 2]
    assert ds.load_mask(1)[1].tolist() == [1, 1]          # 300 has no class in b: left out
    report = check_dataset(labels=labels, images=images, classes=classes)
    assert [str(p) for p in report.errors] == [
        f"{labels / 'b.tif'}: instance 300: no class for it under 'b' in the classes file; skipped"]
    assert report.used == 5 and report.class_counts == {"immune": 3, "tumour": 2}


def test_stardist_numeric_classes_sort_as_numbers(tmp_path):
    images, labels = nuclei(tmp_path)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"a": {"3": 2, "7": 10, "300": 1}, "b": {"3": 1, "7": 1, "300": 1}}))
    ds = read_labels(images, labels, classes=classes)
    assert ds.class_names == ["BG", "class 1", "class 2", "class 10"]
    assert ds.load_mask(0)[1].tolist() == [2, 3, 1]


def test_label_problems_reported(tmp_path):
    images, labels = nuclei(tmp_path)
    (labels / "b.tif").unlink()
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(labels / "stray.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(images / "c.png")
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(labels / "c.tif")    # wrong size
    report = check_dataset(labels=labels, images=images)
    assert sorted(str(p) for p in report.errors) == sorted([
        f"{images / 'b.png'}: no label image b.png/.tif in {labels}",
        f"{labels / 'stray.png'}: no picture of this name in {images}; ignored",
        f"{images / 'b.png'}: no label image",
        f"{images / 'c.png'}: masks are 10x10 (width x height) but the image is 48x40",
    ])
    assert report.bad_image_ids == [1, 2] and report.used == 3


@pytest.mark.parametrize("make, why", [
    (lambda p: Image.new("RGB", (4, 4)).save(p), "single-channel integers, not mode RGB"),
    (lambda p: Image.fromarray(np.full((4, 4), -2, np.int32)).save(p), "negative label -2"),
    (lambda p: Image.fromarray(np.full((4, 4), 1.5, np.float32)).save(p), "whole numbers only"),
])
def test_unusable_label_images(tmp_path, make, why):
    make(tmp_path / "l.tif")
    with pytest.raises(DataError, match=why):
        read_label_image(tmp_path / "l.tif")


def mask_dirs(root):
    """Matterport's nucleus layout: two pictures, two and one masks; one stray folder."""
    for name, boxes in (("n1", [(2, 10, 3, 12), (20, 30, 30, 40)]), ("n2", [(5, 9, 5, 9)])):
        (root / name / "images").mkdir(parents=True)
        (root / name / "masks").mkdir()
        Image.fromarray(np.full((40, 48, 4), 120, np.uint8)).save(root / name / "images" / f"{name}.png")
        for k, (y1, y2, x1, x2) in enumerate(boxes):
            mask = np.zeros((40, 48), np.uint8)
            mask[y1:y2, x1:x2] = 255
            Image.fromarray(mask).save(root / name / "masks" / f"m{k}.png")
    (root / "notes").mkdir()
    return root


def test_mask_dirs(tmp_path):
    root = mask_dirs(tmp_path / "stage1")
    ds = read_mask_dirs(root, class_name="nucleus")
    assert ds.class_names == ["BG", "nucleus"] and [i["id"] for i in ds.image_info] == ["n1", "n2"]
    masks, class_ids = ds.load_mask(0)
    assert masks.shape == (40, 48, 2) and class_ids.tolist() == [1, 1]
    assert masks[:, :, 1].sum() == 100 and masks[25, 35, 1]
    _, target = TorchDataset(ds)[1]
    assert target["boxes"].tolist() == [[5, 5, 9, 9]]
    classes = tmp_path / "c.json"
    classes.write_text(json.dumps({"n1": {"m0": "round", "m1": "long"}, "n2": {"m0": "round"}}))
    assert read_mask_dirs(root, classes=classes).load_mask(0)[1].tolist() == [2, 1]


def test_mask_dirs_problems(tmp_path):
    root = mask_dirs(tmp_path / "stage1")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "n2" / "masks" / "small.png")
    (root / "n3" / "images").mkdir(parents=True)
    report = check_dataset(mask_dirs=root)
    assert sorted(str(p) for p in report.problems) == sorted([
        f"{root / 'n3' / 'images'}: 0 images and none named n3; expected n3.png",
        f"{root / 'n2' / 'masks' / 'small.png'}: mask is 5x5 (width x height) but the image is 48x40; skipped",
    ])
    assert report.used == 3
    with pytest.raises(DataError, match="no <id>/images/ folders"):
        read_mask_dirs(tmp_path / "stage1" / "notes")


def test_cli_check_train_evaluate_on_label_images(tmp_path, capsys):
    images, labels = nuclei(tmp_path / "data")
    assert main(["check-data", "--images", str(images), "--labels", str(labels), "--class-name", "nucleus"]) == 0
    out = capsys.readouterr().out
    assert "nucleus  6" in out and "6 annotations used" in out
    run = tmp_path / "run"
    assert main(["train", "--images", str(images), "--labels", str(labels), "--out", str(run), "--workers", "0",
                 "--device", "cpu", "--steps", "1", *[a for kv in SMALL for a in ("--set", kv)]]) == 0
    assert main(["evaluate", "--weights", str(run / "model"), "--images", str(images), "--labels", str(labels)]) == 0
    assert "2 images" in capsys.readouterr().out


def test_cli_check_mask_dirs_strict(tmp_path, capsys):
    root = mask_dirs(tmp_path / "stage1")
    assert main(["check-data", "--mask-dirs", str(root)]) == 0
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "n1" / "masks" / "blank.png")
    assert main(["check-data", "--mask-dirs", str(root)]) == 1     # an empty mask is an error
    assert "instance 0: empty mask" in capsys.readouterr().out
