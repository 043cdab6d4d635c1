"""Datasets whose instances come as mask images rather than shapes.

Two layouts, each a :class:`~maskrcnn.data.dataset.Dataset` like the COCO, labelme and VIA ones:

* **Instance label images** (:class:`LabelImageDataset`, ``--images DIR --labels DIR``): one
  label image per picture, an integer image whose pixel value is the instance number, 0 the
  background (the StarDist and Cellpose convention).  The label image has the picture's file
  stem, or the stem with Cellpose's ``_masks`` (or ``_mask``, ``_label``, ``_labels``)
  appended, and is a PNG or TIFF of 8, 16 or 32-bit integers (a float TIFF holding whole
  numbers is read too).
* **Mask folders** (:class:`MaskDirsDataset`, ``--mask-dirs DIR``): Matterport's nucleus / Kaggle
  Data Science Bowl 2018 layout, one folder per picture, ``DIR/<id>/images/<id>.png`` and
  ``DIR/<id>/masks/*.png`` with one binary mask (any non-zero pixel) per instance.

Classes: every instance is of one class, ``class_name`` (default ``object``), unless a
``classes`` file is given: JSON ``{"<picture>": {"<instance>": "<class name>"}}``, where
``<picture>`` is the picture's file stem (label images) or folder name (mask folders) and
``<instance>`` the instance's label value (label images) or mask file stem (mask folders).  A
class may also be given as a number, as StarDist's multi-class ``cls_dict`` holds them; it is
then named ``class <n>``.  Classes are numbered 1..K in sorted order.  An instance the file
gives no class is left out, with an error naming it (``maskrcnn check-data``).

Masks are read when an image is loaded (``load_mask``), never all at once.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import Dataset, Problem
from .images import list_images, open_pil_image
from .records import read_json, require_id, require_mask_memory, require_text

LABEL_EXTENSIONS = (".png", ".tif", ".tiff")
#: Suffixes a label image's stem may carry after the picture's stem (Cellpose writes ``_masks``).
LABEL_SUFFIXES = ("", "_masks", "_mask", "_labels", "_label")


def read_label_image(path) -> np.ndarray:
    """The instance label image at ``path`` as ``[H, W]`` int64 (0 = background).

    Accepts single-channel integer images (PIL modes 1, L, P, I;16*, I) and float images whose
    values are whole numbers.  DataError("<path>: <why>") for anything else: colour images,
    negative or fractional values, multi-page stacks, images beyond the pixel limit.
    """
    with open_pil_image(path) as img:
        if getattr(img, "n_frames", 1) > 1:
            raise DataError(f"{path}: a stack of {img.n_frames} pages; a label image must be one 2-D page")
        if img.mode not in ("1", "L", "P", "I", "F") and not img.mode.startswith("I;16"):
            raise DataError(f"{path}: a label image must be single-channel integers, not mode {img.mode}")
        labels = np.asarray(img)
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise DataError(f"{path}: a float label image must hold whole numbers only")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: negative label {labels.min()}; labels are instance numbers >= 0")
    return labels


def read_classes(path) -> dict[str, dict[str, str]]:
    """The ``classes`` file: ``{picture: {instance: class name}}``, every key a string (see the
    module doc).  DataError naming the file and entry when a value has another form."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: classes must be a JSON object {{picture: {{instance: class}}}}")
    out = {}
    for picture, instances in data.items():
        if not isinstance(instances, dict):
            raise DataError(f"{path}: {picture!r} must map instances to classes, not {type(instances).__name__}")
        out[picture] = {}
        for instance, name in instances.items():
            require_id(name, f"{path}: {picture!r}: instance {instance!r}: class")
            where = f"{path}: {picture!r}: instance {instance!r}: class"
            out[picture][str(instance)] = f"class {name}" if isinstance(name, int) else require_text(name, where)
    return out


