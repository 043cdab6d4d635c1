"""Dataset API, COCO / labelme / VIA readers, the torch view and the transforms."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_samples import (GRAY_CAT, GRAY_CROWD, RGB_DOG, box_mask, coco_sample, labelme_file, labelme_sample,
                          labelme_shape, uncompressed_rle, via_sample, write_json)
from PIL import Image
from torchvision import tv_tensors

import maskrcnn
from maskrcnn.data import (Dataset, TorchDataset, build_transforms, collate, open_dataset, read_coco,
                           read_labelme, read_via)
from maskrcnn.data.segmentation import segmentation_to_mask
from maskrcnn.data.transforms import InstanceTransform
from maskrcnn.errors import DataError


# ---- Matterport's API ---------------------------------------------------------------------------
class ShapesLike(Dataset):
    """A Matterport-style subclass, written as in Matterport's samples."""

    def load_items(self, folder):
        self.add_class("toy", 1, "square")
        self.add_class("toy", 2, "disc")
        self.add_class("toy", 1, "square")  # repeats are ignored
        for i in range(2):
            Image.fromarray(np.full((8, 10, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
            self.add_image("toy", image_id=f"img{i}", path=folder / f"{i}.png", shapes=[("square", i)])

    def load_mask(self, image_id):
        mask = np.zeros((8, 10, 2), bool)
        mask[1:4, 2:6, 0] = True
        mask[5:8, 6:9, 1] = True
        return mask, np.array([1, -2], np.int32)


def test_matterport_subclass_ports(tmp_path):
    ds = ShapesLike()
    ds.load_items(tmp_path)
    ds.prepare()
    assert ds.class_names == ["BG", "square", "disc"] and ds.num_classes == 3
    assert list(ds.image_ids) == [0, 1]
    assert ds.map_source_class_id("toy.2") == 2
    assert ds.get_source_class_id(2, "toy") == 2
    assert ds.source_class_ids == {"": [0], "toy": [0, 1, 2]}
    assert ds.image_info[1]["shapes"] == [("square", 1)]
    assert ds.image_reference(1).endswith("1.png")
    assert ds.load_image(1).shape == (8, 10, 3)
    assert maskrcnn.Dataset is Dataset

    image, target = TorchDataset(ds)[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 10) and int(image[0, 0, 0]) == 40
    assert target["boxes"].tolist() == [[2, 1, 6, 4], [6, 5, 9, 8]]
    assert target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [1, 2] and target["labels"].dtype == torch.int64
    assert target["iscrowd"].tolist() == [False, True]
    assert target["masks"].dtype == torch.bool and target["masks"].shape == (2, 8, 10)
    assert target["image_id"] == 1


def test_torch_dataset_needs_prepare(tmp_path):
    with pytest.raises(ValueError, match="prepare"):
        TorchDataset(Dataset())


# ---- COCO ---------------------------------------------------------------------------------------
@pytest.fixture
def coco(tmp_path):
    return coco_sample(tmp_path)


def test_coco_categories_mapped_to_contiguous_ids(coco):
    ds = read_coco(*coco)
    assert ds.class_names == ["BG", "cat", "dog", "bird"]
    assert ds.category_ids == [0, 7, 18, 42]
    assert ds.map_source_class_id("coco.18") == 2
    assert [info["id"] for info in ds.image_info] == [5, 9, 11]
    assert ds.problems == []


def test_coco_polygon_and_compressed_rle(coco):
    ds = read_coco(*coco)
    masks, class_ids = ds.load_mask(0)
    assert masks.shape == (40, 60, 2) and class_ids.tolist() == [1, 2]
    np.testing.assert_array_equal(masks[:, :, 0], box_mask(40, 60, 5, 25, 10, 30))
    np.testing.assert_array_equal(masks[:, :, 1], RGB_DOG)


def test_coco_uncompressed_rle_and_crowd(coco):
    ds = read_coco(*coco)
    masks, class_ids = ds.load_mask(1)
    assert class_ids.tolist() == [1, -2]  # the crowd region carries a negative id
    np.testing.assert_array_equal(masks[:, :, 0], GRAY_CAT)
    np.testing.assert_array_equal(masks[:, :, 1], GRAY_CROWD)
    image, target = TorchDataset(ds)[1]
    assert image.shape == (3, 30, 30)
    assert torch.equal(image[0], image[1])  # grayscale replicated
    assert target["labels"].tolist() == [1, 2]
    assert target["iscrowd"].tolist() == [False, True]
    assert target["boxes"].tolist() == [[3, 2, 13, 11], [15, 15, 29, 26]]


def test_coco_image_without_annotations(coco):
    image, target = TorchDataset(read_coco(*coco))[2]
    assert image.shape == (3, 20, 24)  # RGBA -> RGB
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (0, 20, 24) and target["iscrowd"].shape == (0,)


def test_coco_bbox_only_annotation_is_a_rectangle(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    ann = write_json(tmp_path / "a.json", {
        "images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 5, 4]}]})
    masks, _ = read_coco(ann, tmp_path).load_mask(0)
    np.testing.assert_array_equal(masks[:, :, 0], box_mask(10, 20, 3, 7, 2, 7))


@pytest.mark.parametrize("text, why", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"images": []}', "no 'categories' list"),
    ('{"images": [{"id": 1}], "categories": []}', r"images\[0\] has no 'file_name'"),
])
def test_coco_malformed_files(tmp_path, text, why):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(DataError, match=rf"bad\.json: .*{why}"):
        read_coco(tmp_path / "bad.json", tmp_path)


# ---- labelme --------------------------------------------------------------------------------------
def test_labelme_shapes(tmp_path):
    ds = read_labelme(labelme_sample(tmp_path))
    assert ds.class_names == ["BG", "car", "person"]
    street = [i for i, info in enumerate(ds.image_info) if info["id"] == "street"][0]
    masks, class_ids = ds.load_mask(street)
    assert class_ids.tolist() == [2, 1, 1]
    np.testing.assert_array_equal(masks[:, :, 0], box_mask(32, 48, 2, 20, 2, 12))
    np.testing.assert_array_equal(masks[:, :, 1], box_mask(32, 48, 4, 10, 20, 30))  # rectangle, corners swapped
    np.testing.assert_array_equal(masks[:, :, 2], box_mask(32, 48, 20, 30, 34, 40) | box_mask(32, 48, 20, 30, 42, 46))
    empty = 1 - street
    image, target = TorchDataset(ds)[empty]
    assert image.shape == (3, 16, 16) and len(target["labels"]) == 0  # palette PNG, no shapes


def test_labelme_non_region_shape_recorded(tmp_path):
    folder = tmp_path / "lm"
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    write_json(folder / "a.json", {"shapes": [{"label": "x", "points": [[1, 1], [5, 5]], "shape_type": "line"}],
                                   "imagePath": "../a.png"})
    ds = read_labelme(folder)
    assert [str(p) for p in ds.problems] == [f"{folder / 'a.json'}: shape 0 ('x'): shape type 'line' is not a "
                                             "region (use polygon, rectangle, circle, oriented_rectangle, mask); "
                                             "skipped"]
    assert ds.load_mask(0)[0].shape == (10, 10, 0)


#: The "octagon" of labelme 6.3.1's examples/primitives/primitives.json (MIT licence, Kentaro
#: Wada): a mask shape from labelme's AI-mask tool, a 100x100 base64 PNG (mode L) placed by its box.
OCTAGON_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAGQAAABkCAAAAABVicqIAAABd0lEQVR4nN3aUYrDMAwE0Bnd/86zdMt2aWI7TqwRJPooFGS9SE5DwSH"
    "OBV8furLoQq48CDfflY6005SJ9JOUhBxlaB2Z6VRryPRtoatlztzdGDLMIcYMk4Shw0SiyzCV6DBMJppM5BvgGEkxsCuz6QQWJUZXkB"
    "XhKcsuktkIe0hqsI24dgS+TtpIdiNsIcYIX2nuEd+2wzoubhFnI7BuPL8RayO4+y2Mz4CiYFowj4v/iLkRPGDj8R5SFEwLVeOiFeB"
    "TNh6vVsK/7SgaF+0En7LxeBDCCkSPGRdCFQjsoapbWGZBdT9GVSDeUOWzS8b6+kPsER/OjfhCv5+FT2FVIK7QF6L7dqINort2ogoEO8"
    "Q5r/CVVgPRHTtRE9H9OlEHsbUSrsJdJLEVdRFXRN9fCQ0Qj4ENktOK7CemODzMzGhGc9dN+wHzgiP3mwU4feh/ntFCnUlGq1XofqV"
    "kJkerBQ6ztLZ8JlELaydTdXnldLL1zzMvPAt+AJy8O66XXMiCAAAAAElFTkSuQmCC")


def primitives_json(**shape_changes) -> dict:
    """labelme 6.3.1's own examples/primitives/primitives.json (written by labelme 5.7.0),
    shapes as in the file; ``shape_changes`` replace the octagon's keys."""
    def shape(label, points, kind, mask=None, description=None):
        return {"label": label, "points": points, "group_id": None, "description": description,
                "shape_type": kind, "flags": {}, "mask": mask}
    octagon = dict(shape("octagon", [[417.39759036144574, 305.0], [516.3975903614457, 404.0]], "mask",
                         OCTAGON_PNG, ""), **shape_changes)
    return {"version": "5.7.0", "flags": {}, "shapes": [
        shape("rectangle", [[32.0, 35.0], [132.0, 135.0]], "rectangle"),
        shape("circle", [[195.0, 84.0], [225.0, 125.0]], "circle"),
        shape("rectangle", [[391.0, 33.0], [542.0, 135.0]], "rectangle"),
        shape("polygon", [[69.0, 318.0], [45.0, 403.0], [173.0, 406.0], [198.0, 321.0]], "polygon"),
        shape("line", [[188.0, 178.0], [160.0, 224.0]], "line"),
        shape("point", [[345.0, 174.0]], "point"),
        shape("line_strip", [[440.53703703703707, 181.46296296296293], [402.53703703703707, 274.46296296296293],
                             [544.5370370370371, 275.46296296296293]], "linestrip"),
        octagon], "imagePath": "primitives.jpg", "imageData": None, "imageHeight": 450, "imageWidth": 560}


def octagon_pixels() -> np.ndarray:
    """The octagon PNG as labelme itself pastes it: ``mask[y1:y2 + 1, x1:x2 + 1] = png`` with
    the points cast to int."""
    import base64
    import io
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(OCTAGON_PNG)))) > 0
    full = np.zeros((450, 560), dtype=bool)
    full[305:405, 417:517] = png
    return full


