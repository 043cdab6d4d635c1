"""Matterport's training call on our trainer: ``model.fit(dataset_train, dataset_val,
learning_rate, epochs, layers, augmentation)`` (Matterport's ``model.train``; ``train`` is
``nn.Module``'s train-mode switch here).

    model = maskrcnn.MaskRCNN(mode="training", config=config, model_dir="logs")
    model.fit(dataset_train, dataset_val, learning_rate=config.LEARNING_RATE, epochs=30, layers="heads")
    model.fit(dataset_train, dataset_val, learning_rate=config.LEARNING_RATE / 10, epochs=40, layers="all")

As in Matterport, ``epochs`` counts from the model's first training: the second call above trains
epochs 31..40.  An epoch is ``config.steps_per_epoch`` optimizer steps of ``config.batch_size``
images; after each, ``config.validation_steps`` batches of ``dataset_val`` give the validation
losses (``val_loss`` ...).  Everything lands in one run folder per model, ``model.log_dir`` =
``model_dir/<config.name><YYYYmmddTHHMM>``, laid out as ``maskrcnn train`` lays out ``--out``:
config.yaml, checkpoints/ (one per epoch, steps numbered across calls), metrics.jsonl, tb/ and
model/ (written at the end of each call).
"""
from __future__ import annotations

import datetime
import logging
from pathlib import Path

import torch

from ..errors import MaskRCNNError
from .hooks import HookBase

log = logging.getLogger(__name__)


def matterport_augmentation(augmentation):
    """A ``TorchDataset`` transform from ``fit``'s ``augmentation``: None, a
    ``torchvision.transforms.v2`` transform (image, boxes and masks move together), or any
    callable ``(image [3, H, W] uint8, target) -> (image, target)``.  imgaug pipelines (what
    Matterport's samples pass) are refused with one line naming the replacement."""
    if augmentation is None:
        return None
    if type(augmentation).__module__.split(".")[0] == "imgaug":
        raise MaskRCNNError("augmentation: imgaug pipelines are not supported (imgaug does not run on numpy 2); "
                            "pass a torchvision.transforms.v2 transform, e.g. v2.RandomHorizontalFlip(0.5), or "
                            "maskrcnn.data.transforms.build_transforms(train=True)")
    if type(augmentation).__module__.startswith("torchvision.transforms.v2"):
        from ..data.transforms import InstanceTransform
        return InstanceTransform(augmentation)
    if callable(augmentation):
        return augmentation
    raise MaskRCNNError(f"augmentation: {type(augmentation).__name__} is neither a torchvision.transforms.v2 "
                        "transform nor a callable (image, target) -> (image, target)")


class ValidationLoss(HookBase):
    """After every ``every`` steps: the mean losses of the first ``batches`` batches of
    ``dataset`` (items ``(image, target)``; cycled when shorter), logged as ``val_<loss>`` and
    ``val_loss`` (their sum), as Keras reports Matterport's ``validation_steps``.  The losses
    are computed without gradients and with BatchNorm in inference mode, so validation does
    not move the running statistics."""

    def __init__(self, dataset, every: int, batches: int, batch_size: int):
        self.dataset, self.every, self.batches, self.batch_size = dataset, every, batches, batch_size
        self.last: dict = {}

    def after_step(self) -> None:
        t = self.trainer
        if self.batches and len(self.dataset) and t.step % self.every == 0 and t.info.is_main:
            self.last = self.run()
            t.log({"step": t.step, **self.last})

    def run(self) -> dict:
        from ..data.dataset import collate
        from .distributed import unwrap
        from ..device import to_device
        from .trainer import targets_to_device

        model = unwrap(self.trainer.wrapped)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
        for m in norms:
            m.eval()
        sums: dict[str, float] = {}
        try:
            with torch.no_grad():
                for b in range(self.batches):
                    items = [self.dataset[(b * self.batch_size + j) % len(self.dataset)] for j in range(self.batch_size)]
                    images, targets = collate(items)
                    device = self.trainer.info.device
                    losses = model([to_device(im, device) for im in images], targets_to_device(targets, device))
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
        finally:
            for m in norms:
                m.train()
        mean = {f"val_{k}": v / self.batches for k, v in sums.items()}
        mean["val_loss"] = sum(mean.values())
        return mean


def log_dir_for(model, model_dir) -> Path:
    """The model's run folder: set at its first ``fit``, ``model_dir/<name><YYYYmmddTHHMM>``."""
    if getattr(model, "log_dir", None) is None:
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M")
        folder = Path(model_dir or getattr(model, "model_dir", None) or "logs") / f"{model.config.name.lower()}{stamp}"
        k = 1
        while folder.exists():
            k += 1
            folder = folder.with_name(f"{model.config.name.lower()}{stamp}_{k}")
        model.log_dir = folder
    return Path(model.log_dir)


def fit(model, dataset_train, dataset_val, learning_rate: float, epochs: int, layers: str = "all",
        augmentation=None, model_dir=None, num_workers: int = 0, seed: int = 0, progress: bool = True) -> dict:
    """Train ``model`` up to epoch ``epochs`` on prepared :class:`maskrcnn.Dataset` objects
    (Matterport-style subclasses with ``load_image`` / ``load_mask`` / ``image_reference``
    work as they are).  Returns the trainer's result dict with ``val_loss`` added."""
    from ..data.dataset import TorchDataset
    from .trainer import Trainer

    config = model.config
    for name, dataset in (("dataset_train", dataset_train), ("dataset_val", dataset_val)):
        if dataset is not None and not hasattr(dataset, "class_from_source_map"):
            raise MaskRCNNError(f"{name}: call prepare() on the dataset before fit()")
    done = int(getattr(model, "epoch", 0))
    if epochs <= done:
        raise MaskRCNNError(f"epochs={epochs}: the model has trained {done} epoch(s) already; epochs counts "
                            "from the first fit, as in Matterport (give a larger number to train more)")
    if learning_rate is None or not learning_rate > 0:
        raise MaskRCNNError(f"learning_rate={learning_rate!r}: must be a positive number")
    if getattr(model, "class_names", None) is None and hasattr(dataset_train, "class_names"):
        model.class_names = list(dataset_train.class_names)
    if getattr(model, "category_ids", None) is None and hasattr(dataset_train, "category_ids"):
        model.category_ids = list(dataset_train.category_ids)
    out = log_dir_for(model, model_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")
    train_items = TorchDataset(dataset_train, matterport_augmentation(augmentation))
    hooks = ()
    if dataset_val is not None and config.validation_steps:
        hooks = (ValidationLoss(TorchDataset(dataset_val), config.steps_per_epoch, config.validation_steps,
                                config.images_per_gpu),)
    trainer = Trainer(model, train_items, out, config.replace(learning_rate=learning_rate), layers=layers,
                      checkpoint_every=config.steps_per_epoch, log_every=min(20, config.steps_per_epoch),
                      seed=seed, num_workers=num_workers, progress=progress, hooks=hooks)
    trainer.step = trainer.start_step = done * config.steps_per_epoch
    log.info("training epochs %d..%d (%d steps of %d images), layers %s, into %s", done + 1, epochs,
             (epochs - done) * config.steps_per_epoch, config.images_per_gpu, layers, out)
    result = trainer.fit(epochs * config.steps_per_epoch)
    model.epoch = trainer.step // config.steps_per_epoch
    model.save(out / "model")
    if hooks:
        result.update(hooks[0].last)
    return result