def _natural_key(name: str):
    """Sort key putting "class 2" before "class 10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class MaskImageDataset(Dataset):
    """What both mask layouts share: classes from one name or a classes file, masks checked
    while they load (:meth:`load_mask_checked`, which ``maskrcnn check-data`` reports from)."""

    source = "masks"

    def _register_classes(self, class_name: str, classes) -> None:
        self.instance_classes = read_classes(classes) if classes is not None else None
        if self.instance_classes is None:
            self.add_class(self.source, 1, require_text(class_name, "--class-name"))
            self._class_ids = {}
            return
        names = [n for instances in self.instance_classes.values() for n in instances.values()]
        if not names:
            raise DataError(f"{classes}: names no classes")
        self._class_ids = self.add_named_classes(self.source, names, key=_natural_key)

    def _classify(self, image_id: int, keys: list[str], file: str) -> tuple[np.ndarray, list[Problem]]:
        """Internal class id of each instance (0 for one the classes file leaves out, with an
        error for it), by its key (label value or mask file stem)."""
        if self.instance_classes is None:
            return np.ones(len(keys), dtype=np.int32), []
        picture = str(self.image_info[image_id]["id"])
        given = self.instance_classes.get(picture, {})
        ids = np.array([self._class_ids.get(given.get(key), 0) for key in keys], dtype=np.int32)
        problems = [Problem(file, f"instance {key}", f"no class for it under {picture!r} in the classes file; skipped")
                    for key, class_id in zip(keys, ids) if class_id == 0]
        return ids, problems

    def load_mask(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Instance masks ``[H, W, N]`` bool and class ids ``[N]`` int32 of one image; instances
        without a class are left out.  DataError if the masks cannot be read."""
        masks, class_ids, _ = self.load_mask_checked(image_id)
        return masks, class_ids

    def load_mask_checked(self, image_id: int) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
        raise NotImplementedError


class LabelImageDataset(MaskImageDataset):
    """Pictures in one folder, instance label images in another (``load_labels``)."""

    source = "labels"

    def load_labels(self, image_dir, label_dir, class_name: str = "object", classes=None) -> None:
        """Register every image of ``image_dir`` with its label image from ``label_dir``.  A
        picture without a label image, or a label image without a picture, is an error in
        ``problems`` (the picture is then left out of training)."""
        image_dir, label_dir = Path(image_dir), Path(label_dir)
        if not label_dir.is_dir():
            raise DataError(f"{label_dir}: no such folder of label images")
        self._register_classes(class_name, classes)
        label_files = {}
        for path in sorted(p for p in label_dir.iterdir() if p.is_file() and p.suffix.lower() in LABEL_EXTENSIONS):
            label_files.setdefault(path.stem, path)
        pictures = list_images(image_dir)
        label_of = {}
        for path in pictures:
            found = (label_files.get(path.stem + suffix) for suffix in LABEL_SUFFIXES)
            label_of[path] = next((f for f in found if f is not None and f.resolve() != path.resolve()), None)
        # With --labels naming the images folder (Cellpose keeps x.png and x_masks.png together),
        # the label images are not pictures.
        label_paths = {f.resolve() for f in label_of.values() if f is not None}
        used = set()
        for path in pictures:
            if path.resolve() in label_paths:
                continue
            found = label_of[path]
            if found is None:
                self.problems.append(Problem(str(path), "", f"no label image {path.stem}.png/.tif in {label_dir}"))
            else:
                used.add(found.stem)
            self.add_image(self.source, image_id=path.stem, path=path, labels=str(found) if found else None)
        pictures = {p.stem for p in pictures}
        for stem in sorted(set(label_files) - used - pictures):
            self.problems.append(Problem(str(label_files[stem]), "", f"no picture of this name in {image_dir}; ignored"))
        if not self.image_info:
            raise DataError(f"{image_dir}: no images")

    def load_mask_checked(self, image_id: int) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
        """(masks ``[H, W, N]`` bool, class ids ``[N]`` int32, problems) from the image's label
        image: one instance per distinct non-zero value, in increasing order."""
        info = self.image_info[image_id]
        if info["labels"] is None:
            raise DataError(f"{info['path']}: no label image")
        labels = read_label_image(info["labels"])
        values = np.unique(labels)
        values = values[values != 0]
        require_mask_memory(len(values), *labels.shape, info["labels"])
        class_ids, problems = self._classify(image_id, [str(v) for v in values], info["labels"])
        keep = class_ids > 0
        masks = labels[:, :, None] == values[keep][None, None, :]
        return masks, class_ids[keep], problems


