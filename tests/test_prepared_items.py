"""The per-image training preparation moved from the step into the data loader's workers
(``training.prepare_training_item``): the same numbers as preparing in the step, for every
resize mode, through the Trainer's loader with workers, and the geometry it splits in two
(scale to the window, then place in the batch) equal to the full-frame resize it replaced."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from maskrcnn import Config
from maskrcnn.data.dataset import collate
from maskrcnn.data.shapes import ShapesDataset
from maskrcnn.engine.hooks import HookBase
from maskrcnn.engine.trainer import SeededItems, Trainer, item_preparer, seed_everything
from maskrcnn.model import training
from maskrcnn.model.maskrcnn import MaskRCNN
from maskrcnn.model.preprocess import ImageMeta, normalize_uint8

SMALL = dict(backbone="resnet18", backbone_style="pytorch", rpn_anchor_scales=(8, 16, 32, 64, 128),
             rpn_conv_channels=32, top_down_pyramid_size=32, fpn_classif_fc_layers_size=64,
             mask_head_channels=32, rpn_train_anchors_per_image=64, pre_nms_limit=500,
             post_nms_rois_training=100, train_rois_per_image=16, images_per_gpu=2, warmup_steps=0,
             num_classes=4, train_bn=True)
CONFIGS = {
    # upscaled into a 192 square, two instances kept of up to four, 56x56 mini masks
    "square_mini": lambda: Config(**SMALL, image_min_dim=160, image_max_dim=192, max_gt_instances=2),
    "pad64_full": lambda: Config(**SMALL, image_resize_mode="pad64", image_min_dim=128, image_max_dim=192,
                                 use_mini_mask=False),
    "crop_mini": lambda: Config(**SMALL, image_resize_mode="crop", image_min_dim=128, image_max_dim=192),
    "torchvision": lambda: Config.preset("torchvision", **{**SMALL, "image_min_dim": 120, "image_max_dim": 200}),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Mixed(torch.utils.data.Dataset):
    """Shapes images of three sizes (so a batch pads to its largest)."""

    def __init__(self, count: int = 6):
        self.sets = [ShapesDataset(count, 100, 140, seed=1), ShapesDataset(count, 120, 96, seed=2),
                     ShapesDataset(count, 90, 90, seed=3)]

    def __len__(self):
        return len(self.sets[0])

    def __getitem__(self, index):
        return self.sets[index % 3][index]


def _model(config):
    seed_everything(3)
    return MaskRCNN(config).train()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prepared_items_give_the_losses_and_gradients_of_raw_items(name):
    """model(raw items) prepares in the step; prepare_training_item beforehand (what a worker
    does) then model(prepared items) gives bit-identical losses and gradients.  In crop mode
    both draw the squares from the same generator state, so they cut the same squares."""
    config = CONFIGS[name]()
    model = _model(config)
    items = [Mixed()[i] for i in (0, 1, 2)]

    def losses_and_grads(prepare_first: bool):
        torch.manual_seed(11)
        batch = [training.prepare_training_item(im, t, config) for im, t in items] if prepare_first else items
        images, targets = collate(batch)
        model.zero_grad(set_to_none=True)
        losses = model(list(images), list(targets))
        sum(losses.values()).backward()
        return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    raw_losses, raw_grads = losses_and_grads(False)
    prepared_losses, prepared_grads = losses_and_grads(True)
    assert set(raw_losses) == set(prepared_losses) == set(config.loss_weights)
    for k in raw_losses:
        assert torch.equal(raw_losses[k], prepared_losses[k]), (k, raw_losses[k], prepared_losses[k])
    assert raw_grads.keys() == prepared_grads.keys() and len(raw_grads) > 50
    assert all(torch.equal(raw_grads[n], prepared_grads[n]) for n in raw_grads)


def test_prepared_items_keep_the_image_size_work_out_of_the_step():
    """What a worker hands the step in the Matterport preset: the image resized and padded to
    its molded size (uint8), masks at the window's size or 56x56 mini masks, boxes in molded
    pixels, and the ImageMeta."""
    config = CONFIGS["square_mini"]()
    image, target = Mixed()[0]  # 100 x 140 -> scale 192 / 140 -> 137 x 192 in a 192 square
    prepared, out = training.prepare_training_item(image, target, config)
    assert prepared.dtype == torch.uint8 and tuple(prepared.shape) == (3, 192, 192) and prepared.is_contiguous()
    assert training.is_prepared(out) and out["mini"]
    meta = out["image_meta"]
    assert meta.original_shape == (100, 140) and meta.window == (27, 0, 164, 192)
    assert tuple(out["masks"].shape[1:]) == config.mini_mask_shape and len(out["masks"]) <= 2
    scale = 192 / 140
    assert out["boxes"][:, [1, 3]].min() >= 27 - 1e-4 and out["boxes"][:, [1, 3]].max() <= 164 + 1e-4
    assert torch.allclose(out["boxes"][:, 2] - out["boxes"][:, 0],
                          (target["boxes"][:, 2] - target["boxes"][:, 0])[training.keep_largest(
                              target["masks"].flatten(1).sum(1), 2)] * scale)


def test_scale_then_place_is_the_full_frame_nearest_resize():
    """scale_target + place_target against the numbers of the resize they replaced: an 8x8
    image at scale 0.5 in window (y1, x1, y2, x2) = (2, 4, 6, 8) of a 10x12 batch.  Nearest
    reads input rows/cols 0, 2, 4, 6: a 4x4 block at rows 2-5, cols 4-7 becomes output rows
    1-2, cols 2-3 of the window, i.e. rows 3-4, cols 6-7 of the batch, box (6, 3, 8, 5); a
    single pixel at (1, 1) falls between the samples and vanishes, box (0, 0, 0, 0) as
    masks_to_boxes gives an empty mask."""
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:6, 4:8] = True
    masks[1, 1, 1] = True
    meta = ImageMeta((8, 8), (2, 4, 6, 8), 0.5)
    scaled = training.scale_target({"masks": masks, "labels": torch.tensor([1, 2])}, meta, "cpu")
    assert tuple(scaled["masks"].shape) == (2, 4, 4)
    placed = training.place_target(scaled, (10, 12))
    expected = torch.zeros(2, 10, 12, dtype=torch.bool)
    expected[0, 3:5, 6:8] = True
    assert torch.equal(placed["masks"], expected)
    assert placed["boxes"].tolist() == [[6.0, 3.0, 8.0, 5.0], [0.0, 0.0, 0.0, 0.0]]
    assert placed["labels"].tolist() == [1, 2] and not placed["mini"]
    # given boxes are scaled and shifted instead: (4, 2, 8, 6) -> (2, 1, 4, 3) + (4, 2, 4, 2)
    boxed = training.mold_target({"masks": masks, "labels": torch.tensor([1, 2]),
                                  "boxes": torch.tensor([[4.0, 2, 8, 6], [1, 1, 2, 2]])}, meta, (10, 12), "cpu")
    assert boxed["boxes"].tolist() == [[6.0, 3.0, 8.0, 5.0], [4.5, 2.5, 5.0, 3.0]]


def test_normalize_uint8_is_matterports_float64_subtraction():
    """uint8 - mean_pixel in float64 (Matterport's float32 image minus a float64 array), fed as
    float32; then / std_pixel in float32 (the torchvision-style std of a config that has one)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 5, 7), dtype=np.uint8)
    mean, std = (123.7, 116.8, 103.9), (58.395, 57.12, 57.375)
    expected = (image.astype(np.float32) - np.array(mean)[:, None, None]).astype(np.float32)
    got = normalize_uint8(torch.from_numpy(image), mean)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expected)
    scaled = normalize_uint8(torch.from_numpy(image), mean, std)
    assert np.array_equal(scaled.numpy(), expected / np.array(std, dtype=np.float32)[:, None, None])


