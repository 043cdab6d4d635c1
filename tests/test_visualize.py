"""Overlays checked by pixel content."""
import numpy as np
import torch
from PIL import Image

from maskrcnn import Detections
from maskrcnn.visualize import (apply_mask, color_splash, draw_detections, draw_ground_truth_and_prediction,
                                draw_instances, image_grid, instance_colors, mask_contour,
                                plot_precision_recall, save_png)


def _scene():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((1, 60, 80), bool)
    mask[0, 30:50, 40:70] = True
    return image, mask


def test_mask_pixels_take_the_colour_and_others_stay():
    image, mask = _scene()
    red = (255, 0, 0)
    out = draw_instances(image, masks=mask, labels=[1], boxes=None, colors=[red], alpha=0.5)
    interior = mask[0] & ~mask_contour(mask[0])
    expected = np.rint(0.5 * image[interior].astype(float) + 0.5 * np.array(red)).astype(np.uint8)
    np.testing.assert_array_equal(out[interior], expected)
    assert (out[mask_contour(mask[0])] == red).all()   # solid outline
    np.testing.assert_array_equal(out[~mask[0]], image[~mask[0]])
    np.testing.assert_array_equal(image, _scene()[0])  # input untouched


def test_box_and_caption_drawn_at_the_box():
    image = np.full((60, 80, 3), 128, np.uint8)
    out = draw_instances(image, boxes=np.array([[10, 20, 50, 40]]), labels=np.array([2]), scores=np.array([0.87]),
                         class_names=["BG", "cat", "dog"], colors=[(0, 255, 0)])
    assert tuple(out[36, 10]) == (0, 255, 0) and tuple(out[36, 49]) == (0, 255, 0)  # left, right edges
    assert tuple(out[39, 30]) == (0, 255, 0)                                        # bottom edge (y2 - 1)
    assert tuple(out[36, 50]) == (128, 128, 128) and tuple(out[40, 30]) == (128, 128, 128)  # exclusive
    caption = out[20:32, 10:45]
    assert (caption == 0).all(axis=2).any() and (caption.min(axis=2) > 200).any()  # light text on black
    assert (out[45:, :] == 128).all() and (out[:, 55:] == 128).all()               # untouched elsewhere


def test_draw_detections_uses_all_fields():
    image, mask = _scene()
    det = Detections(torch.tensor([[40, 30, 70, 50.0]]), torch.tensor([1]), torch.tensor([0.9]),
                     torch.from_numpy(mask))
    out = draw_detections(image, det, ["BG", "thing"])
    color = instance_colors(1)[0]
    assert tuple(out[45, 55]) == tuple(np.rint(0.5 * image[45, 55] + 0.5 * np.array(color)).astype(np.uint8))
    np.testing.assert_array_equal(out[:25], image[:25])


def test_color_splash():
    image, mask = _scene()
    out = color_splash(image, mask)
    np.testing.assert_array_equal(out[mask[0]], image[mask[0]])
    gray = np.asarray(Image.fromarray(image).convert("L"))
    np.testing.assert_array_equal(out[~mask[0]], np.repeat(gray[~mask[0]][:, None], 3, axis=1))
    assert (color_splash(image, np.zeros((0, 60, 80), bool))[..., 0] == gray).all()


def test_grid_and_side_by_side():
    a = np.full((10, 20, 3), 10, np.uint8)
    b = np.full((6, 8, 3), 200, np.uint8)
    grid = image_grid([a, b, a], cols=2, gap=2)
    assert grid.shape == (10 + 2 + 10, 20 + 2 + 20, 3)
    assert (grid[:10, :20] == 10).all() and (grid[:6, 22:30] == 200).all() and (grid[12:22, :20] == 10).all()
    assert (grid[:, 20:22] == 255).all() and (grid[12:, 22:] == 255).all()

    image, mask = _scene()
    det = Detections(torch.tensor([[40, 30, 70, 50.0]]), torch.tensor([1]), torch.tensor([0.9]),
                     torch.from_numpy(mask))
    both = draw_ground_truth_and_prediction(image, det.boxes, det.labels, det.masks, det, ["BG", "thing"])
    assert both.shape[1] == 2 * 80 + 4 and both.shape[0] > 60
    title = both.shape[0] - 60
    np.testing.assert_array_equal(both[title:title + 25, :80], image[:25])        # gt cell, above the box
    np.testing.assert_array_equal(both[title:title + 25, 84:], image[:25])        # prediction cell


def test_pr_plot_and_png(tmp_path):
    recall = np.linspace(0, 1, 101)
    plot = plot_precision_recall(recall, {"bbox": [1.0] * 101, "segm": [None] * 101})
    assert plot.shape == (400, 480, 3) and plot.dtype == np.uint8
    assert len(np.unique(plot.reshape(-1, 3), axis=0)) > 10
    save_png(plot, tmp_path / "pr.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pr.png")), plot)
    assert [p.name for p in tmp_path.iterdir()] == ["pr.png"]


def test_apply_mask_alpha_zero_is_identity():
    image, mask = _scene()
    np.testing.assert_array_equal(apply_mask(image, mask[0], (9, 9, 9), alpha=0.0), image)


def test_overlay_equals_blending_and_outlining_the_whole_frame():
    """Masks are blended and outlined within their extent only: overlapping masks, masks on
    each image border, an empty one, a ring and single pixels give the pixels that whole-frame
    blending and outlining in instance order give."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    masks = np.zeros((8, 50, 70), bool)
    masks[0, 0:20, 0:30] = True                      # top-left corner
    masks[1, 10:50, 20:45] = True                    # overlaps 0, reaches the bottom
    masks[2, 5:15, 60:70] = True                     # right border
    masks[3, 30:45, 50:65] = True
    masks[3, 35:40, 55:60] = False                   # a ring
    masks[5, 25, 10] = masks[5, 49, 69] = True       # single pixels, one in the corner
    masks[6] = rng.random((50, 70)) < 0.1            # scattered
    masks[7, :, :] = True                            # the whole image, drawn last
    colors = instance_colors(8)
    expected = image.copy()
    for m, c in zip(masks, colors):                  # masks[4] is empty
        expected = apply_mask(expected, m, c, 0.4)
        expected[mask_contour(m)] = c
    for drawn in (masks, torch.from_numpy(masks)):
        out = draw_instances(image, labels=np.ones(8, int), masks=drawn, colors=colors, alpha=0.4)
        np.testing.assert_array_equal(out, expected)
