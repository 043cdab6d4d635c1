"""A corpus of hostile annotation files and images, made by the tests: each ends in one error
line naming the file and the problem (exit 2; an unusable image is a check-data error, exit 1),
never a traceback, a crash inside pycocotools or an allocation the size of the machine.

The cases that once crashed the process or ate 17 GB (NaN / 1e300 coordinates, absurd RLE and
image sizes) also run as real ``maskrcnn check-data`` and ``maskrcnn train --steps 1``
processes under an address-space cap (RLIMIT_AS)."""
import base64
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskrcnn.cli import main

#: Address-space cap of the subprocess cases: importing torch (CUDA build) maps about 3.5 GB;
#: the inputs below once grew past 17 GB.
MEMORY_CAP = 6 * 1024 ** 3

POLYGON = [10, 5, 30, 5, 30, 25, 10, 25]


def coco(**changes):
    """A valid one-image COCO file, changed by ``image=``, ``category=``, ``annotation=`` dicts
    merged into its records, or a ``data=`` callable rewriting the whole object."""
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [POLYGON]}]}
    data["images"][0].update(changes.get("image", {}))
    data["categories"][0].update(changes.get("category", {}))
    data["annotations"][0].update(changes.get("annotation", {}))
    return changes["data"](data) if "data" in changes else data