def test_worker_prepared_batches_give_the_losses_of_the_step_prepared(tmp_path):
    """Through the Trainer's own loader: items prepared in 2 DataLoader workers (under each
    item's seeded stream, with the default augmentation) give bit-identical losses to the same
    raw items prepared in the step; and the trainer only prepares for a Mask R-CNN."""
    from maskrcnn.data.transforms import build_transforms

    config = CONFIGS["square_mini"]()
    model = _model(config)
    augment = build_transforms(train=True)

    class Augmented(Mixed):
        def __getitem__(self, index):
            return augment(*super().__getitem__(index))

    keys = [[(0, 0, 4), (0, 1, 1)], [(0, 2, 3), (0, 3, 0)]]
    loaded = {}
    for prepare in (None, item_preparer(model)):
        loader = DataLoader(SeededItems(Augmented(), 5, prepare), batch_sampler=keys, collate_fn=collate,
                            num_workers=2 if prepare else 0)
        loaded[prepare is None] = list(loader)
    assert all(training.is_prepared(t) for _, targets in loaded[False] for t in targets)
    assert not any(training.is_prepared(t) for _, targets in loaded[True] for t in targets)
    with torch.no_grad():
        for (raw_images, raw_targets), (images, targets) in zip(loaded[True], loaded[False]):
            torch.manual_seed(0)
            raw = model(raw_images, raw_targets)
            torch.manual_seed(0)
            prepared = model(images, targets)
            assert all(torch.equal(raw[k], prepared[k]) for k in raw)
    assert item_preparer(torch.nn.Linear(2, 2)) is None


class Record(HookBase):
    """Keeps each step's losses."""

    def __init__(self):
        self.values = []

    def after_step(self):
        self.values.append(dict(self.trainer.values))


def test_trainer_losses_do_not_depend_on_where_items_are_prepared(tmp_path):
    """Three seeded Trainer steps (pad64, full masks, batches of mixed sizes): preparing in the
    loader and in the step log the same losses, bit for bit."""
    logged = {}
    for in_workers in (True, False):
        config = CONFIGS["pad64_full"]()
        record = Record()
        Trainer(_model(config), Mixed(), tmp_path / str(in_workers), config, seed=7, progress=False,
                checkpoint_every=0, hooks=(record,), prepare_in_workers=in_workers).fit(3)
        logged[in_workers] = record.values
    assert len(logged[True]) == 3 and logged[True] == logged[False]