def test_labelme_mask_shapes_from_labelmes_own_example(tmp_path):
    """labelme's AI-mask tool writes ``shape_type: "mask"``: the instance is read, pixel for pixel
    as labelme pastes it, not skipped; the regions around it are read as before."""
    folder = tmp_path / "primitives"
    folder.mkdir()
    Image.new("RGB", (560, 450), (200, 200, 200)).save(folder / "primitives.jpg")
    write_json(folder / "primitives.json", primitives_json())
    ds = read_labelme(folder)
    masks, class_ids = ds.load_mask(0)
    names = [ds.class_names[i] for i in class_ids]
    assert names == ["rectangle", "circle", "rectangle", "polygon", "octagon"]
    octagon = masks[:, :, names.index("octagon")]
    assert octagon.sum() == 7275
    np.testing.assert_array_equal(octagon, octagon_pixels())
    assert [p.where for p in ds.problems] == ["shape 4 ('line')", "shape 5 ('point')", "shape 6 ('line_strip')"]
    assert ds.class_names == ["BG", "circle", "octagon", "polygon", "rectangle"]   # no class for line, point
    image, target = TorchDataset(ds)[0]   # what training reads
    assert target["masks"].shape == (5, 450, 560) and int(target["masks"][4].sum()) == 7275


def test_labelme_mask_shape_fixed_and_reported(tmp_path):
    """A mask reaching past the image is clipped, a PNG whose size disagrees with its box is
    placed by the box's corner: both reported as warnings, the instance kept; a mask shape
    grouped with a polygon is one instance; oriented rectangles are regions; without
    imageHeight/imageWidth the image's own size is used."""
    from maskrcnn.data.dataset import WARNING
    folder = tmp_path / "lm"
    folder.mkdir()
    Image.new("RGB", (560, 450)).save(folder / "primitives.jpg")
    moved = primitives_json(points=[[500.2, 400.0], [599.2, 499.0]])   # 60 columns, 50 rows inside
    write_json(folder / "moved.json", moved)
    data = primitives_json(points=[[417.9, 305.0], [466.0, 354.0]], group_id=3)   # box 50x50, PNG 100x100
    data["shapes"] = [data["shapes"][-1], {"label": "octagon", "points": [[10, 10], [40, 10], [40, 30], [10, 30]],
                                           "group_id": 3, "shape_type": "polygon"},
                      {"label": "tilted", "points": [[100, 100], [140, 110], [130, 150], [90, 140]],
                       "shape_type": "oriented_rectangle"}]
    del data["imageHeight"], data["imageWidth"]
    write_json(folder / "grouped.json", data)
    ds = read_labelme(folder)
    warnings = {p.file.split("/")[-1]: p.message for p in ds.problems if p.severity == WARNING}
    assert warnings == {"moved.json": "mask reaches outside the 560x450 image; clipped to the image",
                        "grouped.json": "its PNG is 100x100 but its points span 50x50; pasted at (417, 305)"}
    by_id = {info["id"]: i for i, info in enumerate(ds.image_info)}
    moved_masks, _ = ds.load_mask(by_id["moved"])
    expected = np.zeros((450, 560), dtype=bool)
    expected[400:450, 500:560] = octagon_pixels()[305:355, 417:477]
    np.testing.assert_array_equal(moved_masks[:, :, -1], expected)
    grouped, ids = ds.load_mask(by_id["grouped"])
    assert [ds.class_names[i] for i in ids] == ["octagon", "tilted"]
    square = segmentation_to_mask([[10, 10, 40, 10, 40, 30, 10, 30]], 450, 560)
    np.testing.assert_array_equal(grouped[:, :, 0], square | octagon_pixels())   # both parts, one instance
    tilted = segmentation_to_mask([[100, 100, 140, 110, 130, 150, 90, 140]], 450, 560)
    np.testing.assert_array_equal(grouped[:, :, 1], tilted)
    assert tilted.sum() > 1000


