"""Every parameter of the model and its training, in one dataclass.

The field names are Matterport's ``Config`` attributes in lower case, with Matterport's
defaults, grouped by the stage that reads them: run, input, backbone, RPN, heads, detection,
training.  A few extra fields select the numerics of another implementation (torchvision)
inside the same stage; each says which value is whose.

    cfg = Config(num_classes=81)                     # Matterport defaults
    cfg = Config.preset("torchvision", num_classes=91)
    cfg = Config.load("my.yaml"); cfg.save("run/config.yaml")
    cfg = cfg.with_overrides(["learning_rate=0.002"])   # what `--set KEY=VALUE` does

A Matterport config moves over as written: upper-case class attributes of a subclass set the
fields of the same name, and upper-case names read them back.

    class BalloonConfig(Config):
        NAME = "balloon"
        NUM_CLASSES = 1 + 1
        IMAGES_PER_GPU = 1
    cfg = BalloonConfig()        # cfg.num_classes == cfg.NUM_CLASSES == 2, cfg.BATCH_SIZE == 1
    cfg.display()

Every value is checked for type and range when a Config is built, loaded or overridden; a
bad one raises :class:`ConfigError` naming the key and the reason.

Box deltas are written (dy, dx, log dh, log dw) in Matterport's config, so ``rpn_bbox_std_dev``
and ``bbox_std_dev`` keep that order here too; the model converts them where it uses them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import MaskRCNNError


class ConfigError(MaskRCNNError, ValueError):
    """A config key or value that cannot be used; the message names it."""


#: ``mask_batch_bucket`` on CUDA when unset.  The mask head's batch (the positive ROIs) changes
#: with every batch of images and as the RPN learns (72-158 ROIs at 8 images of 800x1066 with 8
#: instances, H200 benchmark); buckets of 32 leave a few shapes for cuDNN to autotune and pad by
#: 16 ROIs on average.
MASK_BATCH_BUCKET_CUDA = 32

#: The five training losses; ``loss_weights`` holds one weight for each.
LOSS_NAMES = ("rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss", "mrcnn_mask_loss")

_HEADS = r"fpn|rpn|box_head|mask_head"
#: Matterport's ``layers=`` training regimes, as regular expressions over the model's parameter
#: names: the one table ``MaskRCNN.set_trainable``, the trainer and ``train --layers`` read.
LAYER_REGIMES = {
    "heads": rf"({_HEADS})\..*",
    "3+": rf"(backbone\.layer[234]|{_HEADS})\..*",
    "4+": rf"(backbone\.layer[34]|{_HEADS})\..*",
    "5+": rf"(backbone\.layer4|{_HEADS})\..*",
    "all": r".*",
}

_CHOICES = {
    "backbone": ("resnet18", "resnet34", "resnet50", "resnet101"),
    "image_resize_mode": ("none", "square", "pad64", "crop", "torchvision"),
    "image_intensity_range": ("percentile", "full"),
    "backbone_style": ("caffe", "pytorch"),
    "rpn_objectness": ("softmax", "sigmoid"),
    "proposal_selection": ("global", "per_level"),
    "roi_pooling": ("crop_and_resize", "roi_align"),
    "box_head": ("conv", "mlp"),
    "detection_mode": ("argmax", "all_classes"),
    "anchor_style": ("matterport", "torchvision"),
    "mask_paste": ("matterport", "torchvision"),
    "cpu_inference_conv": ("winograd", "direct"),
    "lr_schedule": ("step", "cosine", "constant"),
}


@dataclass
class Config:
    # ---- Run ---------------------------------------------------------------------------------
    #: Name of the experiment (Matterport's NAME), saved with the model.
    name: str = "maskrcnn"
    #: Classes, the background (class 0) included.
    num_classes: int = 1
    #: Processes (GPUs) a batch is spread over; ``batch_size`` = images_per_gpu x gpu_count.
    gpu_count: int = 1
    #: Images per forward pass of one process, in training and by default in ``detect``.
    images_per_gpu: int = 2

    # ---- Input: resizing and pixel normalisation (maskrcnn.model.preprocess, data.images) -----
    #: "square": scale, then pad to image_max_dim x image_max_dim; "pad64": scale, then pad to
    #: multiples of 64; "crop": random image_min_dim squares in training; "none"; "torchvision":
    #: short side image_min_dim, long side <= image_max_dim, padded to image_size_divisor.
    image_resize_mode: str = "square"
    #: Short side after scaling (Matterport modes never scale down); 0 = no upscaling.
    image_min_dim: int = 800
    #: Long-side limit; in "square" mode also the side of the padded square.
    image_max_dim: int = 1024
    #: Lower bound on the scale factor; 0 = none.
    image_min_scale: float = 0
    #: Channels of the input images (3 = RGB).
    image_channel_count: int = 3
    #: Per-channel mean subtracted from the pixels, in 0..255 units.
    mean_pixel: tuple[float, ...] = (123.7, 116.8, 103.9)
    #: Per-channel std the pixels are divided by, in 0..255 units; None = no division (Matterport).
    std_pixel: tuple[float, ...] | None = None
    #: Images are padded to a multiple of this in "torchvision" resize mode.
    image_size_divisor: int = 32
    #: 16/32-bit images to uint8: "percentile" stretches each image over its own intensity_percentiles
    #: (microscopy tools' auto-contrast), "full" maps 0..65535 onto 0..255 (maskrcnn.data.images).
    image_intensity_range: str = "percentile"
    #: Low and high percentile of the "percentile" stretch, 0 <= low < high <= 100.
    intensity_percentiles: tuple[float, float] = (0.1, 99.9)

    # ---- Backbone and feature pyramid (maskrcnn.model.backbone) ------------------------------
    #: ResNet depth.
    backbone: str = "resnet101"
    #: "caffe" = stride on the 1x1 convs, conv biases, BN eps 1e-3, TF 'same' max pool
    #: (Matterport); "pytorch" = stride on the 3x3 conv, no conv bias, BN eps 1e-5 (torchvision).
    backbone_style: str = "caffe"
    #: Strides of the pyramid levels P2..P6 in image pixels, one anchor scale each.
    backbone_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    #: Channels of the feature pyramid.
    top_down_pyramid_size: int = 256

    # ---- RPN: anchors, objectness, proposals (maskrcnn.model.anchors, rpn, proposals) --------
    #: Anchor side in pixels, one per pyramid level.
    rpn_anchor_scales: tuple[float, ...] = (32, 64, 128, 256, 512)
    #: Anchor aspect ratios at each position (width/height with anchor_style "matterport").
    rpn_anchor_ratios: tuple[float, ...] = (0.5, 1, 2)
    #: Anchors at every n-th feature-map cell.
    rpn_anchor_stride: int = 1
    #: Anchor shapes: "matterport" (ratio = w/h, float corners) or "torchvision" (ratio = h/w,
    #: rounded corners).
    anchor_style: str = "matterport"
    #: Channels of the RPN's shared 3x3 conv (Matterport 512, torchvision 256).
    rpn_conv_channels: int = 512
    #: "softmax": 2 logits (bg, fg) per anchor (Matterport); "sigmoid": one logit (torchvision).
    rpn_objectness: str = "softmax"
    #: Scale of the RPN's box deltas (dy, dx, log dh, log dw): targets are divided by it.
    rpn_bbox_std_dev: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    #: Highest-scoring anchors kept before NMS (per level with proposal_selection "per_level").
    pre_nms_limit: int = 6000
    #: The same in training; None = pre_nms_limit (Matterport has one limit, torchvision keeps
    #: 2000 in training and 1000 at inference).
    pre_nms_limit_training: int | None = None
    #: IoU above which proposal NMS drops the lower-scored box.
    rpn_nms_threshold: float = 0.7
    #: Proposals kept after NMS, per image, in training.
    post_nms_rois_training: int = 2000
    #: Proposals kept after NMS, per image, at inference.
    post_nms_rois_inference: int = 1000
    #: "global": top pre_nms_limit over all levels, one NMS (Matterport); "per_level": top
    #: pre_nms_limit per level and NMS per level (torchvision).
    proposal_selection: str = "global"
    #: Proposals smaller than this (pixels, either side) are dropped; 0 keeps all (Matterport).
    rpn_min_size: float = 0.0
    #: Upper clamp on log(dw), log(dh) when decoding RPN and head deltas; None = no clamp (Matterport).
    bbox_decode_clip: float | None = None

    # ---- ROI pooling and heads (maskrcnn.model.roi_align, heads) ----------------------------
    #: "crop_and_resize": TF crop_and_resize, one bilinear sample per bin, normalized boxes
    #: (Matterport); "roi_align": torchvision roi_align with roi_sampling_ratio.
    roi_pooling: str = "crop_and_resize"
    #: Samples per bin side for "roi_align"; 0 = adaptive (torchvision's convention).
    roi_sampling_ratio: int = 2
    #: Side of the pooled features of the box head.
    pool_size: int = 7
    #: Side of the pooled features of the mask head.
    mask_pool_size: int = 14
    #: Box head: "conv" = pool-sized conv + BN, 1x1 conv + BN (Matterport); "mlp" = two fully
    #: connected layers without BN (torchvision TwoMLPHead).
    box_head: str = "conv"
    #: Width of the box head's two hidden layers.
    fpn_classif_fc_layers_size: int = 1024
    #: BatchNorm epsilon of the heads (Keras 1e-3).
    head_bn_eps: float = 1e-3
    #: Channels of the mask head's convs (256 in both originals).
    mask_head_channels: int = 256
    #: BatchNorm after each conv of the mask head (Matterport True, torchvision v1 False).
    mask_head_bn: bool = True
    #: Output size of the mask head, twice mask_pool_size.
    mask_shape: tuple[int, int] = (28, 28)
    #: Scale of the head's box deltas (dy, dx, log dh, log dw): targets are divided by it.
    bbox_std_dev: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)

    # ---- Detection: final boxes and masks (maskrcnn.model.detection) ------------------------
    #: "argmax": one detection per ROI, its best class (Matterport); "all_classes": every class
    #: above the score threshold is a candidate (torchvision).
    detection_mode: str = "argmax"
    #: Detections scoring below this are dropped.
    detection_min_confidence: float = 0.7
    #: IoU above which per-class NMS drops the lower-scored detection.
    detection_nms_threshold: float = 0.3
    #: Detections kept per image.
    detection_max_instances: int = 100
    #: Detections smaller than this (pixels, either side) are dropped (torchvision 1e-2).
    detection_min_size: float = 0.0
    #: Full-size mask resampling: "matterport" (bilinear with zero outside, threshold >= 0.5)
    #: or "torchvision" (paste_masks_in_image, threshold > 0.5).
    mask_paste: str = "matterport"
    #: Mask probability at which a pixel belongs to the instance.
    mask_threshold: float = 0.5
    #: 3x3 convolutions of the FPN, RPN and mask head at inference on a CPU: "winograd" (NNPACK's
    #: Winograd transform where it is faster, ~2x on P2/P3; outputs move by ~1e-5 relative) or
    #: "direct" (oneDNN, float32's ordinary sums).  See maskrcnn.model.conv.
    cpu_inference_conv: str = "winograd"

    # ---- Training ----------------------------------------------------------------------------
    # What a training image holds (maskrcnn.data).
    #: Ground-truth instances kept per image (the largest).
    max_gt_instances: int = 100
    #: Store training masks per instance at mini_mask_shape instead of image size (memory).
    use_mini_mask: bool = True
    #: (height, width) of a mini mask.
    mini_mask_shape: tuple[int, int] = (56, 56)
    # Targets and sampling (maskrcnn.model.targets); the IoU thresholds are Matterport's hard-coded values.
    #: Anchors sampled per image for the RPN losses.
    rpn_train_anchors_per_image: int = 256
    #: Anchors with IoU >= this with a ground-truth box are positives.
    rpn_positive_iou: float = 0.7
    #: Anchors whose best IoU is below this are negatives.
    rpn_negative_iou: float = 0.3
    #: Largest share of positives among the sampled anchors.
    rpn_positive_ratio: float = 0.5
    #: Train the heads on the RPN's proposals; False = on random ROIs (Matterport's debugging mode).
    use_rpn_rois: bool = True
    #: ROIs sampled per image for the heads' losses.
    train_rois_per_image: int = 200
    #: Largest share of positives among the sampled ROIs.
    roi_positive_ratio: float = 0.33
    #: ROIs with IoU >= this with a ground-truth box are positives.
    roi_positive_iou: float = 0.5
    #: ROIs whose best IoU is below this are negatives.
    roi_negative_iou: float = 0.5
    #: Pad the mask head's batch of positive ROIs with zero-weight copies up to a multiple of
    #: this, so cuDNN's autotuner (cudnn.benchmark) meets a few batch shapes instead of a new one
    #: every step; losses and gradients are those of the real ROIs.  None = MASK_BATCH_BUCKET_CUDA
    #: on CUDA, 1 (no padding) elsewhere.  Never pads a mask head whose BatchNorm learns.
    mask_batch_bucket: int | None = None
    # Losses and optimiser (maskrcnn.engine.trainer).
    #: Weight of each of the LOSS_NAMES in the total loss.
    loss_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_NAMES, 1.0))
    #: SGD learning rate (Matterport's 0.001; scale with the total batch).
    learning_rate: float = 0.001
    #: SGD momentum.
    learning_momentum: float = 0.9
    #: L2 weight decay.
    weight_decay: float = 0.0001
    #: Gradients are clipped to this global norm.
    gradient_clip_norm: float = 5.0
    #: Train the BatchNorm layers (backbone and heads); False freezes them, as Matterport does
    #: for small batches.
    train_bn: bool = False
    # Schedule (maskrcnn.engine.schedule).
    #: Training steps per epoch of ``MaskRCNN.fit`` (Matterport's STEPS_PER_EPOCH).
    steps_per_epoch: int = 1000
    #: Validation batches at the end of each epoch of ``MaskRCNN.fit``.
    validation_steps: int = 50
    #: Steps over which the learning rate rises linearly to learning_rate.
    warmup_steps: int = 100
    #: Decay after the warm-up: "step" (x lr_gamma at each of lr_steps), "cosine" or "constant".
    lr_schedule: str = "step"
    #: Steps at which the "step" schedule multiplies the learning rate by lr_gamma.
    lr_steps: tuple[int, ...] = ()
    #: Factor of each "step" decay.
    lr_gamma: float = 0.1

    # ------------------------------------------------------------------------------------------
    def __init_subclass__(cls, **kwargs):
        """Matterport-style subclasses: ``NUM_CLASSES = 2`` in the class body becomes the
        subclass's default for ``num_classes``; an upper-case name that is no field is an error."""
        super().__init_subclass__(**kwargs)
        hints = _field_types(next(base for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)))
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for attr, value in list(vars(cls).items()):
            key = attr.lower()
            if not _is_setting(attr, value, hints) or (attr.islower() and attr in annotations):
                continue
            delattr(cls, attr)
            annotations.pop(attr, None)
            if key in _IGNORED:
                _warn_ignored(key, value, f"{cls.__name__}.{attr}")
                continue
            if key in _DERIVED:
                raise ConfigError(f"{cls.__name__}.{attr}: derived from other values ({_DERIVED[key]}); set those")
            if key not in hints:
                raise ConfigError(f"{cls.__name__}.{attr}: not a config value (no field {key!r})")
            if key == "train_bn" and value is None:
                value = True  # Matterport's TRAIN_BN = None: "train BN layers, the normal mode"
            value = _plain(value)
            annotations[key] = hints[key]
            setattr(cls, key, field(default_factory=lambda v=value: dict(v)) if isinstance(value, dict) else value)
        cls.__annotations__ = annotations
        dataclass(cls)

    def __post_init__(self):
        self.validate()

    def __getattr__(self, name: str):
        # Matterport code reads config.NUM_CLASSES, config.BATCH_SIZE: upper case = the field.
        if name.isupper() and (name.lower() in _field_types(type(self)) or name.lower() in _DERIVED):
            return getattr(self, name.lower())
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value):
        if name.isupper():
            if name.lower() not in _field_types(type(self)):
                raise ConfigError(f"{name}: not a config value (no field {name.lower()!r})")
            object.__setattr__(self, name.lower(), value)
            self.validate()
        else:
            object.__setattr__(self, name, value)

    # ---- Derived values, as in Matterport ------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.images_per_gpu * self.gpu_count

    @property
    def image_shape(self) -> tuple:
        if self.image_resize_mode == "crop":
            return (self.image_min_dim, self.image_min_dim, self.image_channel_count)
        return (self.image_max_dim, self.image_max_dim, self.image_channel_count)

    @property
    def image_meta_size(self) -> int:
        return 1 + 3 + 3 + 4 + 1 + self.num_classes

    @property
    def box_frame(self) -> str:
        """Coordinate frame of the boxes between the stages: "normalized" (Matterport,
        ``(y1, x1, y2-1, x2-1) / (H-1, W-1)`` of the molded image) when pooling with
        crop_and_resize, else "pixel" (corners in molded-image pixels)."""
        return "normalized" if self.roi_pooling == "crop_and_resize" else "pixel"

    # ---- Validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every value's type and range (lists become tuples); raise ConfigError naming
        the first invalid key and why."""
        for key, hint in _field_types(type(self)).items():
            value = _plain(getattr(self, key))
            _check_type(key, value, hint)
            object.__setattr__(self, key, value)
            if key in _CHOICES and value not in _CHOICES[key]:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(_CHOICES[key])}")
            if key in _RANGES and value is not None:
                ok, limit = _RANGES[key]
                numbers = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
                if not all(ok(v) for v in numbers):
                    each = ", each" if isinstance(value, (tuple, dict)) else ""
                    what, null = _describe(hint).removesuffix(" or null"), _describe(hint).endswith(" or null")
                    raise ConfigError(f"{key}={value!r} must be {what}{each} {limit}{' or null' if null else ''}")
        self._check_consistency()

    def _check_consistency(self) -> None:
        """The checks that relate two or more values."""
        if len(self.rpn_anchor_scales) != len(self.backbone_strides):
            raise ConfigError("rpn_anchor_scales must have one scale per backbone stride "
                              f"({len(self.rpn_anchor_scales)} vs {len(self.backbone_strides)})")
        for key in ("mean_pixel",) + (("std_pixel",) if self.std_pixel is not None else ()):
            if len(getattr(self, key)) != self.image_channel_count:
                raise ConfigError(f"{key} must have image_channel_count={self.image_channel_count} values")
        if self.mask_shape != (2 * self.mask_pool_size, 2 * self.mask_pool_size):
            raise ConfigError(f"mask_shape={self.mask_shape!r} must be twice mask_pool_size={self.mask_pool_size}")
        if self.image_resize_mode == "pad64" and self.image_min_dim % 64:
            raise ConfigError(f"image_min_dim={self.image_min_dim} must be a multiple of 64 for pad64 "
                              "(as Matterport's resize_image asserts)")
        if self.image_resize_mode == "square" and self.image_max_dim % 64:
            raise ConfigError(f"image_max_dim={self.image_max_dim} must be a multiple of 64 "
                              "(the image is halved 6 times)")
        wrong = set(self.loss_weights) ^ set(LOSS_NAMES)
        if wrong:
            raise ConfigError(f"loss_weights must name exactly the five losses ({', '.join(LOSS_NAMES)}); "
                              f"check {sorted(wrong)}")
        low, high = self.intensity_percentiles
        if not 0 <= low < high <= 100:
            raise ConfigError(f"intensity_percentiles={self.intensity_percentiles!r} must be two numbers "
                              "0 <= low < high <= 100")

    # ---- Presets -----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str = "matterport", **overrides) -> "Config":
        """A config with the numerics of ``name`` ("matterport" or "torchvision"), then
        ``overrides`` applied.  "torchvision" reproduces ``maskrcnn_resnet50_fpn`` (v1)."""
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r} is not one of {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls.from_dict(values)

    # ---- Serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every field, tuples as lists (what save writes)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """A config from ``{key: value}``; keys in either case (Matterport's display dump works),
        derived values (BATCH_SIZE, ...) skipped, unknown keys a ConfigError naming them."""
        known = _field_types(cls)
        values = {}
        for key, value in d.items():
            k = str(key).lower()
            if k in _DERIVED:
                continue
            if k in _IGNORED:
                _warn_ignored(k, value, key)
                continue
            if k not in known:
                raise ConfigError(f"unknown config key {key!r}")
            values[k] = value
        return cls(**values)

    def replace(self, **overrides) -> "Config":
        """A copy with ``overrides`` (field names) applied and checked."""
        return type(self).from_dict({**self.to_dict(), **overrides})

    def save(self, path) -> None:
        """Write every field as YAML, or JSON for a ``.json`` path (atomically)."""
        from .utils import atomic_write_bytes

        path = Path(path)
        text = (json.dumps(self.to_dict(), indent=1) if path.suffix == ".json"
                else _yaml().safe_dump(self.to_dict(), sort_keys=True))
        atomic_write_bytes(path, text.encode())

    @classmethod
    def load(cls, path) -> "Config":
        """Read a config saved by :meth:`save` (or any YAML/JSON mapping of its keys)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (a config is YAML or JSON)") from None
        try:
            d = json.loads(text) if path.suffix == ".json" else _yaml_load(text)
        except Exception as e:
            raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                              f"({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping of keys to values")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def with_overrides(self, assignments: list[str]) -> "Config":
        """A copy with ``KEY=VALUE`` strings applied, values parsed as YAML (``--set
        num_classes=3``, ``--set rpn_anchor_scales=[8,16,32,64,128]``)."""
        known = _field_types(type(self))
        overrides = {}
        for a in assignments:
            key, sep, text = a.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"--set {a!r}: expected KEY=VALUE")
            try:
                value = _yaml_load(text)
            except Exception as e:
                raise ConfigError(f"{key}={text!r}: not a valid value ({str(e).splitlines()[0]})") from None
            if known.get(key.lower()) is str and isinstance(value, (bool, int, float)):
                value = text  # --set name=2024 means the text
            overrides[key] = value
        return type(self).from_dict({**self.to_dict(), **overrides})

    def display(self, file=None) -> None:
        """Print every value under its Matterport (upper-case) name, as Matterport's does."""
        names = sorted([*_field_types(type(self)), *_DERIVED], key=str.upper)
        lines = [f"{name.upper():30} {getattr(self, name)}" for name in names]
        print("\nConfigurations:\n" + "\n".join(lines) + "\n\n", file=file or sys.stdout)


