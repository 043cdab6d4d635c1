"""Config: Matterport-style subclasses, display(), every value checked for type and range, the
key check shared by from_dict / load / with_overrides, and save/load of subclasses."""
import inspect
import json
import re
import warnings

import numpy as np
import pytest

import maskrcnn
from maskrcnn import Config, ConfigError
from maskrcnn.config import LOSS_NAMES

#: Every attribute of Matterport's mrcnn/config.py Config with its default (NAME aside: None there).
MATTERPORT_DEFAULTS = dict(
    GPU_COUNT=1, IMAGES_PER_GPU=2, STEPS_PER_EPOCH=1000, VALIDATION_STEPS=50, BACKBONE="resnet101",
    COMPUTE_BACKBONE_SHAPE=None, BACKBONE_STRIDES=[4, 8, 16, 32, 64], FPN_CLASSIF_FC_LAYERS_SIZE=1024,
    TOP_DOWN_PYRAMID_SIZE=256, NUM_CLASSES=1, RPN_ANCHOR_SCALES=(32, 64, 128, 256, 512),
    RPN_ANCHOR_RATIOS=[0.5, 1, 2], RPN_ANCHOR_STRIDE=1, RPN_NMS_THRESHOLD=0.7, RPN_TRAIN_ANCHORS_PER_IMAGE=256,
    PRE_NMS_LIMIT=6000, POST_NMS_ROIS_TRAINING=2000, POST_NMS_ROIS_INFERENCE=1000, USE_MINI_MASK=True,
    MINI_MASK_SHAPE=(56, 56), IMAGE_RESIZE_MODE="square", IMAGE_MIN_DIM=800, IMAGE_MAX_DIM=1024,
    IMAGE_MIN_SCALE=0, IMAGE_CHANNEL_COUNT=3, MEAN_PIXEL=np.array([123.7, 116.8, 103.9]),
    TRAIN_ROIS_PER_IMAGE=200, ROI_POSITIVE_RATIO=0.33, POOL_SIZE=7, MASK_POOL_SIZE=14, MASK_SHAPE=[28, 28],
    MAX_GT_INSTANCES=100, RPN_BBOX_STD_DEV=np.array([0.1, 0.1, 0.2, 0.2]),
    BBOX_STD_DEV=np.array([0.1, 0.1, 0.2, 0.2]), DETECTION_MAX_INSTANCES=100, DETECTION_MIN_CONFIDENCE=0.7,
    DETECTION_NMS_THRESHOLD=0.3, LEARNING_RATE=0.001, LEARNING_MOMENTUM=0.9, WEIGHT_DECAY=0.0001,
    LOSS_WEIGHTS={"rpn_class_loss": 1., "rpn_bbox_loss": 1., "mrcnn_class_loss": 1., "mrcnn_bbox_loss": 1.,
                  "mrcnn_mask_loss": 1.},
    USE_RPN_ROIS=True, TRAIN_BN=False, GRADIENT_CLIP_NORM=5.0)


class BalloonConfig(maskrcnn.Config):
    """Matterport's balloon sample config, as written there."""
    NAME = "balloon"
    IMAGES_PER_GPU = 2
    NUM_CLASSES = 1 + 1
    STEPS_PER_EPOCH = 100
    DETECTION_MIN_CONFIDENCE = 0.9


class InferenceConfig(BalloonConfig):
    GPU_COUNT = 1
    IMAGES_PER_GPU = 1