# ---- VIA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_via_regions(tmp_path, version):
    ds = read_via(*via_sample(tmp_path, version), class_attribute="kind")
    assert ds.class_names == ["BG", "blue", "red"]
    masks, class_ids = ds.load_mask(0)
    assert class_ids.tolist() == [2, 1, 2, 1]
    np.testing.assert_array_equal(masks[:, :, 0], box_mask(40, 40, 4, 14, 4, 14))
    np.testing.assert_array_equal(masks[:, :, 1], box_mask(40, 40, 2, 8, 20, 30))
    yy, xx = np.mgrid[:40, :40] + 0.5
    circle = (xx - 10) ** 2 + (yy - 30) ** 2 <= 25
    assert (masks[:, :, 2] != circle).sum() <= 8  # a 64-gon: only edge pixels may differ
    assert masks[30, 22:38, 3].sum() == 12 and masks[30, 24:36, 3].all() and not masks[34, 30, 3]  # rx = 6 across, ry = 3 down
    assert ds.load_mask(1)[0].shape == (24, 24, 0)


def test_via_default_single_class(tmp_path):
    ds = read_via(*via_sample(tmp_path, 1))
    assert ds.class_names == ["BG", "object"]
    assert ds.load_mask(0)[1].tolist() == [1, 1, 1, 1]