# ---- Value checks ------------------------------------------------------------------------------
#: Matterport's attributes computed from others (read-only here).
_DERIVED = {"batch_size": "IMAGES_PER_GPU x GPU_COUNT",
            "image_shape": "IMAGE_MAX_DIM or IMAGE_MIN_DIM, IMAGE_CHANNEL_COUNT",
            "image_meta_size": "NUM_CLASSES"}
#: Matterport's names accepted and not used, with why.
_IGNORED = {"compute_backbone_shape": "the model computes the pyramid's shapes from the backbone itself"}

_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
#: The allowed range of each numeric value (of each element for lists and mappings).
_RANGES = {
    **dict.fromkeys(("num_classes", "gpu_count", "images_per_gpu", "image_max_dim", "image_channel_count",
                     "image_size_divisor", "backbone_strides", "top_down_pyramid_size",
                     "rpn_anchor_scales", "rpn_anchor_ratios", "rpn_anchor_stride", "rpn_conv_channels",
                     "rpn_bbox_std_dev", "pre_nms_limit", "post_nms_rois_training", "post_nms_rois_inference",
                     "bbox_decode_clip", "pool_size", "mask_pool_size", "fpn_classif_fc_layers_size",
                     "head_bn_eps", "mask_head_channels", "mask_shape", "bbox_std_dev", "std_pixel",
                     "detection_max_instances", "max_gt_instances", "mini_mask_shape", "pre_nms_limit_training",
                     "rpn_train_anchors_per_image", "train_rois_per_image", "mask_batch_bucket", "learning_rate",
                     "gradient_clip_norm", "steps_per_epoch", "lr_gamma"), _POSITIVE),
    **dict.fromkeys(("image_min_dim", "image_min_scale", "rpn_min_size", "roi_sampling_ratio",
                     "detection_min_size", "loss_weights", "weight_decay", "validation_steps", "warmup_steps",
                     "lr_steps"), _NON_NEGATIVE),
    **dict.fromkeys(("rpn_nms_threshold", "detection_min_confidence", "detection_nms_threshold", "mask_threshold",
                     "rpn_positive_iou", "rpn_negative_iou", "rpn_positive_ratio", "roi_positive_ratio",
                     "roi_positive_iou", "roi_negative_iou", "learning_momentum"), _FRACTION),
}


