"""A Matterport project moves over with its imports changed and nothing else.

The script below is Matterport's ``samples/shapes/train_shapes.ipynb`` as a script (a Config
subclass with upper-case attributes, a Dataset subclass that draws its images and masks,
training in two stages, detection and ``r["rois"]``) at toy size.  What changed:

* the imports: ``from mrcnn.config import Config``, ``from mrcnn import utils``,
  ``import mrcnn.model as modellib`` and imgaug become the lines marked "port" below (the
  augmentation a torchvision v2 transform: ``iaa.Fliplr(0.5)`` is ``v2.RandomHorizontalFlip(0.5)``);
* ``model.train(...)`` is ``model.fit(...)`` (``train`` is ``nn.Module``'s mode switch);
* shapes are drawn with numpy instead of cv2, and ``np.bool`` (gone from numpy) is ``bool``;
* a small network (``BACKBONE = "resnet18"``, narrow heads) so the test runs in seconds on a CPU.
"""
import json
import math
import random

import numpy as np
import torch

import maskrcnn as modellib           # port: was `import mrcnn.model as modellib`
from maskrcnn import Config           # port: was `from mrcnn.config import Config`
import maskrcnn as utils              # port: was `from mrcnn import utils`
from torchvision.transforms import v2 as iaa  # port: was `import imgaug.augmenters as iaa` (iaa.Fliplr(0.5))


class ShapesConfig(Config):
    """Configuration for training on the toy shapes dataset."""
    NAME = "shapes"
    GPU_COUNT = 1
    IMAGES_PER_GPU = 2
    NUM_CLASSES = 1 + 3  # background + 3 shapes
    BACKBONE = "resnet18"
    IMAGE_MIN_DIM = 64
    IMAGE_MAX_DIM = 64
    RPN_ANCHOR_SCALES = (8, 16, 32, 64, 128)
    TOP_DOWN_PYRAMID_SIZE = 32
    FPN_CLASSIF_FC_LAYERS_SIZE = 64
    RPN_CONV_CHANNELS = 32      # (not Matterport's: our fields take upper-case names too)
    MASK_HEAD_CHANNELS = 16
    PRE_NMS_LIMIT = 300
    TRAIN_ROIS_PER_IMAGE = 32
    POST_NMS_ROIS_TRAINING = 100
    POST_NMS_ROIS_INFERENCE = 50
    STEPS_PER_EPOCH = 1
    VALIDATION_STEPS = 1
    DETECTION_MIN_CONFIDENCE = 0


