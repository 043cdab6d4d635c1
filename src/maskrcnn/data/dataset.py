"""Matterport's ``Dataset`` API, and a ``torch.utils.data.Dataset`` view of it for training.

A Matterport dataset class ports with small changes::

    class BalloonDataset(maskrcnn.Dataset):
        def load_balloon(self, folder):
            self.add_class("balloon", 1, "balloon")
            for ...:
                self.add_image("balloon", image_id=name, path=path, width=w, height=h, polygons=p)

        def load_mask(self, image_id):          # unchanged: [H, W, N] bool, [N] int32
            ...

    ds = BalloonDataset(); ds.load_balloon("balloon/train"); ds.prepare()
    loader = DataLoader(TorchDataset(ds, build_transforms(train=True)), collate_fn=collate)

Differences from Matterport: ``load_image`` applies EXIF orientation and converts any image mode
to RGB (:func:`maskrcnn.data.images.read_image`), and the base ``load_mask`` rasterises the
``annotations`` that the COCO, labelme and VIA readers store in ``image_info`` (an image without
them has no instances), where Matterport's base class returned an empty mask with a warning.

Ids: ``image_id`` arguments are the internal indices ``0..num_images-1``; ``image_info[i]["id"]``
keeps the source's own id.  Class ids returned by ``load_mask`` are internal contiguous ids
``1..num_classes-1`` (0 is background); a negative id marks a crowd region (Matterport's
convention), whose class is the absolute value.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..boxes import any_along, masks_to_boxes
from ..errors import DataError
from .images import IntensityScaling, image_size, read_image
from .records import require_mask_memory
from .segmentation import form_problem, segmentation_to_mask


#: Problem severities: an error makes an image or annotation unusable (training leaves it out);
#: a warning names a fix that is applied (a vertex outside the image is clipped) and the
#: annotation is used.
ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: the file it is in, where in that file (an annotation,
    shape or region, or "" for the file as a whole), what is wrong, and its ``severity``
    (:data:`ERROR` or :data:`WARNING`)."""

    file: str
    where: str
    message: str
    severity: str = ERROR

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.message}" if self.where else f"{self.file}: {self.message}"


def report_found_by_name(problems: list, annotation_file, image_dir, names: list) -> None:
    """Append one warning to ``problems`` when images an annotation file names by a path that
    does not exist under ``image_dir`` were found there by file name
    (:func:`~maskrcnn.data.images.locate_image`)."""
    if names:
        problems.append(Problem(str(annotation_file), "", (
            f"{len(names)} image(s) found in {image_dir} by file name, not at the path the file gives "
            f"(e.g. {names[0]!r})"), WARNING))