def _field_types(cls) -> dict:
    """{field name: its type} of a Config class (annotations resolved), cached per class."""
    cached = cls.__dict__.get("_types")
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = {f.name: hints[f.name] for f in fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if dataclasses.is_dataclass(cls):
            type.__setattr__(cls, "_types", cached)
    return cached


def _is_setting(attr: str, value, hints: dict) -> bool:
    """Whether a class attribute of a subclass is meant as a config value: an upper-case
    name (Matterport's style), or a field's own name given a plain value."""
    if attr.startswith("_") or isinstance(value, (classmethod, staticmethod, property)):
        return False
    return attr.isupper() or (attr in hints and not callable(value))


def _warn_ignored(key: str, value, where) -> None:
    if value is not None:  # None is Matterport's default: "derive it", which is what happens
        warnings.warn(f"{where} is ignored: {_IGNORED[key]}", stacklevel=3)


def _plain(value):
    """Lists, NumPy arrays and scalars as plain Python tuples, ints and floats."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _describe(hint) -> str:
    """What a value of type ``hint`` is, in words ("a list of 2 integers")."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _describe(next(a for a in args if a is not type(None))) + " or null"
    if typing.get_origin(hint) is tuple:
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a list of {count}{_describe(args[0]).split(' ', 1)[1]}s"
    if typing.get_origin(hint) is dict:
        return "a mapping of names to numbers"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[hint]


def _is_type(value, hint) -> bool:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return value is None or any(_is_type(value, a) for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, tuple) or (args[-1] is not Ellipsis and len(value) != len(args)):
            return False
        return all(_is_type(v, args[0]) for v in value)
    if typing.get_origin(hint) is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _is_type(v, args[1]) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_type(key: str, value, hint) -> None:
    if not _is_type(value, hint):
        raise ConfigError(f"{key}={value!r} must be {_describe(hint)}")


def _yaml():
    import yaml
    return yaml


def _yaml_load(text: str):
    """YAML with 1e-3 read as a number (YAML 1.1, PyYAML's default, reads it as text)."""
    return _yaml().load(text, Loader=_loader())


@functools.cache
def _loader():
    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


PRESETS: dict[str, dict] = {
    "matterport": {},
    "torchvision": dict(
        backbone="resnet50",
        backbone_style="pytorch",
        image_resize_mode="torchvision",
        image_min_dim=800,
        image_max_dim=1333,
        mean_pixel=(0.485 * 255, 0.456 * 255, 0.406 * 255),
        std_pixel=(0.229 * 255, 0.224 * 255, 0.225 * 255),
        rpn_conv_channels=256,
        rpn_objectness="sigmoid",
        anchor_style="torchvision",
        proposal_selection="per_level",
        pre_nms_limit=1000,
        pre_nms_limit_training=2000,
        post_nms_rois_inference=1000,
        post_nms_rois_training=2000,
        rpn_min_size=1e-3,
        rpn_bbox_std_dev=(1.0, 1.0, 1.0, 1.0),
        bbox_std_dev=(0.1, 0.1, 0.2, 0.2),
        bbox_decode_clip=math.log(1000.0 / 16),
        roi_pooling="roi_align",
        roi_sampling_ratio=2,
        box_head="mlp",
        mask_head_bn=False,
        detection_mode="all_classes",
        detection_min_confidence=0.05,
        detection_nms_threshold=0.5,
        detection_min_size=1e-2,
        mask_paste="torchvision",
        train_rois_per_image=512,
        roi_positive_ratio=0.25,
        use_mini_mask=False,
    ),
}
