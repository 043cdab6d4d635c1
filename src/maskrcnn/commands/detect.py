"""``maskrcnn detect``: overlays and one COCO results JSON for images, folders and videos.

Inputs are read one batch at a time and nothing is kept after a batch is written, so memory
stays flat over a folder of thousands of images or a long video.  Each overlay is written
atomically as it is made; the results JSON is streamed into a temporary file that replaces
``results.json`` only when every input has been processed, so a failed run never leaves a
truncated JSON (nor clobbers the previous one).  An input that cannot be read is skipped with a
warning naming it; the others are processed and written, the skipped ones are listed at the
end, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError
from ..utils import WriteBehind, batches, read_ahead, usable_cores
from .common import add_model_arguments, load_model, model_class_names, output_path, progress, runtime_name

log = logging.getLogger("maskrcnn")

EPILOG = """examples:
  maskrcnn detect --weights run1/model photo.jpg
  maskrcnn detect --weights run1/model --out results/ photos/ more/*.png
  maskrcnn detect --weights run1/model --set detection_min_confidence=0.5 --splash street.mp4
  maskrcnn detect --weights run1/model --no-overlays --coco val.json val/

Writes OUT/<name>.png per image (OUT/<name>_<frame>.png per video frame) and
OUT/results.json: COCO result records (image_id, category_id, bbox [x, y, w, h], RLE
segmentation, score) with the file_name (and frame) of each.  category_id is the dataset's
category id the model was trained with (COCO's 1..90 for a COCO model), else its class id;
image_id is the id of the image's file_name in --coco's annotation file, else the input order.
Unreadable inputs are skipped with a warning and listed at the end (exit status 1).
Videos need torchcodec or PyAV installed; animated GIFs are read frame by frame with PIL."""

RESULTS_FILE = "results.json"
#: At most this many threads draw and write overlays when the model runs on a GPU.
GPU_PICTURE_WRITERS = 4


@dataclass
class Frame:
    """One picture to run on: from an image file (``frame`` None) or a video's frame."""

    file: Path
    frame: int | None
    image: np.ndarray


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "detect", help="detect instances in images, folders and videos; write overlays and COCO results",
        description="Run a trained model on images, folders of images and videos.\n"
                    "Writes one overlay PNG per image (masks, boxes, class names and scores)\n"
                    "and one COCO results JSON for everything.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR_OR_VIDEO")
    parser.add_argument("--out", type=output_path("--out"), default="detections", metavar="DIR",
                        help="output folder (default: detections)")
    add_model_arguments(parser)
    style = parser.add_mutually_exclusive_group()
    style.add_argument("--splash", action="store_true",
                       help="write the colour-splash effect (grayscale outside the masks) instead of overlays")
    style.add_argument("--no-overlays", action="store_true", help="write only results.json")
    parser.add_argument("--coco", metavar="JSON",
                        help="take each image's image_id from this COCO annotation file (matched by file_name)")
    return parser


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files to process, in order: files as given, folders' images and videos sorted by name.
    DataError for a path that does not exist, an empty folder, or a video without a decoder."""
    from ..data.images import IMAGE_EXTENSIONS
    from ..data.video import VIDEO_EXTENSIONS, is_video, require_video_backend

    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
            if not found:
                raise DataError(f"{path}: no images or videos in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    for path in files:
        if is_video(path):
            require_video_backend(path)
    return files


def iter_frames(files: list[Path], scaling=None, skipped: list | None = None) -> Iterator[Frame]:
    """Frames of every input, read lazily: one per still image, each frame of a video or an
    animated image (numbered from 0); 16/32-bit images mapped to uint8 by ``scaling``
    (an :class:`~maskrcnn.data.images.IntensityScaling`, the model config's rule).

    skipped: when given, an input that cannot be read is logged, appended here (its path, and
    how many frames came before the error for a video) and passed over; else DataError."""
    from ..data.images import read_image
    from ..data.video import frame_count, image_frames, is_video, video_frames

    for path in files:
        index = -1
        try:
            if is_video(path):
                frames = video_frames(path)
            elif frame_count(path) > 1:
                frames = image_frames(path, scaling)
            else:
                yield Frame(path, None, read_image(path, scaling))
                continue
            for index, image in enumerate(frames):
                yield Frame(path, index, image)
        except (DataError, OSError) as e:
            if skipped is None:
                raise
            reason = str(e) if isinstance(e, DataError) else f"{path}: {e.strerror or e}"
            log.warning("skipped %s", reason)
            skipped.append(f"{path} (after frame {index})" if index >= 0 else str(path))


def coco_image_ids(annotation_file, files: list[Path]) -> dict[Path, object]:
    """The image id of each input in a COCO annotation file, matched by ``file_name`` (its
    last path components); DataError naming an input the file does not list."""
    from ..data.coco import validate_coco
    from ..data.records import read_json

    data = read_json(annotation_file)
    validate_coco(data, annotation_file)
    by_name = {}
    for entry in data["images"]:
        by_name.setdefault(Path(str(entry["file_name"])).as_posix(), entry["id"])
        by_name.setdefault(Path(str(entry["file_name"])).name, entry["id"])
    ids = {}
    for path in files:
        parts = path.resolve().parts
        found = [by_name[k] for k in ("/".join(parts[-n:]) for n in range(len(parts), 0, -1)) if k in by_name]
        if not found:
            raise DataError(f"{path}: no image with this file_name in {annotation_file}")
        ids[path] = found[0]
    return ids


def output_names(files: list[Path]) -> dict[Path, str]:
    """A distinct output stem per input file: its stem, with ``_2``, ``_3``... on clashes."""
    names, used = {}, set()
    for path in files:
        stem, k = path.stem, 1
        while stem in used:
            k += 1
            stem = f"{path.stem}_{k}"
        used.add(stem)
        names[path] = stem
    return names


def run(args) -> int:
    from ..data.images import IntensityScaling
    from ..data.video import is_video
    from ..utils import atomic_write_with

    if not args.inputs:
        raise DataError("detect: give at least one image, folder or video")
    files = expand_inputs(args.inputs)
    model = load_model(args)
    class_names = model_class_names(model)
    scaling = IntensityScaling.from_config(model.config)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    names = output_names(files)
    image_ids = coco_image_ids(args.coco, files) if args.coco else None
    total = None if any(is_video(p) for p in files) else len(files)
    summary = {"images": 0, "detections": 0}
    skipped: list[str] = []

    batch_size = max(1, args.batch_size)
    readers, writers = pipeline_threads(getattr(model, "device", None), args.no_overlays)

    def write_results(tmp_path):
        # the next batch is decoded, and the last ones' pictures drawn and written and their
        # results encoded, while the model runs: on a GPU these take longer than the model
        with open(tmp_path, "w", encoding="utf-8") as f, WriteBehind(writers) as behind:
            f.write("[")
            first = True

            def write_records(done: list) -> None:
                nonlocal first
                for lines in done:
                    for line in lines:
                        f.write(("\n" if first else ",\n") + line)
                        first = False

            frames = read_ahead(iter_frames(files, scaling, skipped), readers * batch_size)
            for batch in batches(progress(frames, total, "detect"), batch_size):
                for frame, det in zip(batch, model.detect([fr.image for fr in batch])):
                    image_id = summary["images"] if image_ids is None else image_ids[frame.file]
                    summary["images"] += 1
                    summary["detections"] += len(det)
                    write_records(behind.submit(_finish_frame, frame, det, image_id, out, names, class_names,
                                                getattr(model, "category_ids", None), args))
            write_records(behind.finish())
            f.write("\n]\n")

    atomic_write_with(out / RESULTS_FILE, write_results)
    print(f"{summary['detections']} instances in {summary['images']} images; results in {out / RESULTS_FILE} "
          f"(ran on {runtime_name(model)})")
    if skipped:
        print(f"skipped {len(skipped)} unreadable input(s): {', '.join(skipped)}")
        return 1
    return 0


def pipeline_threads(device, no_overlays: bool = False) -> tuple[int, int]:
    """(batches read ahead, writing threads) for ``detect`` with a model on ``device`` (a
    torch.device; None for ONNX Runtime): on a CPU one batch ahead and one writer, since the
    model's own threads use the cores; on a GPU, whose detection is faster than drawing and
    encoding an overlay, two batches ahead and up to ``GPU_PICTURE_WRITERS`` writers, one per
    core beyond two (one with ``--no-overlays``: the writers then only encode results)."""
    on_gpu = getattr(device, "type", None) == "cuda"
    if on_gpu and not no_overlays:
        return 2, max(1, min(GPU_PICTURE_WRITERS, usable_cores() - 2))
    return (2 if on_gpu else 1), 1


def _finish_frame(frame: Frame, det, image_id, out: Path, names: dict, class_names: list[str], category_ids,
                  args) -> list[str]:
    """Write the frame's picture (unless --no-overlays); returns its COCO result records as
    JSON texts."""
    if not args.no_overlays:
        _write_picture(frame, det, out, names, class_names, args)
    lines = []
    for record in det.to_coco(image_id, category_ids):
        record["file_name"] = str(frame.file)
        if frame.frame is not None:
            record["frame"] = frame.frame
        lines.append(json.dumps(record))
    return lines


def _write_picture(frame: Frame, det, out: Path, names: dict, class_names: list[str], args) -> None:
    from ..visualize import color_splash, draw_detections, save_png

    stem = names[frame.file] if frame.frame is None else f"{names[frame.file]}_{frame.frame:06d}"
    picture = color_splash(frame.image, det.masks) if args.splash else draw_detections(frame.image, det, class_names)
    save_png(picture, out / f"{stem}.png")