# ---- Matterport-style subclasses ----------------------------------------------------------------
def test_matterport_subclass_sets_the_fields():
    c = BalloonConfig()
    assert (c.name, c.num_classes, c.images_per_gpu, c.steps_per_epoch, c.detection_min_confidence) == \
        ("balloon", 2, 2, 100, 0.9)
    assert c.backbone == "resnet101" and c.learning_rate == 0.001  # the rest are the defaults
    # upper-case reads, derived values included, as Matterport code does
    assert (c.NUM_CLASSES, c.BATCH_SIZE, c.IMAGE_SHAPE, c.IMAGE_META_SIZE) == (2, 2, (1024, 1024, 3), 14)
    i = InferenceConfig()
    assert (i.name, i.num_classes, i.images_per_gpu, i.BATCH_SIZE) == ("balloon", 2, 1, 1)
    # explicit values win over the class's
    assert BalloonConfig(num_classes=5).num_classes == 5
    assert BalloonConfig.from_dict({"NUM_CLASSES": 3}).NUM_CLASSES == 3
    # the example: no longer silently a 1-class model with a batch of 2
    class C(maskrcnn.Config):
        NAME = "x"
        NUM_CLASSES = 2
        IMAGES_PER_GPU = 1
    assert (C().num_classes, C().images_per_gpu) == (2, 1)


def test_every_matterport_attribute_maps_to_its_field_with_matterports_default():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # COMPUTE_BACKBONE_SHAPE = None is Matterport's default: no warning
        Matterport = type("Matterport", (Config,), dict(MATTERPORT_DEFAULTS))
    assert Matterport().to_dict() == Config().to_dict()
    for attr, value in MATTERPORT_DEFAULTS.items():
        if attr != "COMPUTE_BACKBONE_SHAPE":
            expected = tuple(value.tolist()) if isinstance(value, np.ndarray) else value
            got = getattr(Config(), attr)
            assert (tuple(got) == tuple(expected)) if isinstance(got, tuple) else got == expected, attr


def test_subclass_numpy_values_and_train_bn_none():
    class C(Config):
        MEAN_PIXEL = np.array([10.0, 20.0, 30.0])
        RPN_ANCHOR_SCALES = np.array([8, 16, 32, 64, 128])
        TRAIN_BN = None  # Matterport: None = train the BN layers
        LOSS_WEIGHTS = dict.fromkeys(LOSS_NAMES, 2.0)
    c = C()
    assert c.mean_pixel == (10.0, 20.0, 30.0) and type(c.rpn_anchor_scales[0]) is int
    assert c.train_bn is True and c.loss_weights == dict.fromkeys(LOSS_NAMES, 2.0)
    c.loss_weights["rpn_class_loss"] = 5.0
    assert C().loss_weights["rpn_class_loss"] == 2.0  # each instance has its own dict


def test_subclass_errors_name_the_attribute():
    with pytest.raises(ConfigError, match=r"^C\.NUM_CLASSSES: not a config value"):
        class C(Config):
            NUM_CLASSSES = 3
    with pytest.raises(ConfigError, match=r"^D\.BATCH_SIZE: derived from other values \(IMAGES_PER_GPU x GPU_COUNT\)"):
        class D(Config):
            BATCH_SIZE = 4

    class E(Config):
        NUM_CLASSES = "2"
    with pytest.raises(ConfigError, match=r"^num_classes='2' must be an integer"):
        E()