def test_via2_project_file(tmp_path):
    path, images = via_sample(tmp_path, 2)
    import json
    project = {"_via_settings": {}, "_via_img_metadata": json.loads(path.read_text()), "_via_attributes": {}}
    write_json(tmp_path / "project.json", project)
    ds = read_via(tmp_path / "project.json", images, class_attribute="kind")
    assert len(ds.image_info) == 2 and ds.class_names == ["BG", "blue", "red"]
    assert ds.load_mask(0)[1].tolist() == [2, 1, 2, 1] and ds.load_mask(1)[1].tolist() == []


def test_labelme_coco_background_category_is_not_a_class(tmp_path):
    """labelme's COCO export lists {"id": 0, "name": "_background_"}, used by no annotation."""
    ann, images = coco_sample(tmp_path)
    data = json.loads(ann.read_text())
    data["categories"].insert(0, {"id": 0, "name": "_background_", "supercategory": None})
    write_json(ann, data)
    ds = read_coco(ann, images)
    assert ds.class_names == ["BG", "cat", "dog", "bird"] and ds.category_ids == [0, 7, 18, 42]
    # A category named so that annotations do use is a class.
    data["annotations"][0]["category_id"] = 0
    write_json(ann, data)
    assert read_coco(ann, images).class_names == ["BG", "_background_", "cat", "dog", "bird"]


def test_cvat_export_with_every_annotation_crowd_is_read_as_instances(tmp_path):
    """CVAT's COCO export marks each mask (RLE) annotation iscrowd=1 (cvat-ai/cvat#7030): read
    as crowd regions, such a file trains no instance at all.  A file where every annotation is
    crowd is read as instances, with a warning; a file that mixes both keeps COCO's meaning."""
    from maskrcnn.data.dataset import WARNING
    ann, images = coco_sample(tmp_path)
    data = json.loads(ann.read_text())
    for a in data["annotations"]:
        a["iscrowd"] = 1
        if isinstance(a["segmentation"], list):   # CVAT writes masks as uncompressed RLE
            a["segmentation"] = uncompressed_rle(box_mask(40, 60, 5, 25, 10, 30))
    write_json(ann, data)
    ds = read_coco(ann, images)
    assert [(p.severity, p.message) for p in ds.problems] == [(WARNING, (
        "every annotation (4) is iscrowd=1, as CVAT's COCO export marks each mask; read as instances "
        "(crowd regions would train nothing)"))]
    by_id = {info["id"]: i for i, info in enumerate(ds.image_info)}
    assert (ds.load_mask(by_id[5])[1] > 0).all() and (ds.load_mask(by_id[9])[1] > 0).all()
    assert read_coco(*coco_sample(tmp_path / "mixed")).load_mask(1)[1].tolist() == [1, -2]   # COCO's crowd