class ShapesDataset(utils.Dataset):
    """Generates the shapes synthetic dataset: simple shapes on a blank surface, made on the fly."""

    def load_shapes(self, count, height, width):
        self.add_class("shapes", 1, "square")
        self.add_class("shapes", 2, "circle")
        self.add_class("shapes", 3, "triangle")
        for i in range(count):
            bg_color, shapes = self.random_image(height, width)
            self.add_image("shapes", image_id=i, path=None, width=width, height=height,
                           bg_color=bg_color, shapes=shapes)

    def load_image(self, image_id):
        info = self.image_info[image_id]
        bg_color = np.array(info['bg_color']).reshape([1, 1, 3])
        image = np.ones([info['height'], info['width'], 3], dtype=np.uint8)
        image = image * bg_color.astype(np.uint8)
        for shape, color, dims in info['shapes']:
            image = self.draw_shape(image, shape, dims, color)
        return image

    def image_reference(self, image_id):
        info = self.image_info[image_id]
        if info["source"] == "shapes":
            return info["shapes"]
        super(self.__class__).image_reference(self, image_id)

    def load_mask(self, image_id):
        info = self.image_info[image_id]
        shapes = info['shapes']
        count = len(shapes)
        mask = np.zeros([info['height'], info['width'], count], dtype=np.uint8)
        for i, (shape, _, dims) in enumerate(info['shapes']):
            mask[:, :, i:i + 1] = self.draw_shape(mask[:, :, i:i + 1].copy(), shape, dims, 1)
        occlusion = np.logical_not(mask[:, :, -1]).astype(np.uint8)
        for i in range(count - 2, -1, -1):
            mask[:, :, i] = mask[:, :, i] * occlusion
            occlusion = np.logical_and(occlusion, np.logical_not(mask[:, :, i]))
        class_ids = np.array([self.class_names.index(s[0]) for s in shapes])
        return mask.astype(bool), class_ids.astype(np.int32)

    def draw_shape(self, image, shape, dims, color):
        x, y, s = dims
        rows, cols = np.mgrid[:image.shape[0], :image.shape[1]]
        if shape == 'square':
            inside = (abs(cols - x) <= s) & (abs(rows - y) <= s)
        elif shape == "circle":
            inside = (cols - x) ** 2 + (rows - y) ** 2 <= s ** 2
        else:
            inside = (rows >= y - s) & (rows <= y + s * math.sin(math.radians(60))) & \
                     (abs(cols - x) <= (rows - (y - s)) / math.sqrt(3))
        image[inside] = color
        return image

    def random_shape(self, height, width):
        shape = random.choice(["square", "circle", "triangle"])
        color = tuple([random.randint(0, 255) for _ in range(3)])
        buffer = 10
        y = random.randint(buffer, height - buffer - 1)
        x = random.randint(buffer, width - buffer - 1)
        s = random.randint(buffer, height // 4)
        return shape, color, (x, y, s)

    def random_image(self, height, width):
        bg_color = np.array([random.randint(0, 255) for _ in range(3)])
        shapes = []
        for _ in range(random.randint(1, 3)):
            shape, color, dims = self.random_shape(height, width)
            shapes.append((shape, color, dims))
        return bg_color, shapes


def test_matterport_shapes_script_runs_with_changed_imports(tmp_path, capsys):
    random.seed(0)
    torch.manual_seed(0)  # the test's, not the script's: the model's initial weights
    MODEL_DIR = str(tmp_path / "logs")

    config = ShapesConfig()
    config.display()

    dataset_train = ShapesDataset()
    dataset_train.load_shapes(6, config.IMAGE_SHAPE[0], config.IMAGE_SHAPE[1])
    dataset_train.prepare()
    dataset_val = ShapesDataset()
    dataset_val.load_shapes(2, config.IMAGE_SHAPE[0], config.IMAGE_SHAPE[1])
    dataset_val.prepare()

    model = modellib.MaskRCNN(mode="training", config=config, model_dir=MODEL_DIR)
    model.fit(dataset_train, dataset_val, learning_rate=config.LEARNING_RATE, epochs=1, layers='heads')
    augmentation = iaa.RandomHorizontalFlip(0.5)
    model.fit(dataset_train, dataset_val, learning_rate=config.LEARNING_RATE / 10, epochs=2, layers="all",
              augmentation=augmentation)

    class InferenceConfig(ShapesConfig):
        GPU_COUNT = 1
        IMAGES_PER_GPU = 1

    inference_config = InferenceConfig()
    image_id = random.choice(dataset_val.image_ids)
    original_image = dataset_val.load_image(image_id)
    results = model.detect([original_image], verbose=0)
    r = results[0]
    rois, class_ids, scores, masks = r["rois"], r["class_ids"], r["scores"], r["masks"]

    # What the port promises, checked:
    assert inference_config.BATCH_SIZE == 1 and config.NUM_CLASSES == 4 and model.config.images_per_gpu == 2
    assert "NUM_CLASSES" in capsys.readouterr().out  # config.display()
    assert rois.dtype == np.int32 and rois.shape == (len(class_ids), 4) and len(class_ids) > 0
    assert (rois[:, 2] >= rois[:, 0]).all() and (rois[:, 3] >= rois[:, 1]).all()  # (y1, x1, y2, x2)
    assert masks.shape == (64, 64, len(class_ids)) and masks.dtype == bool and scores.dtype == np.float32
    assert set(class_ids.tolist()) <= {1, 2, 3}
    run = model.log_dir
    assert run.parent == tmp_path / "logs" and run.name.startswith("shapes")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r["step"] for r in records if "loss" in r]
    validated = [r for r in records if "val_loss" in r]
    assert max(trained) == 2 and model.epoch == 2  # epochs x STEPS_PER_EPOCH
    assert [r["step"] for r in validated] == [1, 2] and all(np.isfinite(r["val_loss"]) for r in validated)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    reloaded = modellib.MaskRCNN.load(run / "model")
    assert reloaded.class_names == ["BG", "square", "circle", "triangle"]
    again = reloaded.detect([original_image], verbose=1)[0]
    assert np.array_equal(again["rois"], rois)
    assert "Processing 1 images" in capsys.readouterr().out


def test_fit_refuses_what_it_cannot_use(tmp_path):
    import pytest

    from maskrcnn.errors import MaskRCNNError

    config = ShapesConfig()
    dataset = ShapesDataset()
    dataset.load_shapes(2, 64, 64)
    model = modellib.MaskRCNN(mode="training", config=config, model_dir=str(tmp_path))
    with pytest.raises(MaskRCNNError, match="prepare"):
        model.fit(dataset, None, learning_rate=0.01, epochs=1, layers="heads")
    dataset.prepare()

    class FakeImgaug:
        pass
    FakeImgaug.__module__ = "imgaug.augmenters.meta"
    with pytest.raises(MaskRCNNError, match="imgaug pipelines are not supported"):
        model.fit(dataset, None, learning_rate=0.01, epochs=1, layers="heads", augmentation=FakeImgaug())
    with pytest.raises(MaskRCNNError, match="learning_rate"):
        model.fit(dataset, None, learning_rate=0, epochs=1, layers="heads")