def png_header_bytes(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` 8-bit grey pixels, with one tiny
    compressed row: a decoder that trusts the header allocates width * height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def labelme_mask(mask, points=((10, 5), (19, 14))) -> dict:
    """A labelme 5.5+ mask shape (what its AI-mask tool writes) carrying ``mask``: bytes are
    base64-encoded, anything else is written as it is."""
    if isinstance(mask, bytes):
        mask = base64.b64encode(mask).decode("ascii")
    return {"shape_type": "mask", "points": [list(p) for p in points], "mask": mask}


def labelme(shape=None, **top):
    data = {"version": "5.2.1", "flags": {}, "imagePath": "a.png", "imageData": None, "imageHeight": 40,
            "imageWidth": 60, "shapes": [dict({"label": "cat", "points": [[10, 5], [30, 5], [30, 25]],
                                               "group_id": None, "shape_type": "polygon", "flags": {}}, **(shape or {}))]}
    data.update(top)
    return data


def via(region=None, **entry):
    region = region or {"shape_attributes": {"name": "polygon", "all_points_x": [10, 30, 30],
                                             "all_points_y": [5, 5, 25]}, "region_attributes": {}}
    return {"a.png1": dict({"filename": "a.png", "size": 1, "regions": [region], "file_attributes": {}}, **entry)}


def poly_x(xs):
    return {"shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": [5, 5, 25]},
            "region_attributes": {}}


# (case id, format, content: a JSON-able object or raw text / bytes, expected fragment)
JSON_CASES = [
    ("coco-nan-vertex", "coco", coco(annotation={"segmentation": [[10, 5, float("nan"), 5, 30, 25]]}), "coordinate nan is not finite"),
    ("coco-inf-vertex", "coco", coco(annotation={"segmentation": [[10, 5, float("inf"), 5, 30, 25]]}), "coordinate inf is not finite"),
    ("coco-1e300-vertex", "coco", coco(annotation={"segmentation": [[10, 5, 1e300, 5, 30, 25]]}), "coordinate 1e+300 is beyond"),
    ("coco-1e7-vertex", "coco", coco(annotation={"segmentation": [[10, 5, 1e7, 5, 30, 25]]}), "coordinate 1e+07 is beyond"),
    ("coco-string-vertex", "coco", coco(annotation={"segmentation": [[10, "5", 30, 5, 30, 25]]}), 'coordinate "5" is not a number'),
    ("coco-nested-ring", "coco", coco(annotation={"segmentation": [[[10, 5], [30, 5], [30, 25]]]}), "coordinate [10, 5] is not a number"),
    ("coco-ring-not-list", "coco", coco(annotation={"segmentation": [{"x": 1}]}), "must be a list of numbers"),
    ("coco-segmentation-string", "coco", coco(annotation={"segmentation": "polygon"}), "segmentation must be a list of polygons or an RLE"),
    ("coco-segmentation-number", "coco", coco(annotation={"segmentation": 7}), "segmentation must be a list"),
    ("coco-rle-huge-size", "coco", coco(annotation={"segmentation": {"size": [100000, 100000], "counts": [10 ** 10]}}), "is more than the"),
    ("coco-rle-size-strings", "coco", coco(annotation={"segmentation": {"size": ["a", 3], "counts": []}}), "height must be a positive integer"),
    ("coco-rle-size-scalar", "coco", coco(annotation={"segmentation": {"size": 40, "counts": []}}), "RLE size must be [height, width]"),
    ("coco-rle-runs-overflow", "coco", coco(annotation={"segmentation": {"size": [40, 60], "counts": [0, 10 ** 9]}}), "RLE runs add up to 1000000000 pixels"),
    ("coco-rle-runs-negative", "coco", coco(annotation={"segmentation": {"size": [40, 60], "counts": [-5, 2405]}}), "non-negative integers"),
    ("coco-rle-string-overflow", "coco", coco(annotation={"segmentation": {"size": [40, 60], "counts": "0o`0"}}), "RLE runs add up to"),
    ("coco-rle-string-bad-char", "coco", coco(annotation={"segmentation": {"size": [40, 60], "counts": "\u00ff\u00ff"}}), "outside COCO's code"),
    ("coco-rle-string-cut", "coco", coco(annotation={"segmentation": {"size": [40, 60], "counts": "0"}}), "RLE runs add up to 0"),
    ("coco-bbox-nan", "coco", coco(annotation={"segmentation": [], "bbox": [1, 2, float("nan"), 4]}), "coordinate nan is not finite"),
    ("coco-bbox-three", "coco", coco(annotation={"bbox": [1, 2, 3]}), "'bbox' must be [x, y, width, height]"),
    ("coco-bbox-negative", "coco", coco(annotation={"bbox": [1, 2, -3, 4]}), "'bbox' must be [x, y, width, height]"),
    ("coco-bbox-string", "coco", coco(annotation={"bbox": "1,2,3,4"}), "'bbox' must be a list of numbers"),
    ("coco-iscrowd-string", "coco", coco(annotation={"iscrowd": "yes"}), "'iscrowd' must be 0 or 1"),
    ("coco-file-name-null", "coco", coco(image={"file_name": None}), "'file_name' must be a non-empty string, not null"),
    ("coco-file-name-number", "coco", coco(image={"file_name": 12}), "'file_name' must be a non-empty string, not 12"),
    ("coco-image-id-list", "coco", coco(image={"id": [1]}), "images[0]: 'id' must be an integer or a string"),
    ("coco-image-id-float", "coco", coco(image={"id": 1.5}), "'id' must be an integer or a string, not 1.5"),
    ("coco-width-abc", "coco", coco(image={"width": "abc"}), 'width must be a positive integer, not "abc"'),
    ("coco-height-negative", "coco", coco(image={"height": -40}), "height must be a positive integer, not -40"),
    ("coco-size-huge", "coco", coco(image={"height": 10 ** 6, "width": 10 ** 6}), "is more than the"),
    ("coco-category-id-list", "coco", coco(category={"id": [1]}), "categories[0]: 'id' must be an integer"),
    ("coco-category-name-null", "coco", coco(category={"name": None}), "'name' must be a string, not null"),
    ("coco-annotation-image-id-list", "coco", coco(annotation={"image_id": [1]}), "'image_id' must be an integer"),
    ("coco-annotation-category-dict", "coco", coco(annotation={"category_id": {"id": 1}}), "'category_id' must be an integer"),
    ("coco-annotations-not-list", "coco", coco(data=lambda d: dict(d, annotations={"1": {}})), "'annotations' must be a list"),
    ("coco-image-not-object", "coco", coco(data=lambda d: dict(d, images=[7])), "images[0] is not an object"),
    ("coco-top-level-list", "coco", [1, 2, 3], "not COCO instance annotations"),
    ("coco-deep-nesting", "coco", "[" * 100000 + "]" * 100000, "malformed JSON"),
    ("coco-empty-file", "coco", "", "malformed JSON"),
    ("coco-not-utf8", "coco", b"\xff\xfe{\x00", "cannot read"),
    ("labelme-nan-point", "labelme", labelme({"points": [[10, 5], [float("nan"), 5], [30, 25]]}), "coordinate nan is not finite"),
    ("labelme-1e300-point", "labelme", labelme({"points": [[10, 5], [1e300, 5], [30, 25]]}), "coordinate 1e+300 is beyond"),
    ("labelme-point-three-values", "labelme", labelme({"points": [[10, 5, 1], [30, 5], [30, 25]]}), "point [10, 5, 1] is not [x, y]"),
    ("labelme-points-not-list", "labelme", labelme({"points": "10,5"}), "'points' must be a list"),
    ("labelme-label-null", "labelme", labelme({"label": None}), "'label' must be a non-empty string"),
    ("labelme-label-number", "labelme", labelme({"label": 3}), "'label' must be a non-empty string, not 3"),
    ("labelme-group-id-list", "labelme", labelme({"group_id": [1]}), "'group_id' must be an integer or a string"),
    ("labelme-shape-type-number", "labelme", labelme({"shape_type": 5}), "'shape_type' must be a string"),
    ("labelme-image-path-null", "labelme", labelme(imagePath=None), "'imagePath' must be a non-empty string"),
    ("labelme-height-abc", "labelme", labelme(imageHeight="abc"), "height must be a positive integer"),
    ("labelme-size-huge", "labelme", labelme(imageHeight=10 ** 6, imageWidth=10 ** 6), "is more than the"),
    ("labelme-shapes-not-list", "labelme", labelme(shapes={"0": {}}), "not a labelme file"),
    ("labelme-mask-null", "labelme", labelme(labelme_mask(None)), "a mask shape needs its 'mask' as a base64 PNG string, not null"),
    ("labelme-mask-number", "labelme", labelme(labelme_mask(7)), "a mask shape needs its 'mask' as a base64 PNG string, not 7"),
    ("labelme-mask-three-points", "labelme", labelme(labelme_mask(b"x", ((1, 1), (5, 5), (9, 9)))), "a mask shape needs 2 points"),
    ("labelme-mask-not-base64", "labelme", labelme(labelme_mask("not base64!")), "'mask' is not base64 text"),
    ("labelme-mask-not-png", "labelme", labelme(labelme_mask(b"GIF? no, text")), "not an image file"),
    ("labelme-mask-huge-png", "labelme", labelme(labelme_mask(png_header_bytes(100000, 100000))), "'mask': image too large"),
    ("via-nan-x", "via", via(poly_x([10, float("nan"), 30])), "coordinate nan is not finite"),
    ("via-1e300-x", "via", via(poly_x([10, 1e300, 30])), "coordinate 1e+300 is beyond"),
    ("via-string-x", "via", via(poly_x([10, "30", 30])), 'coordinate "30" is not a number'),
    ("via-lengths-differ", "via", via(poly_x([10, 30])), "all_points_x has 2 values but all_points_y 3"),
    ("via-rect-width-abc", "via", via({"shape_attributes": {"name": "rect", "x": 1, "y": 1, "width": "abc", "height": 3}}), 'coordinate "abc" is not a number'),
    ("via-filename-null", "via", via(filename=None), "'filename' must be a non-empty string"),
    ("via-regions-string", "via", via(regions="none"), "'regions' must be a list or object"),
]