def test_images_named_by_another_machines_path_are_found_by_file_name(tmp_path):
    """Exporters write the paths of their own machine: Windows separators, an absolute path,
    Label Studio's upload folder, a URL (VIA).  Where the path is missing under --images the
    file of that name there is used, and one warning says so."""
    from maskrcnn.data.dataset import WARNING
    ann, images = coco_sample(tmp_path)
    data = json.loads(ann.read_text())
    names = ["C:\\Users\\me\\export\\rgb.png", "/data/upload/1/gray.png", "rgba.png"]
    for entry, name in zip(data["images"], names):
        entry["file_name"] = name
    write_json(ann, data)
    ds = read_coco(ann, images)
    assert sorted(p.name for p in map(Path, (i["path"] for i in ds.image_info))) == ["gray.png", "rgb.png", "rgba.png"]
    assert all(Path(i["path"]).parent == images for i in ds.image_info)
    assert [(p.severity, p.message) for p in ds.problems] == [(WARNING, (
        f"2 image(s) found in {images} by file name, not at the path the file gives "
        "(e.g. 'C:\\\\Users\\\\me\\\\export\\\\rgb.png')"))]
    assert len(ds.load_mask(0)[1]) == 2
    data["images"][2]["file_name"] = "sub\\rgba.png"     # a Windows relative path that exists as written
    (images / "sub").mkdir()
    (images / "rgba.png").rename(images / "sub" / "rgba.png")
    write_json(ann, data)
    assert Path(read_coco(ann, images).image_info[2]["path"]) == images / "sub" / "rgba.png"
    via_json, via_images = via_sample(tmp_path / "via", 2)
    via = json.loads(via_json.read_text())
    via["b1.jpg1234"]["filename"] = "https://example.org/balloons/b1.jpg"
    write_json(via_json, via)
    ds = read_via(via_json, via_images)
    assert Path(ds.image_info[0]["path"]) == via_images / "b1.jpg" and len(ds.load_mask(0)[1]) == 4


def test_roboflow_root_category_is_not_a_class(tmp_path):
    """Roboflow's COCO export puts a root category first, named after the project, that every
    class names as its supercategory and no annotation uses (roboflow-100-benchmark#45:
    ``{"id": 0, "name": "peixos", "supercategory": "none"}, {"id": 1, "name": "peix",
    "supercategory": "peixos"}, ...``).  A supercategory that annotations use, or one that has
    a parent itself, stays a class; COCO's own categories (supercategory "person" of
    "person", "vehicle" of no category) lose nothing."""
    ann, images = coco_sample(tmp_path)
    data = json.loads(ann.read_text())
    for cat in data["categories"]:
        cat["supercategory"] = "pets"
    data["categories"].insert(0, {"id": 0, "name": "pets", "supercategory": "none"})
    write_json(ann, data)
    ds = read_coco(ann, images)
    assert ds.class_names == ["BG", "cat", "dog", "bird"] and ds.category_ids == [0, 7, 18, 42]
    used = dict(data, annotations=[dict(data["annotations"][0], category_id=0)] + data["annotations"][1:])
    write_json(ann, used)
    assert read_coco(ann, images).class_names == ["BG", "pets", "cat", "dog", "bird"]
    nested = dict(data, categories=[dict(data["categories"][0], supercategory="animals")] + data["categories"][1:])
    write_json(ann, nested)
    assert read_coco(ann, images).class_names == ["BG", "pets", "cat", "dog", "bird"]
    coco_style = dict(data, categories=[dict(c, supercategory=c["name"]) for c in data["categories"][1:]])
    write_json(ann, coco_style)
    assert read_coco(ann, images).class_names == ["BG", "cat", "dog", "bird"]


def test_polygons_far_outside_the_image_are_clipped():
    from pycocotools import mask as mask_utils

    from maskrcnn.data.segmentation import clip_ring
    ring = [-30.0, -10.0, 50.0, -10.0, 50.0, 35.385, -30.0, 35.385]
    clipped = clip_ring(ring, 30, 40, margin=0.0)
    assert sorted(zip(clipped[::2], clipped[1::2])) == [(0, 0), (0, 30), (40, 0), (40, 30)]
    assert clip_ring(ring, 30, 40) is ring          # within the default margin (the longer side): as it is
    assert clip_ring([50.0, 50.0, 60.0, 50.0, 60.0, 60.0], 30, 40, margin=0.0) == []
    # Rings reaching far out, concave ones too: the mask is pycocotools' mask of the unclipped
    # ring up to the 1/5-pixel rounding of the new vertices (a pixel or so along an edge).
    rng = np.random.default_rng(3)
    for _ in range(50):
        ring = rng.uniform(-200, 300, 14).tolist()
        reference = mask_utils.decode(mask_utils.frPyObjects([ring], 30, 40))[:, :, 0].astype(bool)
        assert (segmentation_to_mask([ring], 30, 40) != reference).sum() <= 12
    # A vertex at 1e6 costs no more than one inside the image.
    huge = [5.0, 5.0, 1e6, 5.0, 1e6, 20.0, 5.0, 20.0]
    assert segmentation_to_mask([huge], 30, 40)[5:20, 5:].all()