class MaskDirsDataset(MaskImageDataset):
    """Matterport's nucleus layout: ``DIR/<id>/images/<id>.png``, ``DIR/<id>/masks/*.png``
    (``load_mask_dirs``)."""

    source = "mask_dirs"

    def load_mask_dirs(self, root, class_name: str = "object", classes=None) -> None:
        """Register each ``<id>`` folder of ``root`` that holds an ``images`` folder.  A folder
        whose ``images`` folder holds no image, or several without one named ``<id>``, is an
        error in ``problems``; one without a ``masks`` folder has no instances."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such folder")
        self._register_classes(class_name, classes)
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if not (folder / "images").is_dir():
                continue
            pictures = list_images(folder / "images")
            named = [p for p in pictures if p.stem == folder.name]
            if len(named) == 1 or len(pictures) == 1:
                picture = (named or pictures)[0]
            else:
                self.problems.append(Problem(str(folder / "images"), "", f"{len(pictures)} images and none "
                                             f"named {folder.name}; expected {folder.name}.png"))
                continue
            masks = list_images(folder / "masks") if (folder / "masks").is_dir() else []
            self.add_image(self.source, image_id=folder.name, path=picture, mask_files=[str(p) for p in masks])
        if not self.image_info and not self.problems:
            raise DataError(f"{root}: no <id>/images/ folders (expected Matterport's nucleus layout: "
                            "<id>/images/<id>.png and <id>/masks/*.png)")

    def load_mask_checked(self, image_id: int) -> tuple[np.ndarray, np.ndarray, list[Problem]]:
        """(masks ``[H, W, N]`` bool, class ids ``[N]`` int32, problems): one instance per mask
        file, in file name order; a mask whose size differs from the picture's is an error and
        left out."""
        info = self.image_info[image_id]
        height, width = self.image_shape(image_id)
        files = info["mask_files"]
        require_mask_memory(len(files), height, width, str(Path(info["path"]).parent.parent))
        class_ids, problems = self._classify(image_id, [Path(f).stem for f in files], str(Path(info["path"]).parent.parent))
        masks = []
        keep = np.zeros(len(files), dtype=bool)
        for k, file in enumerate(files):
            if not class_ids[k]:
                continue
            mask = read_label_image(file) > 0
            if mask.shape != (height, width):
                problems.append(Problem(file, "", f"mask is {mask.shape[1]}x{mask.shape[0]} (width x height) but "
                                        f"the image is {width}x{height}; skipped"))
                continue
            masks.append(mask)
            keep[k] = True
        stacked = np.stack(masks).transpose(1, 2, 0) if masks else np.zeros((height, width, 0), dtype=bool)
        return stacked, class_ids[keep], problems


def read_labels(image_dir, label_dir, class_name: str = "object", classes=None) -> LabelImageDataset:
    """A prepared :class:`LabelImageDataset`: pictures in ``image_dir``, label images in
    ``label_dir``; one class ``class_name`` unless a ``classes`` file is given."""
    dataset = LabelImageDataset()
    dataset.load_labels(image_dir, label_dir, class_name, classes)
    dataset.prepare()
    return dataset


def read_mask_dirs(root, class_name: str = "object", classes=None) -> MaskDirsDataset:
    """A prepared :class:`MaskDirsDataset` of the ``<id>`` folders in ``root``."""
    dataset = MaskDirsDataset()
    dataset.load_mask_dirs(root, class_name, classes)
    dataset.prepare()
    return dataset
