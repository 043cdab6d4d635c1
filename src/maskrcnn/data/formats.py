"""One entry point for every annotation format the package reads."""
from __future__ import annotations

from ..errors import DataError
from .coco import read_coco
from .dataset import Dataset, images_dataset
from .images import list_images
from .labelme import read_labelme
from .via import read_via


def open_dataset(coco=None, labelme=None, via=None, images=None, class_attribute: str | None = None) -> Dataset:
    """A prepared Dataset from one annotation source.

    coco:     COCO instance JSON; ``images`` is the folder its ``file_name`` s are relative to.
    labelme:  folder of labelme JSON files (images found through their ``imagePath``).
    via:      VIA 1/2 JSON; ``images`` is the folder of its ``filename`` s; ``class_attribute``
              names the region attribute holding the class (default: one class, "object").
    images:   alone, a folder of images without annotations.
    Raises DataError when the arguments do not name exactly one source, or the files are unusable.
    """
    given = [name for name, value in (("coco", coco), ("labelme", labelme), ("via", via)) if value is not None]
    if len(given) > 1:
        raise DataError(f"annotations: give one of --coco, --labelme, --via (got {', '.join(given)})")
    if coco is not None or via is not None:
        if images is None:
            raise DataError(f"{coco or via}: the images folder is needed too (--images DIR)")
        if coco is not None:
            return read_coco(coco, images)
        return read_via(via, images, class_attribute=class_attribute)
    if labelme is not None:
        return read_labelme(labelme)
    if images is not None:
        return images_dataset(list_images(images))
    raise DataError("annotations: give --coco, --labelme or --via (or --images alone)")