#: Cases that crashed or exhausted memory before: also run as capped processes.
ONCE_BLEW_UP = ["coco-nan-vertex", "coco-1e300-vertex", "coco-rle-huge-size", "coco-rle-runs-overflow",
                "labelme-nan-point", "labelme-mask-huge-png"]


def write_case(root: Path, kind: str, content) -> list[str]:
    """Write one case (with a valid 60x40 a.png beside it); the annotation arguments."""
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (60, 40), (90, 90, 90)).save(root / "a.png")
    name = "via.json" if kind == "via" else "a.json"
    path = root / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))   # NaN / Infinity as Python's json writes them
    if kind == "coco":
        return ["--coco", str(path), "--images", str(root)]
    if kind == "via":
        return ["--via", str(path), "--images", str(root)]
    return ["--labelme", str(root)]


@pytest.mark.parametrize("case, kind, content, why", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_bad_annotation_file_is_one_error_line(tmp_path, capsys, case, kind, content, why):
    args = write_case(tmp_path, kind, content)
    rc = main(["check-data"] + args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert why in err, err
    assert str(tmp_path) in err  # names the file


def png_header_only(path: Path, width: int, height: int) -> None:
    """Write :func:`png_header_bytes` to ``path``."""
    path.write_bytes(png_header_bytes(width, height))


IMAGE_CASES = [
    ("png-100000-square", lambda p: png_header_only(p, 100000, 100000), "image too large"),
    ("png-over-pixel-limit", lambda p: png_header_only(p, 12000, 9000), "image too large"),
    ("png-truncated", lambda p: p.write_bytes((Path(__file__).parent / "test_images.py").read_bytes()[:50]),
     "not an image file"),
    ("float-image", lambda p: Image.fromarray(np.ones((40, 60), np.float32)).save(p, format="TIFF"),
     "floating-point pixels"),
]


@pytest.mark.parametrize("case, make, why", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_bad_image_is_a_check_error(tmp_path, capsys, case, make, why):
    """An unusable image is an error of check-data (exit 1), one line naming it."""
    args = write_case(tmp_path, "coco", coco())
    make(tmp_path / "a.png")
    assert main(["check-data"] + args) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if str(tmp_path / "a.png") in line]
    assert len(lines) == 1 and why in lines[0], lines


LABEL_CASES = [
    ("labels-rgb", lambda d: Image.new("RGB", (60, 40)).save(d / "a.png"), "single-channel integers, not mode RGB"),
    ("labels-negative", lambda d: Image.fromarray(np.full((40, 60), -1, np.int32)).save(d / "a.tif"), "negative label"),
    ("labels-huge-header", lambda d: png_header_only(d / "a.png", 100000, 100000), "image too large"),
]


@pytest.mark.parametrize("case, make, why", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_bad_label_image_is_a_check_error(tmp_path, capsys, case, make, why):
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    (tmp_path / "labels").mkdir()
    make(tmp_path / "labels")
    assert main(["check-data", "--images", str(tmp_path), "--labels", str(tmp_path / "labels")]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'a.png'}: " in out and why in out, out


@pytest.mark.parametrize("content, why", [
    ([1, 2], "classes must be a JSON object"),
    ({"a": ["x"]}, "'a' must map instances to classes"),
    ({"a": {"1": None}}, "class must be an integer or a string, not null"),
    ({}, "names no classes"),
])
def test_bad_classes_file(tmp_path, capsys, content, why):
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    Image.fromarray(np.ones((40, 60), np.uint8)).save(tmp_path / "labels" / "a.png")
    (tmp_path / "c.json").write_text(json.dumps(content))
    rc = main(["check-data", "--images", str(tmp_path), "--labels", str(tmp_path / "labels"),
               "--classes", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and why in err and "c.json" in err, err


#: Runs each command line of argv[1] (JSON) through ``maskrcnn.cli.main`` in one process whose
#: address space is capped; prints ``[[exit status, stderr], ...]``.  One process for all the
#: cases keeps the suite quick (torch is imported once).
CAPPED_RUNNER = """
import contextlib, io, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
from maskrcnn.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


def test_once_fatal_inputs_in_a_capped_process(tmp_path):
    """check-data and train --steps 1 on the inputs that once segfaulted or ate 17 GB: one error
    line each, exit 2, in a real process under a 6 GB address-space cap."""
    cases = {c[0]: c for c in JSON_CASES}
    runs = []
    for name in ONCE_BLEW_UP:
        _, kind, content, why = cases[name]
        args = write_case(tmp_path / name, kind, content)
        runs.append((name, why, ["check-data", *args]))
        if name in ("coco-nan-vertex", "labelme-nan-point"):   # what the issue saw crash train
            runs.append((name, why, ["train", *args, "--out", str(tmp_path / name / "run"), "--steps", "1",
                                     "--workers", "0", "--device", "cpu"]))
    proc = subprocess.run([sys.executable, "-c", CAPPED_RUNNER.format(cap=MEMORY_CAP),
                           json.dumps([argv for _, _, argv in runs])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (name, why, argv), (rc, err) in zip(runs, json.loads(proc.stdout.splitlines()[-1])):
        assert rc == 2, f"{name} {argv[0]}: rc {rc}\n{err}"
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and why in lines[0], f"{name} {argv[0]}: {err}"


def test_masks_beyond_the_memory_limit_refused_before_allocating(tmp_path, capsys, monkeypatch):
    """A label image of random values (one instance per pixel) or a file with a flood of
    annotations on one image: refused from the count, not after allocating N x H x W."""
    from maskrcnn.data import records
    monkeypatch.setattr(records, "MAX_MASK_BYTES", 10 * 60 * 40)
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.arange(40 * 60, dtype=np.int32).reshape(40, 60)).save(tmp_path / "labels" / "a.tif")
    assert main(["check-data", "--images", str(tmp_path), "--labels", str(tmp_path / "labels")]) == 1
    assert "2399 instances of 60x40 would need 0 GB of masks" in capsys.readouterr().out
    flood = coco(data=lambda d: dict(d, annotations=[dict(d["annotations"][0], id=i) for i in range(11)]))
    args = write_case(tmp_path / "flood", "coco", flood)
    assert main(["check-data"] + args) == 1
    assert "a.png: 11 instances of 60x40 would need" in capsys.readouterr().out
