"""Every parameter of the model and its training, in one dataclass.

The field names are Matterport's ``Config`` attributes in lower case, with Matterport's
defaults.  A few extra fields select the numerics of another implementation (torchvision)
inside the same pipeline: they are grouped at the end and documented one by one.

    cfg = Config(num_classes=81)                     # Matterport defaults
    cfg = Config.preset("torchvision", num_classes=91)
    cfg = Config.load("my.yaml"); cfg.save("run/config.yaml")

Box deltas are written (dy, dx, log dh, log dw) in Matterport's config, so ``rpn_bbox_std_dev``
and ``bbox_std_dev`` keep that order here too; the model converts them where it uses them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


from .errors import MaskRCNNError


class ConfigError(MaskRCNNError, ValueError):
    """A config key or value that cannot be used; the message names it."""


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
    "lr_schedule": ("step", "cosine", "constant"),
}


@dataclass
class Config:
    # ---- Matterport's Config, lower-cased, same defaults -------------------------------
    name: str = "maskrcnn"
    gpu_count: int = 1
    images_per_gpu: int = 2
    steps_per_epoch: int = 1000
    validation_steps: int = 50
    backbone: str = "resnet101"
    compute_backbone_shape: Any = None
    backbone_strides: tuple = (4, 8, 16, 32, 64)
    fpn_classif_fc_layers_size: int = 1024
    top_down_pyramid_size: int = 256
    num_classes: int = 1
    rpn_anchor_scales: tuple = (32, 64, 128, 256, 512)
    rpn_anchor_ratios: tuple = (0.5, 1, 2)
    rpn_anchor_stride: int = 1
    rpn_nms_threshold: float = 0.7
    rpn_train_anchors_per_image: int = 256
    pre_nms_limit: int = 6000
    post_nms_rois_training: int = 2000
    post_nms_rois_inference: int = 1000
    use_mini_mask: bool = True
    mini_mask_shape: tuple = (56, 56)
    image_resize_mode: str = "square"
    image_min_dim: int = 800
    image_max_dim: int = 1024
    image_min_scale: float = 0
    image_channel_count: int = 3
    mean_pixel: tuple = (123.7, 116.8, 103.9)
    # 16/32-bit images to uint8: "percentile" stretches each image over its own intensity_percentiles
    # (microscopy tools' auto-contrast), "full" maps 0..65535 onto 0..255 (maskrcnn.data.images).
    image_intensity_range: str = "percentile"
    intensity_percentiles: tuple = (0.1, 99.9)
    train_rois_per_image: int = 200
    roi_positive_ratio: float = 0.33
    pool_size: int = 7
    mask_pool_size: int = 14
    mask_shape: tuple = (28, 28)
    max_gt_instances: int = 100
    rpn_bbox_std_dev: tuple = (0.1, 0.1, 0.2, 0.2)
    bbox_std_dev: tuple = (0.1, 0.1, 0.2, 0.2)
    detection_max_instances: int = 100
    detection_min_confidence: float = 0.7
    detection_nms_threshold: float = 0.3
    learning_rate: float = 0.001
    learning_momentum: float = 0.9
    weight_decay: float = 0.0001
    loss_weights: dict = field(default_factory=lambda: {
        "rpn_class_loss": 1.0, "rpn_bbox_loss": 1.0, "mrcnn_class_loss": 1.0,
        "mrcnn_bbox_loss": 1.0, "mrcnn_mask_loss": 1.0})
    use_rpn_rois: bool = True
    train_bn: bool = False
    gradient_clip_norm: float = 5.0

    # ---- Numerics of other implementations (Matterport values by default) --------------
    #: Backbone: "caffe" = stride on the 1x1 convs, conv biases, BN eps 1e-3, TF 'same' max pool
    #: (Matterport); "pytorch" = stride on the 3x3 conv, no conv bias, BN eps 1e-5 (torchvision).
    backbone_style: str = "caffe"
    #: Channels of the RPN's shared 3x3 conv (Matterport 512, torchvision 256).
    rpn_conv_channels: int = 512
    #: "softmax": 2 logits (bg, fg) per anchor; "sigmoid": one objectness logit per anchor.
    rpn_objectness: str = "softmax"
    #: Anchor shapes: "matterport" (ratio = w/h, float corners) or "torchvision" (ratio = h/w,
    #: rounded corners).
    anchor_style: str = "matterport"
    #: "global": top ``pre_nms_limit`` over all levels, one NMS; "per_level": top
    #: ``pre_nms_limit`` per level and NMS per level (torchvision).
    proposal_selection: str = "global"
    #: Proposals smaller than this (pixels, either side) are dropped; 0 keeps all (Matterport).
    rpn_min_size: float = 0.0
    #: Upper clamp on log(dw), log(dh) when decoding boxes; None = no clamp (Matterport).
    bbox_decode_clip: Any = None
    #: "crop_and_resize": TF crop_and_resize, one bilinear sample per bin, normalized boxes
    #: (Matterport); "roi_align": torchvision roi_align with ``roi_sampling_ratio``.
    roi_pooling: str = "crop_and_resize"
    roi_sampling_ratio: int = 2
    #: Box head: "conv" = pool-sized conv + BN, 1x1 conv + BN (Matterport); "mlp" = two
    #: fully connected layers without BN (torchvision TwoMLPHead).
    box_head: str = "conv"
    #: Channels of the mask head's convs (256 in both originals).
    mask_head_channels: int = 256
    #: BatchNorm after each conv of the mask head (Matterport True, torchvision v1 False).
    mask_head_bn: bool = True
    #: BatchNorm epsilon of the heads (Keras 1e-3).
    head_bn_eps: float = 1e-3
    #: "argmax": one detection per ROI, its best class (Matterport); "all_classes": every
    #: class above the score threshold is a candidate (torchvision).
    detection_mode: str = "argmax"
    #: Detections smaller than this (pixels, either side) are dropped (torchvision 1e-2).
    detection_min_size: float = 0.0
    #: Per-channel std of the pixels, in 0..255 units; None = no division (Matterport).
    std_pixel: Any = None
    #: Images are padded to a multiple of this in "torchvision" resize mode.
    image_size_divisor: int = 32
    #: Full-size mask resampling: "matterport" (bilinear with zero outside, threshold >= 0.5)
    #: or "torchvision" (paste_masks_in_image, threshold > 0.5).
    mask_paste: str = "matterport"
    mask_threshold: float = 0.5
    #: RPN and detection-target matching thresholds (Matterport's hard-coded values).
    rpn_positive_iou: float = 0.7
    rpn_negative_iou: float = 0.3
    rpn_positive_ratio: float = 0.5
    roi_positive_iou: float = 0.5
    roi_negative_iou: float = 0.5

    # ---- Training schedule ---------------------------------------------------------------
    warmup_steps: int = 100
    lr_schedule: str = "step"
    lr_steps: tuple = ()
    lr_gamma: float = 0.1

    # ------------------------------------------------------------------------------------
    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        self.validate()

    # Derived values, as in Matterport.
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

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid value."""
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {', '.join(choices)}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ConfigError(f"num_classes={self.num_classes!r} must be an integer >= 1 (background included)")
        if len(self.rpn_anchor_scales) != len(self.backbone_strides):
            raise ConfigError("rpn_anchor_scales must have one scale per backbone stride "
                              f"({len(self.rpn_anchor_scales)} vs {len(self.backbone_strides)})")
        for key in ("rpn_bbox_std_dev", "bbox_std_dev"):
            v = getattr(self, key)
            if len(v) != 4 or any(s <= 0 for s in v):
                raise ConfigError(f"{key}={v!r} must be 4 positive numbers")
        for key in ("mean_pixel",) + (("std_pixel",) if self.std_pixel is not None else ()):
            if len(getattr(self, key)) != self.image_channel_count:
                raise ConfigError(f"{key} must have image_channel_count={self.image_channel_count} values")
        for key in ("rpn_nms_threshold", "detection_nms_threshold", "roi_positive_ratio",
                    "detection_min_confidence", "rpn_positive_ratio", "mask_threshold"):
            v = getattr(self, key)
            if not (0.0 <= v <= 1.0):
                raise ConfigError(f"{key}={v!r} must be in [0, 1]")
        for key in ("images_per_gpu", "gpu_count", "pool_size", "mask_pool_size", "pre_nms_limit",
                    "post_nms_rois_training", "post_nms_rois_inference", "detection_max_instances",
                    "train_rois_per_image", "rpn_train_anchors_per_image", "image_max_dim",
                    "top_down_pyramid_size", "rpn_conv_channels", "fpn_classif_fc_layers_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key}={v!r} must be a positive integer")
        if tuple(self.mask_shape) != (2 * self.mask_pool_size, 2 * self.mask_pool_size):
            raise ConfigError(f"mask_shape={self.mask_shape!r} must be twice mask_pool_size={self.mask_pool_size}")
        if self.image_resize_mode == "pad64" and self.image_min_dim % 64:
            raise ConfigError(f"image_min_dim={self.image_min_dim} must be a multiple of 64 for pad64 "
                              "(as Matterport's resize_image asserts)")
        if self.image_resize_mode == "square" and self.image_max_dim % 64:
            raise ConfigError(f"image_max_dim={self.image_max_dim} must be a multiple of 64 "
                              "(the image is halved 6 times)")
        missing = set(self.loss_weights) ^ {"rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss",
                                            "mrcnn_bbox_loss", "mrcnn_mask_loss"}
        if missing:
            raise ConfigError(f"loss_weights must name exactly the five losses; check {sorted(missing)}")
        p = tuple(self.intensity_percentiles)
        if len(p) != 2 or not all(isinstance(v, (int, float)) for v in p) or not 0 <= p[0] < p[1] <= 100:
            raise ConfigError(f"intensity_percentiles={self.intensity_percentiles!r} must be two numbers "
                              "0 <= low < high <= 100")
        if self.bbox_decode_clip is not None and self.bbox_decode_clip <= 0:
            raise ConfigError(f"bbox_decode_clip={self.bbox_decode_clip!r} must be positive or null")

    # ---- Presets -----------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str = "matterport", **overrides) -> "Config":
        """A config with the numerics of ``name`` ("matterport" or "torchvision"), then
        ``overrides`` applied.  "torchvision" reproduces ``maskrcnn_resnet50_fpn`` (v1)."""
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r} is not one of {', '.join(PRESETS)}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls.from_dict(values)

    # ---- Serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        derived = {"batch_size", "image_shape", "image_meta_size"}
        values = {}
        for key, value in d.items():
            k = key.lower()
            if k in derived:
                continue
            if k not in known:
                raise ConfigError(f"unknown config key {key!r}")
            values[k] = value
        try:
            return cls(**values)
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise ConfigError(str(e)) from None

    def replace(self, **overrides) -> "Config":
        d = self.to_dict()
        d.update(overrides)
        return Config.from_dict(d)

    def save(self, path) -> None:
        path = Path(path)
        text = (json.dumps(self.to_dict(), indent=1) if path.suffix == ".json"
                else _yaml().safe_dump(self.to_dict(), sort_keys=True))
        from .utils import atomic_write_bytes
        atomic_write_bytes(path, text.encode())

    @classmethod
    def load(cls, path) -> "Config":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (a config is YAML or JSON)") from None
        try:
            d = json.loads(text) if path.suffix == ".json" else _yaml().safe_load(text)
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
        """Apply ``key=value`` strings (values parsed as YAML: ``--set num_classes=3``)."""
        d = self.to_dict()
        known = {f.name for f in fields(self)}
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"--set {a!r}: expected key=value")
            k, v = a.split("=", 1)
            k = k.strip().lower()
            if k not in known:
                raise ConfigError(f"unknown config key {k!r}")
            d[k] = _yaml().safe_load(v)
        return Config.from_dict(d)

    def display(self) -> str:
        return "\n".join(f"{k:30} {v}" for k, v in sorted(self.to_dict().items()))


def _yaml():
    import yaml
    return yaml


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
