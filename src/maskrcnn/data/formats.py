"""One entry point for every annotation format the package reads."""
from __future__ import annotations

from ..errors import DataError
from .coco import read_coco
from .dataset import Dataset, images_dataset
from .images import list_images
from .labelme import read_labelme
from .masks import read_labels, read_mask_dirs
from .via import read_via

#: The annotation sources, by the keyword (and command-line option) naming each.
SOURCES = ("coco", "labelme", "via", "labels", "mask_dirs")


def open_dataset(coco=None, labelme=None, via=None, labels=None, mask_dirs=None, images=None,
                 class_attribute: str | None = None, class_name: str = "object", classes=None,
                 crowd_as_instances: bool = False) -> Dataset:
    """A prepared Dataset from one annotation source.

    coco:       COCO instance JSON; ``images`` is the folder its ``file_name`` s are relative to.
    labelme:    folder of labelme JSON files (images found through their ``imagePath``).
    via:        VIA 1/2 JSON; ``images`` is the folder of its ``filename`` s; ``class_attribute``
                names the region attribute holding the class (default: one class, ``class_name``).
    labels:     folder of instance label images, one per image of ``images`` (same file stem).
    mask_dirs:  folder in Matterport's nucleus layout (``<id>/images/<id>.png``, ``<id>/masks/*.png``).
    images:     alone, a folder of images without annotations.
    class_name: the one class of ``via`` without ``class_attribute``, ``labels`` and ``mask_dirs``.
    classes:    for ``labels`` and ``mask_dirs``, a JSON file giving each instance's class
                (:mod:`maskrcnn.data.masks`).
    crowd_as_instances: for ``coco``, read ``iscrowd: 1`` annotations as instances (CVAT's
                COCO export marks each mask annotation so).
    Raises DataError when the arguments do not name exactly one source, or the files are unusable.
    """
    given = {name: value for name, value in zip(SOURCES, (coco, labelme, via, labels, mask_dirs)) if value is not None}
    options = ", ".join("--" + name.replace("_", "-") for name in SOURCES)
    if len(given) > 1:
        raise DataError(f"annotations: give one of {options} (got {', '.join(given)})")
    if classes is not None and not (labels is not None or mask_dirs is not None):
        raise DataError("--classes: only for --labels and --mask-dirs")
    if not given:
        if images is not None:
            return images_dataset(list_images(images))
        raise DataError(f"annotations: give one of {options} (or --images alone)")
    (source, value), = given.items()
    if source in ("coco", "via", "labels") and images is None:
        raise DataError(f"{value}: the images folder is needed too (--images DIR)")
    if crowd_as_instances and source != "coco":
        raise DataError("--crowd-as-instances: only for --coco")
    if source == "coco":
        return read_coco(coco, images, crowd_as_instances)
    if source == "via":
        return read_via(via, images, class_attribute=class_attribute, default_class=class_name)
    if source == "labelme":
        return read_labelme(labelme)
    if source == "labels":
        return read_labels(images, labels, class_name, classes)
    return read_mask_dirs(mask_dirs, class_name, classes)