def test_rle_string_runs_decoded_as_pycocotools_does():
    from pycocotools import mask as mask_utils

    from maskrcnn.data.segmentation import rle_string_counts
    mask = np.zeros((30, 40), np.uint8)
    mask[3:20, 5:37] = 1
    mask[25:, :3] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    runs = rle_string_counts(rle["counts"].decode(), "x")
    assert sum(runs) == 30 * 40
    assert mask_utils.decode(mask_utils.frPyObjects({"size": [30, 40], "counts": runs}, 30, 40)).tolist() == mask.tolist()


# ---- open_dataset ---------------------------------------------------------------------------------
def test_open_dataset_dispatches(tmp_path):
    ann, images = coco_sample(tmp_path)
    assert open_dataset(coco=ann, images=images).class_names[1] == "cat"
    assert len(open_dataset(images=images).image_info) == 3
    with pytest.raises(DataError, match="give one of"):
        open_dataset(coco=ann, via=ann, images=images)
    with pytest.raises(DataError, match="images folder is needed"):
        open_dataset(coco=ann)


# ---- transforms and collate ---------------------------------------------------------------------
def _target(masks, labels, crowd):
    from maskrcnn.data.dataset import instances_target
    class_ids = np.where(crowd, -np.asarray(labels), labels)
    return instances_target(np.stack(masks, axis=2), class_ids, 0)


def test_flip_moves_image_boxes_and_masks_together():
    image = torch.zeros(3, 10, 20, dtype=torch.uint8)
    image[:, 2:5, 1:4] = 255
    target = _target([box_mask(10, 20, 2, 5, 1, 4)], [3], [False])
    flip = build_transforms(True, hflip_prob=1.0, scale_range=(1.0, 1.0), brightness=0, contrast=0,
                            saturation=0, hue=0)
    out_image, out = flip(image, target)
    assert type(out_image) is torch.Tensor and type(out["boxes"]) is torch.Tensor
    assert out["boxes"].tolist() == [[16, 2, 19, 5]]
    assert torch.equal(out["masks"][0], torch.from_numpy(box_mask(10, 20, 2, 5, 16, 19)))
    assert (out_image[0] == 255).nonzero().min(0).values.tolist() == [2, 16]
    assert out["labels"].tolist() == [3] and out["masks"].dtype == torch.bool


def test_scale_jitter_drops_instances_pushed_out():
    # Zooming in by 2 about the centre of a 40x40 image keeps the middle 20x20 only.
    target = _target([box_mask(40, 40, 0, 4, 0, 4), box_mask(40, 40, 18, 22, 18, 22)], [1, 2], [True, False])
    zoom = build_transforms(True, hflip_prob=0.0, scale_range=(2.0, 2.0), brightness=0, contrast=0,
                            saturation=0, hue=0)
    _, out = zoom(torch.zeros(3, 40, 40, dtype=torch.uint8), target)
    assert out["labels"].tolist() == [2] and out["iscrowd"].tolist() == [False]
    assert out["boxes"].tolist() == [[16, 16, 24, 24]]
    assert int(out["masks"].sum()) == 64


def test_scale_jitter_zooms_about_the_centre_as_an_affine_zoom_does():
    """ScaleAboutCentre (a resize and a centre crop or pad) puts each mask where
    v2.RandomAffine's zoom about the centre puts it, in and out, within a pixel at the edges,
    and the boxes stay the masks' tight boxes."""
    from torchvision.transforms import v2

    from maskrcnn.data.transforms import ScaleAboutCentre
    masks = [box_mask(60, 90, 10, 25, 8, 30), box_mask(60, 90, 30, 52, 50, 85)]
    for scale in (0.8, 1.0, 1.25):
        target = _target(masks, [1, 2], [False, False])
        only = dict(hflip_prob=0.0, scale_range=(scale, scale), brightness=0, contrast=0, saturation=0, hue=0)
        image = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8)
        out_image, out = build_transforms(True, **only)(image, target)
        affine = v2.RandomAffine(degrees=0.0, scale=(scale, scale))
        _, reference = InstanceTransform(affine)(image, _target(masks, [1, 2], [False, False]))
        assert out_image.shape == image.shape and out["masks"].shape == (2, 60, 90)
        assert (out["masks"] != reference["masks"]).sum(dim=(1, 2)).le(2 * (60 + 90) * 0.5 * scale).all()
        assert (out["boxes"] - reference["boxes"]).abs().max() <= 1
        if scale == 1.0:
            assert torch.equal(out_image, image) and torch.equal(out["masks"], target["masks"])
        # the picture moves with its masks: a white silhouette stays on its mask
        silhouette = (_target(masks, [1, 2], [False, False])["masks"].any(0) * 255).to(torch.uint8).expand(3, -1, -1)
        moved, placed = build_transforms(True, **only)(silhouette.clone(), _target(masks, [1, 2], [False, False]))
        white, union = moved[0] > 127, placed["masks"].any(0)
        assert (white & union).sum() / (white | union).sum() > 0.95
    assert isinstance(build_transforms(True).transform.transforms[1], ScaleAboutCentre)