class Dataset:
    """Matterport's dataset API: register classes and images, then ``prepare()``.

    image_info: list of dicts, one per image: ``id`` (the source's image id), ``source``, ``path``
        and whatever keyword arguments ``add_image`` got.  Readers in this package add
        ``height``, ``width`` and ``annotations`` (see :meth:`load_mask`).
    class_info: list of dicts ``{"source", "id", "name"}``; entry 0 is the background "BG".
    problems:   :class:`Problem` s a reader tolerated while loading (duplicate ids, annotations
        of unknown images); :func:`maskrcnn.data.checks.check_dataset` reports them.
    """

    #: How 16/32-bit images become uint8 in :meth:`load_image` (the config's default rule).
    intensity_scaling = IntensityScaling()

    def __init__(self, class_map=None):
        self._image_ids = np.zeros(0, dtype=np.int64)
        self.image_info: list[dict] = []
        self.class_info: list[dict] = [{"source": "", "id": 0, "name": "BG"}]
        self.source_class_ids: dict[str, list[int]] = {}
        self.problems: list[Problem] = []

    # ---- Registration (Matterport) -------------------------------------------------------
    def add_class(self, source: str, class_id, class_name: str) -> None:
        """Register class ``class_id`` (the source's own id) of ``source``; repeats are ignored."""
        if "." in source:
            raise ValueError(f"source name {source!r} cannot contain a dot")
        for info in self.class_info:
            if info["source"] == source and info["id"] == class_id:
                return
        self.class_info.append({"source": source, "id": class_id, "name": class_name})

    def add_image(self, source: str, image_id, path, **kwargs) -> None:
        """Register an image; ``kwargs`` are stored in its ``image_info`` entry."""
        info = {"id": image_id, "source": source, "path": str(path)}
        info.update(kwargs)
        self.image_info.append(info)

    def prepare(self, class_map=None) -> None:
        """Build the internal ids and lookup tables; call after adding classes and images."""
        self.num_classes = len(self.class_info)
        self.class_ids = np.arange(self.num_classes)
        self.class_names = [str(c["name"]).split(",")[0] for c in self.class_info]
        self.num_images = len(self.image_info)
        self._image_ids = np.arange(self.num_images)
        self.class_from_source_map = {f"{c['source']}.{c['id']}": i for i, c in enumerate(self.class_info)}
        self.image_from_source_map = {f"{c['source']}.{c['id']}": i for i, c in enumerate(self.image_info)}
        self.sources = sorted({c["source"] for c in self.class_info})
        self.source_class_ids = {
            source: [i for i, c in enumerate(self.class_info) if i == 0 or c["source"] == source]
            for source in self.sources}

    # ---- Lookups (Matterport) ------------------------------------------------------------
    @property
    def image_ids(self) -> np.ndarray:
        return self._image_ids

    def map_source_class_id(self, source_class_id: str) -> int:
        """Internal class id of ``"source.id"`` (e.g. ``"coco.18"``); KeyError if unknown."""
        return self.class_from_source_map[source_class_id]

    def get_source_class_id(self, class_id: int, source: str):
        """The source's own id of internal class ``class_id``."""
        info = self.class_info[class_id]
        if info["source"] != source:
            raise ValueError(f"class {class_id} is from source {info['source']!r}, not {source!r}")
        return info["id"]

    @property
    def category_ids(self) -> list:
        """Source category id of each internal class id (index 0 is background, id 0): the
        mapping that writes results back in the source's ids (``Detections.to_coco``)."""
        return [c["id"] for c in self.class_info]

    def class_id(self, image_id: int, category_id) -> int | None:
        """Internal class id of an annotation's ``category_id`` (the source's own id) in image
        ``image_id``, or None if that category is not registered."""
        return self.class_from_source_map.get(f"{self.image_info[image_id]['source']}.{category_id}")

    def add_named_classes(self, source: str, names, key=None) -> dict:
        """Register the distinct class ``names`` as ids 1..K in sorted order (``key`` as for
        ``sorted``), for readers whose files name classes rather than number them (labelme,
        VIA, mask images); returns ``{name: id}``."""
        ids = {name: i for i, name in enumerate(sorted(set(names), key=key), start=1)}
        for name, class_id in ids.items():
            self.add_class(source, class_id, name)
        return ids

    def source_image_link(self, image_id: int) -> str:
        return self.image_info[image_id]["path"]

    def image_reference(self, image_id: int) -> str:
        """A string naming the image in messages: its file path."""
        return self.image_info[image_id]["path"]

    # ---- Loading ---------------------------------------------------------------------------
    def load_image(self, image_id: int) -> np.ndarray:
        """The image as ``[H, W, 3]`` uint8 RGB, EXIF orientation applied, 16/32-bit pixels
        mapped by ``self.intensity_scaling`` (set it from the model's config:
        ``IntensityScaling.from_config``); DataError if unusable."""
        return read_image(self.image_info[image_id]["path"], self.intensity_scaling)

    def image_shape(self, image_id: int) -> tuple[int, int]:
        """``(height, width)`` of the image: from ``image_info`` when a reader stored it, else
        from the file's header."""
        info = self.image_info[image_id]
        if "height" in info and "width" in info:
            return int(info["height"]), int(info["width"])
        return image_size(info["path"])

    def load_mask(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Instance masks of an image.

        Returns masks ``[H, W, N]`` bool and class_ids ``[N]`` int32 (internal ids; negative for
        crowd regions).  This base version rasterises ``image_info[image_id]["annotations"]``,
        a list of dicts with ``category_id`` (the source's class id), ``segmentation`` (COCO
        form, see :mod:`maskrcnn.data.segmentation`), ``iscrowd`` and ``where`` (names the
        annotation in messages).  Annotations that cannot be used, an unknown category or a
        segmentation of the wrong form or size, are skipped: :func:`~maskrcnn.data.checks.
        check_dataset` reports each of them.
        """
        info = self.image_info[image_id]
        height, width = self.image_shape(image_id)
        require_mask_memory(len(info.get("annotations", [])), height, width, self.image_reference(image_id))
        masks, class_ids = [], []
        for ann in info.get("annotations", []):
            class_id = self.class_id(image_id, ann["category_id"])
            if class_id is None or form_problem(ann["segmentation"], height, width):
                continue
            masks.append(segmentation_to_mask(ann["segmentation"], height, width))
            class_ids.append(-class_id if ann.get("iscrowd") else class_id)
        # [H, W, N] as a view of the stacked [N, H, W]: instances_target takes the instances back
        # out of it in one copy (pycocotools' masks are column-major: a transpose is unavoidable)
        stacked = np.stack(masks).transpose(1, 2, 0) if masks else np.zeros((height, width, 0), dtype=bool)
        return stacked, np.asarray(class_ids, dtype=np.int32)


def instances_target(masks: np.ndarray, class_ids: np.ndarray, image_id: int) -> dict:
    """Matterport's ``load_mask`` output as a torchvision-style target.

    masks: [H, W, N] bool; class_ids: [N] int, negative for crowd.  Returns
    ``boxes`` [M, (x1, y1, x2, y2)] float32 pixels (x2, y2 exclusive, tight around the mask),
    ``labels`` [M] int64 (1..num_classes-1), ``masks`` [M, H, W] bool, ``iscrowd`` [M] bool and
    ``image_id``; instances whose mask is empty are left out (M <= N).
    """
    masks_t = torch.from_numpy(np.ascontiguousarray(np.asarray(masks, dtype=bool).transpose(2, 0, 1)))
    class_ids_t = torch.as_tensor(np.asarray(class_ids), dtype=torch.int64).reshape(-1)
    keep = any_along(masks_t, (1, 2))
    masks_t = masks_t[keep]
    class_ids_t = class_ids_t[keep]
    return {
        "boxes": masks_to_boxes(masks_t).to(torch.float32),
        "labels": class_ids_t.abs(),
        "masks": masks_t,
        "iscrowd": class_ids_t < 0,
        "image_id": int(image_id),
    }


class TorchDataset(torch.utils.data.Dataset):
    """A ``torch.utils.data.Dataset`` over a prepared :class:`Dataset`.

    Item ``i`` is ``(image, target)``: image ``[3, H, W]`` uint8 RGB; target as
    :func:`instances_target` with ``image_id = i`` (the internal index; the source's id is
    ``dataset.image_info[i]["id"]``).  ``transforms(image, target) -> (image, target)`` (e.g.
    :func:`maskrcnn.data.transforms.build_transforms`) is applied last.
    """

    def __init__(self, dataset: Dataset, transforms=None):
        if not hasattr(dataset, "class_from_source_map"):
            raise ValueError("call dataset.prepare() before wrapping it in a TorchDataset")
        self.dataset = dataset
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.dataset.image_info)

    def __getitem__(self, index: int):
        image = self.dataset.load_image(index)
        masks, class_ids = self.dataset.load_mask(index)
        if masks.shape[:2] != image.shape[:2]:
            raise DataError(f"{self.dataset.image_reference(index)}: masks are {masks.shape[0]}x{masks.shape[1]} "
                            f"but the image is {image.shape[0]}x{image.shape[1]}")
        target = instances_target(masks, class_ids, index)
        image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.transforms is not None:
            image_t, target = self.transforms(image_t, target)
        return image_t, target


def collate(batch: list) -> tuple[list, list]:
    """DataLoader ``collate_fn``: ``[(image, target), ...]`` -> ``([images], [targets])``
    (images differ in size, so they are not stacked)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def images_dataset(paths, source: str = "images") -> Dataset:
    """A prepared Dataset of image files without annotations (for detection, or checking that
    images read)."""
    dataset = Dataset()
    for path in paths:
        dataset.add_image(source, image_id=Path(path).name, path=path)
    dataset.prepare()
    return dataset
