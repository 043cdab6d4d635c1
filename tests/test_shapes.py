"""The synthetic shapes data set: format, determinism, occlusion."""
import torch

from maskrcnn.boxes import masks_to_boxes
from maskrcnn.data.shapes import CLASS_NAMES, ShapesDataset, render_scene, shape_mask


def test_item_format():
    ds = ShapesDataset(5, height=64, width=96, seed=3)
    image, target = ds[2]
    n = len(target["labels"])
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 96)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
    assert target["labels"].dtype == torch.int64 and set(target["labels"].tolist()) <= {1, 2, 3}
    assert target["masks"].dtype == torch.bool and target["masks"].shape == (n, 64, 96)
    assert target["iscrowd"].dtype == torch.bool and not target["iscrowd"].any()
    assert target["image_id"] == 2
    assert torch.equal(target["boxes"], masks_to_boxes(target["masks"]))
    assert ds.class_names == ["BG", "square", "circle", "triangle"] == CLASS_NAMES


def test_deterministic_by_seed_and_index():
    a, b, c = ShapesDataset(4, seed=7), ShapesDataset(4, seed=7), ShapesDataset(4, seed=8)
    for i in range(4):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1]["masks"], b[i][1]["masks"])
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(4))
    assert not torch.equal(a[0][0], a[1][0])


def test_masks_are_the_visible_parts():
    ds = ShapesDataset(30, seed=0)
    for i in range(30):
        image, t = ds[i]
        masks = t["masks"]
        assert (masks.sum(0) <= 1).all()  # occluded pixels belong to one instance only
        assert (masks.sum((1, 2)) >= ds.min_area).all()
        for m in masks:  # every visible pixel of an instance has that instance's colour
            colours = image[:, m].T.unique(dim=0)
            assert len(colours) == 1


def test_occlusion_by_hand():
    # a 10x10 square on pixels 10..19, then a 6x6 square on pixels 17..22 over its corner:
    # they share pixels 17..19 in x and y, 3 x 3 = 9
    shapes = [("square", (255, 0, 0), 15, 15, 5), ("square", (0, 255, 0), 20, 20, 3)]
    image, masks, labels = render_scene((0, 0, 0), shapes, 32, 32)
    assert labels.tolist() == [1, 1]
    assert masks[0].sum() == 100 - 9 and masks[1].sum() == 36
    overlap = shape_mask("square", 15, 15, 5, 32, 32) & shape_mask("square", 20, 20, 3, 32, 32)
    assert overlap.sum() == 9 and not (masks[0] & overlap).any()
    assert (image[masks[1]] == (0, 255, 0)).all() and (image[masks[0]] == (255, 0, 0)).all()


def test_fully_hidden_shapes_are_dropped():
    ds = ShapesDataset(1)
    # a small circle completely covered by a later big square: rendered mask is empty
    shapes = [("circle", (255, 0, 0), 30, 30, 4), ("square", (0, 0, 255), 30, 30, 12)]
    _, masks, _ = render_scene((0, 0, 0), shapes, 64, 64)
    assert masks[0].sum() == 0 and masks[1].sum() == 24 * 24
    assert ds.min_area > 0  # so __getitem__ keeps only instances with >= min_area visible pixels