def _jitter(image, **params):
    """LinearColorJitter's output for the given factors (None: that step left out), in the
    order brightness, contrast, saturation, hue unless ``order`` says otherwise."""
    from maskrcnn.data.transforms import LinearColorJitter
    full = {"order": [0, 1, 2, 3], "brightness": None, "contrast": None, "saturation": None, "turn": None}
    out = LinearColorJitter(0.5, 0.5, 0.5, 0.5).transform(tv_tensors.Image(image), full | params)
    return out.as_subclass(torch.Tensor)


def test_linear_color_jitter_matches_each_of_torchvisions_steps():
    """Brightness, contrast and saturation alone give torchvision's adjust_* within a grey level
    or two where nothing clips (torchvision truncates, this rounds); composed in any order the
    one colour map equals the steps applied one after another (float, unclipped)."""
    from torchvision.transforms.v2 import functional as F

    from maskrcnn.data.transforms import LinearColorJitter
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(60, 190, (3, 24, 40), dtype=torch.uint8, generator=gen)
    for key, value, reference in (("brightness", 1.15, F.adjust_brightness), ("contrast", 0.8, F.adjust_contrast),
                                  ("saturation", 1.2, F.adjust_saturation)):
        diff = (_jitter(image, **{key: value}).int() - reference(image, value).int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 1, key
    pixels = image.reshape(3, -1).double()
    grey = torch.tensor([0.2989, 0.587, 0.114], dtype=torch.float64)
    steps = {0: lambda x: 1.1 * x, 1: lambda x: 0.7 * x + 0.3 * (grey @ x).mean(),
             2: lambda x: 1.3 * x - 0.3 * (grey @ x)[None]}
    params = {"brightness": 1.1, "contrast": 0.7, "saturation": 1.3, "turn": None}
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]):
        a, t = LinearColorJitter.colour_map(params | {"order": order + [3]}, pixels.mean(dim=1))
        expected = pixels
        for step in order:
            expected = steps[step](expected)
        assert torch.allclose(a @ pixels + t[:, None], expected, atol=1e-9), order
    with pytest.raises(ValueError):
        LinearColorJitter(hue=0.7)


def test_linear_color_jitter_turns_hue_and_keeps_greys_and_luma():
    """The hue step: greys stay, luma stays within rounding, a turn and its reverse come back
    within rounding, and a small turn moves colours the way HSV's hue does, by a similar
    amount; a one-channel image is left as it is."""
    from torchvision.transforms.v2 import functional as F
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8, generator=gen)
    image[:, :4] = torch.arange(0, 256, 256 // 48, dtype=torch.uint8)[:48]  # grey rows
    turned = _jitter(image, turn=0.1)
    assert turned.dtype == torch.uint8 and turned.shape == image.shape
    assert (turned[:, :4].int() - image[:, :4].int()).abs().max() <= 1  # greys
    luma = torch.tensor([0.299, 0.587, 0.114])
    unclipped = (turned > 0).all(0) & (turned < 255).all(0)
    assert ((luma @ turned.float().flatten(1) - luma @ image.float().flatten(1)).abs()[unclipped.flatten()].max()
            <= 1.0)
    back = _jitter(turned, turn=-0.1)
    assert (back.int() - image.int())[:, unclipped].abs().float().mean() < 1.0
    assert not torch.equal(turned, image)
    for turn in (0.02, -0.05):  # the same direction as HSV's hue and a similar size
        ours = _jitter(image, turn=turn).float() - image
        hsv = F.adjust_hue(image, turn).float() - image
        assert torch.corrcoef(torch.stack([ours.flatten(), hsv.flatten()]))[0, 1] > 0.5
        assert 0.5 < ours.abs().mean() / hsv.abs().mean() < 2
    assert torch.equal(_jitter(image, turn=0.0), image) and torch.equal(_jitter(image), image)
    assert torch.equal(_jitter(image[:1], turn=0.1, brightness=1.2), image[:1])


def test_color_jitter_changes_pixels_only():
    torch.manual_seed(0)
    image = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    target = _target([box_mask(8, 8, 1, 3, 1, 3)], [1], [False])
    jitter = build_transforms(True, hflip_prob=0.0, scale_range=(1.0, 1.0), brightness=0.5)
    out_image, out = jitter(image, target)
    assert out_image.dtype == torch.uint8 and not torch.equal(out_image, image)
    assert torch.equal(out["masks"], target["masks"]) and torch.equal(out["boxes"], target["boxes"])
    assert build_transforms(False) is None


def test_torch_dataset_with_transforms_and_loader(tmp_path):
    ds = read_coco(*coco_sample(tmp_path))
    data = TorchDataset(ds, build_transforms(True))
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collate)
    images, targets = next(iter(loader))
    assert [tuple(im.shape) for im in images] == [(3, 40, 60), (3, 30, 30), (3, 20, 24)]
    assert [t["image_id"] for t in targets] == [0, 1, 2]
    for t in targets:
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"]) == len(t["iscrowd"])
    assert collate([]) == ([], [])


