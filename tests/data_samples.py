"""Small annotated datasets that the data tests write into ``tmp_path``: COCO, labelme and VIA,
with known masks so the tests can compare pixels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def rgb_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def box_mask(height: int, width: int, y1: int, y2: int, x1: int, x2: int) -> np.ndarray:
    """[H, W] bool, True on rows y1..y2-1 and columns x1..x2-1."""
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ---- COCO -------------------------------------------------------------------------------------
# Category ids are non-contiguous and listed out of order: internal ids are cat=1, dog=2, bird=3.
COCO_CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 7, "name": "cat"}, {"id": 42, "name": "bird"}]
RGB_DOG = box_mask(40, 60, 28, 36, 40, 56)
GRAY_CAT = box_mask(30, 30, 2, 11, 3, 13)
GRAY_CROWD = box_mask(30, 30, 15, 26, 15, 29)


def coco_sample(root: Path) -> tuple[Path, Path]:
    """COCO annotations with a polygon, a compressed RLE, an uncompressed RLE, a crowd region
    and an image without annotations; images RGB, grayscale and RGBA.  Returns (json, images)."""
    images = root / "images"
    images.mkdir(parents=True)
    Image.fromarray(rgb_image(40, 60, 1)).save(images / "rgb.png")
    Image.fromarray(rgb_image(30, 30, 2)[:, :, 0]).save(images / "gray.png")
    Image.fromarray(np.dstack([rgb_image(20, 24, 3), np.full((20, 24), 128, np.uint8)])).save(images / "rgba.png")
    data = {
        "images": [{"id": 5, "file_name": "rgb.png", "height": 40, "width": 60},
                   {"id": 9, "file_name": "gray.png", "height": 30, "width": 30},
                   {"id": 11, "file_name": "rgba.png", "height": 20, "width": 24}],
        "categories": COCO_CATEGORIES,
        "annotations": [
            {"id": 101, "image_id": 5, "category_id": 7, "iscrowd": 0, "bbox": [10, 5, 20, 20],
             "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]]},
            {"id": 102, "image_id": 5, "category_id": 18, "iscrowd": 0, "bbox": [40, 28, 16, 8],
             "segmentation": compressed_rle(RGB_DOG)},
            {"id": 103, "image_id": 9, "category_id": 7, "iscrowd": 0, "bbox": [3, 2, 10, 9],
             "segmentation": uncompressed_rle(GRAY_CAT)},
            {"id": 104, "image_id": 9, "category_id": 18, "iscrowd": 1, "bbox": [15, 15, 14, 11],
             "segmentation": uncompressed_rle(GRAY_CROWD)},
        ],
    }
    return write_json(root / "annotations.json", data), images


# ---- COCO with one of each problem ----------------------------------------------------------
def planted_coco_sample(root: Path) -> tuple[Path, Path]:
    """COCO annotations with one of each problem; returns (json path, images folder)."""
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (60, 40)).save(images / "ok.png")
    Image.new("RGB", (60, 40)).save(images / "wrong_size.png")
    (images / "corrupt.png").write_text("this is not a picture")
    polygon = [[10, 5, 30, 5, 30, 25, 10, 25]]
    ann = lambda i, image_id=1, cat=1, seg=polygon, **kw: dict(id=i, image_id=image_id, category_id=cat,
                                                               segmentation=seg, iscrowd=0, **kw)
    data = {
        "images": [{"id": 1, "file_name": "ok.png", "height": 40, "width": 60},
                   {"id": 2, "file_name": "missing.png", "height": 40, "width": 60},
                   {"id": 3, "file_name": "corrupt.png", "height": 40, "width": 60},
                   {"id": 4, "file_name": "wrong_size.png", "height": 50, "width": 50},
                   {"id": 1, "file_name": "dup.png", "height": 40, "width": 60}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 3, "name": "dog again"}],
        "annotations": [
            ann(201, seg=[[50, 5, 80, 5, 80, 25, 50, 25]]),               # outside (x up to 80 of 60)
            ann(202, seg=[[1, 1, 5, 5]]),                                  # 2 points
            ann(203, seg=[[1, 1, 5, 5, 9, 9]]),                            # collinear: zero area
            ann(204, seg=compressed_rle(np.zeros((40, 60), bool))),       # empty mask
            ann(205, cat=99),                                              # unknown category
            ann(206), ann(206, cat=3),                                     # duplicate annotation id
            ann(207, image_id=1234),                                       # unknown image
            ann(208, seg=compressed_rle(np.ones((10, 10), bool))),        # RLE of the wrong size
            ann(209, seg=[[100, 100, 120, 100, 120, 120]]),                # entirely outside
            ann(210, image_id=2),                                          # on the missing image
        ],
    }
    return write_json(root / "planted.json", data), images


# ---- labelme ----------------------------------------------------------------------------------
def labelme_file(image_name: str, height: int, width: int, shapes: list) -> dict:
    return {"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": image_name, "imageData": None,
            "imageHeight": height, "imageWidth": width}


def labelme_shape(label: str, points: list, shape_type: str = "polygon", group_id=None) -> dict:
    return {"label": label, "points": points, "group_id": group_id, "shape_type": shape_type, "flags": {}}


def labelme_sample(root: Path) -> Path:
    """A labelme folder: a polygon, a rectangle and a two-part instance (group_id) in one
    image, an image without shapes in another (a palette PNG).  Returns the folder."""
    folder = root / "labelme"
    folder.mkdir(parents=True)
    Image.fromarray(rgb_image(32, 48, 4)).save(folder / "street.png")
    Image.fromarray(rgb_image(16, 16, 5)[:, :, 0]).convert("P").save(folder / "empty.png")
    write_json(folder / "street.json", labelme_file("street.png", 32, 48, [
        labelme_shape("person", [[2, 2], [12, 2], [12, 20], [2, 20]]),
        labelme_shape("car", [[30, 10], [20, 4]], "rectangle"),
        labelme_shape("car", [[34, 20], [40, 20], [40, 30], [34, 30]], group_id=1),
        labelme_shape("car", [[42, 20], [46, 20], [46, 30], [42, 30]], group_id=1),
    ]))
    write_json(folder / "empty.json", labelme_file("empty.png", 16, 16, []))
    return folder


# ---- VIA --------------------------------------------------------------------------------------
def via_region(shape: dict, **attributes) -> dict:
    return {"shape_attributes": shape, "region_attributes": attributes}


def via_polygon(xs, ys) -> dict:
    return {"name": "polygon", "all_points_x": list(xs), "all_points_y": list(ys)}


def via_sample(root: Path, version: int) -> tuple[Path, Path]:
    """A VIA 1 (regions as an object) or VIA 2 (regions as a list) file like the balloon
    sample's, with polygon, rect, circle and ellipse regions and a ``kind`` attribute.
    Returns (json, images)."""
    images = root / "via_images"
    images.mkdir(parents=True)
    Image.fromarray(rgb_image(40, 40, 6)).save(images / "b1.jpg")
    Image.fromarray(rgb_image(24, 24, 7)).save(images / "b2.jpg")
    regions = [
        via_region(via_polygon([4, 14, 14, 4], [4, 4, 14, 14]), kind="red"),
        via_region({"name": "rect", "x": 20, "y": 2, "width": 10, "height": 6}, kind="blue"),
        via_region({"name": "circle", "cx": 10, "cy": 30, "r": 5}, kind="red"),
        via_region({"name": "ellipse", "cx": 30, "cy": 30, "rx": 6, "ry": 3}, kind="blue"),
    ]
    if version == 1:
        regions = {str(i): r for i, r in enumerate(regions)}
    data = {
        "b1.jpg1234": {"fileref": "", "size": 1234, "filename": "b1.jpg", "base64_img_data": "",
                       "file_attributes": {}, "regions": regions},
        "b2.jpg99": {"fileref": "", "size": 99, "filename": "b2.jpg", "base64_img_data": "",
                     "file_attributes": {}, "regions": {} if version == 1 else []},
    }
    return write_json(root / f"via{version}.json", data), images