def test_compute_backbone_shape_is_accepted_with_one_warning():
    with pytest.warns(UserWarning, match="F.COMPUTE_BACKBONE_SHAPE is ignored: the model computes"):
        class F(Config):
            COMPUTE_BACKBONE_SHAPE = len
    assert "compute_backbone_shape" not in F().to_dict()
    with pytest.warns(UserWarning, match="is ignored"):
        Config.from_dict({"compute_backbone_shape": "resnet_shapes"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Config.from_dict({"COMPUTE_BACKBONE_SHAPE": None, "BATCH_SIZE": 2, "IMAGE_SHAPE": [1024, 1024, 3]})


def test_upper_case_assignment_sets_and_checks_the_field():
    c = BalloonConfig()
    c.DETECTION_MIN_CONFIDENCE = 0.5
    assert c.detection_min_confidence == 0.5
    with pytest.raises(ConfigError, match="detection_min_confidence=2 must be a finite number in"):
        c.DETECTION_MIN_CONFIDENCE = 2
    with pytest.raises(ConfigError, match="NO_SUCH_THING: not a config value"):
        c.NO_SUCH_THING = 1
    with pytest.raises(AttributeError):
        c.NOT_THERE


def test_display_prints_matterport_names_and_values(capsys):
    BalloonConfig().display()
    out = capsys.readouterr().out
    assert out.startswith("\nConfigurations:\n") and out.endswith("\n\n\n")
    lines = out.strip().splitlines()[1:]
    names = [line.split()[0] for line in lines]
    assert names == sorted(names)
    for expected in ("NAME                           balloon", "NUM_CLASSES                    2",
                     "BATCH_SIZE                     2", "IMAGE_SHAPE                    (1024, 1024, 3)",
                     "IMAGE_META_SIZE                14", "STEPS_PER_EPOCH                100",
                     "DETECTION_MIN_CONFIDENCE       0.9"):
        assert expected in lines
    assert len(lines) == len(Config().to_dict()) + 3


def test_subclass_saves_loads_and_overrides_as_itself(tmp_path):
    c = InferenceConfig()
    for name in ("c.yaml", "c.json"):
        c.save(tmp_path / name)
        back = InferenceConfig.load(tmp_path / name)
        assert back == c and type(back) is InferenceConfig
        assert Config.load(tmp_path / name).to_dict() == c.to_dict()
    changed = c.with_overrides(["detection_min_confidence=0.8", "NUM_CLASSES=3"])
    assert type(changed) is InferenceConfig and changed.detection_min_confidence == 0.8 and changed.num_classes == 3
    assert c.replace(images_per_gpu=4).BATCH_SIZE == 4 and c.images_per_gpu == 1


def test_matterport_display_dump_loads():
    """A dict of Matterport's upper-case names, derived values included (the parity fixture's form)."""
    dump = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in MATTERPORT_DEFAULTS.items()}
    dump.update(NAME="parity", NUM_CLASSES=4, BATCH_SIZE=2, IMAGE_SHAPE=[1024, 1024, 3], IMAGE_META_SIZE=16)
    c = Config.from_dict(json.loads(json.dumps(dump)))
    assert (c.name, c.num_classes) == ("parity", 4)


# ---- Value checks ---------------------------------------------------------------------------------
BAD_VALUES = [
    ("learning_rate=nan", "learning_rate='nan' must be a finite number"),
    ("learning_rate=.nan", "learning_rate=nan must be a finite number"),
    ("learning_rate=.inf", "learning_rate=inf must be a finite number"),
    ("learning_rate=abc", "learning_rate='abc' must be a finite number"),
    ("learning_rate=-1", "learning_rate=-1 must be a finite number > 0"),
    ("learning_rate=0", "learning_rate=0 must be a finite number > 0"),
    ("train_bn=maybe", "train_bn='maybe' must be true or false"),
    ("train_bn=1", "train_bn=1 must be true or false"),
    ("images_per_gpu=true", "images_per_gpu=True must be an integer"),
    ("images_per_gpu='2'", "images_per_gpu='2' must be an integer"),
    ("images_per_gpu=1.5", "images_per_gpu=1.5 must be an integer"),
    ("images_per_gpu=0", "images_per_gpu=0 must be an integer > 0"),
    ("steps_per_epoch=-5", "steps_per_epoch=-5 must be an integer > 0"),
    ("validation_steps=-1", "validation_steps=-1 must be an integer >= 0"),
    ("rpn_anchor_scales=5", "rpn_anchor_scales=5 must be a list of finite numbers"),
    ("rpn_anchor_scales=[8,16,32,64,-1]", "rpn_anchor_scales=(8, 16, 32, 64, -1) must be a list of finite numbers, each > 0"),
    ("mini_mask_shape=[56]", "mini_mask_shape=(56,) must be a list of 2 integers"),
    ("mini_mask_shape=[56,a]", "mini_mask_shape=(56, 'a') must be a list of 2 integers"),
    ("bbox_std_dev=[0.1,0.1,0.2]", "bbox_std_dev=(0.1, 0.1, 0.2) must be a list of 4 finite numbers"),
    ("detection_min_confidence=1.5", "detection_min_confidence=1.5 must be a finite number in [0, 1]"),
    ("lr_steps=[100,-1]", "lr_steps=(100, -1) must be a list of integers, each >= 0"),
    ("bbox_decode_clip=-1", "bbox_decode_clip=-1 must be a finite number > 0 or null"),
    ("std_pixel=[1,2]", "std_pixel must have image_channel_count=3 values"),
    ("backbone=resnet7", "backbone='resnet7' is not one of resnet18, resnet34, resnet50, resnet101"),
    ("name=", "name=None must be a string"),
    ("loss_weights={rpn_class_loss: 1}", "loss_weights must name exactly the five losses"),
    ("loss_weights=3", "loss_weights=3 must be a mapping of names to numbers"),
    ("rpn_anchor_scales=[1,2", "rpn_anchor_scales='[1,2': not a valid value"),
    ("nope=1", "unknown config key 'nope'"),
    ("learning_rate", "--set 'learning_rate': expected KEY=VALUE"),
    ("=3", "--set '=3': expected KEY=VALUE"),
]


@pytest.mark.parametrize("assignment, message", BAD_VALUES)
def test_bad_value_is_one_line_naming_the_key(assignment, message):
    with pytest.raises(ConfigError) as e:
        Config().with_overrides([assignment])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_loss_weights_must_be_non_negative_numbers():
    with pytest.raises(ConfigError, match="loss_weights=.* must be a mapping of names to numbers, each >= 0"):
        Config(loss_weights=dict(dict.fromkeys(LOSS_NAMES, 1.0), mrcnn_mask_loss=-1.0))


def test_values_are_checked_when_built_and_loaded(tmp_path):
    with pytest.raises(ConfigError, match="learning_rate=nan must be a finite number"):
        Config(learning_rate=float("nan"))
    with pytest.raises(ConfigError, match="use_mini_mask='yes please' must be true or false"):
        Config(use_mini_mask="yes please")
    (tmp_path / "bad.yaml").write_text("num_classes: 3\nlearning_rate: -0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: learning_rate=-0\.1 must be a finite number > 0"):
        Config.load(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text('{"train_bn": "maybe"}')
    with pytest.raises(ConfigError, match=r"bad\.json: train_bn='maybe' must be true or false"):
        Config.load(tmp_path / "bad.json")


def test_yaml_values_read_as_meant(tmp_path):
    c = Config().with_overrides(["learning_rate=1e-3", "weight_decay=5E-5", "name=2024", "train_bn=yes",
                                 "RPN_ANCHOR_SCALES=[8, 16, 32, 64, 128]", "lr_steps=[]"])
    assert (c.learning_rate, c.weight_decay, c.name, c.train_bn, c.rpn_anchor_scales, c.lr_steps) == \
        (0.001, 5e-05, "2024", True, (8, 16, 32, 64, 128), ())
    (tmp_path / "c.yaml").write_text("learning_rate: 2e-3\n")
    assert Config.load(tmp_path / "c.yaml").learning_rate == 0.002
    # later assignments win
    assert Config().with_overrides(["num_classes=3", "num_classes=5"]).num_classes == 5


# ---- Layout -----------------------------------------------------------------------------------------
def test_every_field_has_a_comment():
    """Each field is preceded by its own comment line (``#: ...``)."""
    source = inspect.getsource(Config).splitlines()
    fields = [f.name for f in Config.__dataclass_fields__.values()]
    for name in fields:
        index = next(i for i, line in enumerate(source) if re.match(rf"\s+{name}: ", line))
        assert source[index - 1].strip().startswith("#"), f"{name} has no comment"


def test_loss_weights_default_names_the_five_losses():
    assert tuple(Config().loss_weights) == LOSS_NAMES