def test_segmentation_rings_pycocotools_would_misread():
    # A 2-point ring would be read by pycocotools as a box; it contributes nothing instead.
    assert not segmentation_to_mask([[1, 1, 5, 5]], 8, 8).any()


def _b64_png(array: np.ndarray) -> str:
    import base64
    import io
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_labelme_image_embedded_in_the_json(tmp_path):
    """labelme reads ``imageData`` first; its own examples/tutorial/apc2016_obj3.json points
    imagePath at the JSON itself.  The embedded image is used where imagePath is missing or not
    an image (decoded at each load, named by the JSON), the file where it is one."""
    from maskrcnn.cli import main
    folder = tmp_path / "lm"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    shapes = [labelme_shape("cat", [[2, 2], [20, 2], [20, 15], [2, 15]]),
              dict(labelme_shape("dot", [[25.0, 10.0], [34.0, 19.0]], "mask"),
                   mask=_b64_png(np.full((10, 10), 255, np.uint8)))]
    self_pointing = dict(labelme_file("self.json", 30, 40, shapes), imageData=_b64_png(pixels))
    write_json(folder / "self.json", self_pointing)
    missing = dict(labelme_file("gone.png", 30, 40, shapes[:1]), imageData=_b64_png(pixels[::-1].copy()))
    del missing["imageHeight"], missing["imageWidth"]
    write_json(folder / "missing.json", missing)
    Image.fromarray(pixels[:, ::-1].copy()).save(folder / "there.png")
    write_json(folder / "there.json", dict(labelme_file("there.png", 30, 40, shapes[:1]), imageData=_b64_png(pixels)))
    ds = read_labelme(folder)
    by_id = {info["id"]: i for i, info in enumerate(ds.image_info)}
    assert not ds.problems
    np.testing.assert_array_equal(ds.load_image(by_id["self"]), pixels)
    np.testing.assert_array_equal(ds.load_image(by_id["missing"]), pixels[::-1])
    np.testing.assert_array_equal(ds.load_image(by_id["there"]), pixels[:, ::-1])   # the file, not imageData
    assert str(ds.image_info[by_id["self"]]["path"]) == str(folder / "self.json") and ds.image_shape(by_id["missing"]) == (30, 40)
    masks, ids = ds.load_mask(by_id["self"])
    assert [ds.class_names[i] for i in ids] == ["cat", "dot"] and masks[10:20, 25:35, 1].all() and masks[:, :, 1].sum() == 100
    assert main(["check-data", "--labelme", str(folder)]) == 0


@pytest.mark.parametrize("image_data, why", [
    ("not base64!", "'imageData' is not base64 text"),
    (_b64_png(np.zeros((64, 64), np.uint8))[:80], "corrupt or truncated image"),
    ("aGVsbG8gd29ybGQ=", "'imageData': not an image file"),
])
def test_labelme_bad_embedded_image_is_a_check_error(tmp_path, capsys, image_data, why):
    from maskrcnn.cli import main
    folder = tmp_path / "lm"
    write_json(folder / "a.json", dict(labelme_file("gone.png", 4, 4, [labelme_shape("x", [[0, 0], [3, 0], [3, 3]])]),
                                       imageData=image_data))
    assert main(["check-data", "--labelme", str(folder)]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "a.json" in line]
    assert len(lines) == 1 and why in lines[0], lines
