"""check-data, evaluate and detect from the command line: outputs, exit codes, one-line errors."""
import json
from collections import Counter
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from data_samples import coco_sample, labelme_sample, planted_coco_sample, rgb_image, via_sample
from PIL import Image

from maskrcnn import Config, Detections
from maskrcnn.cli import main
from maskrcnn.commands import detect as detect_command

MASKRCNN = Path(sys.executable).with_name("maskrcnn")


def tiny_config(num_classes: int) -> Config:
    return Config(backbone="resnet18", num_classes=num_classes, image_min_dim=64, image_max_dim=64,
                  rpn_anchor_scales=(8, 16, 32, 64, 128), pre_nms_limit=200, post_nms_rois_inference=50,
                  detection_max_instances=5, detection_min_confidence=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A randomly initialised 4-class model (BG, cat, dog, bird), saved."""
    from maskrcnn import MaskRCNN
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny"
    MaskRCNN(tiny_config(4), ["BG", "cat", "dog", "bird"]).save(path)
    return path


def one_line_error(capsys, rc) -> str:
    """The single stderr line of a failed command (asserting exit status 2)."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


# ---- check-data -------------------------------------------------------------------------------
def test_check_data_clean_formats_exit_0(tmp_path, capsys):
    ann, images = coco_sample(tmp_path / "coco")
    assert main(["check-data", "--coco", str(ann), "--images", str(images)]) == 0
    out = capsys.readouterr().out
    assert "3 images, 4 annotations (1 crowd)" in out and "no problems found" in out
    assert [line.split() for line in out.splitlines() if line.startswith(("cat ", "dog ", "bird "))] == \
        [["cat", "2"], ["dog", "2"], ["bird", "0"]]
    assert "the 1 crowd regions (iscrowd=1) train no instance; if your tool marks masks so (CVAT's COCO " \
        "export does), --crowd-as-instances reads them as instances" in out
    assert main(["check-data", "--coco", str(ann), "--images", str(images), "--crowd-as-instances"]) == 0
    out = capsys.readouterr().out
    assert "3 images, 4 annotations (0 crowd)" in out and "--crowd-as-instances" not in out
    assert main(["check-data", "--labelme", str(labelme_sample(tmp_path / "lm"))]) == 0
    assert "crowd regions" not in capsys.readouterr().out
    via, via_images = via_sample(tmp_path / "via", 1)
    assert main(["check-data", "--via", str(via), "--images", str(via_images), "--class-attribute", "kind"]) == 0
    assert main(["check-data", "--via", str(via), "--images", str(via_images), "--crowd-as-instances"]) == 2
    assert "--crowd-as-instances: only for --coco" in capsys.readouterr().err


def test_check_data_reports_each_problem_exit_1(tmp_path, capsys):
    ann, images = planted_coco_sample(tmp_path)
    assert main(["check-data", "--coco", str(ann), "--images", str(images)]) == 1
    out = capsys.readouterr().out
    assert "12 errors:" in out and "2 warnings:" in out
    for fragment in ("annotation 201: polygon outside the image", "annotation 202: degenerate polygon",
                     "annotation 203: degenerate polygon: zero area", "annotation 204: empty mask",
                     "annotation 205: unknown category id 99", "annotation 206: duplicate annotation id",
                     "image 1: duplicate image id", "missing.png: no such image file",
                     "corrupt.png: not an image file"):
        assert fragment in out


@pytest.mark.parametrize("make_args, why", [
    (lambda d: ["--coco", str(d / "bad.json"), "--images", str(d)], "bad.json: malformed JSON"),
    (lambda d: ["--coco", str(d / "none.json"), "--images", str(d)], "none.json: no such annotation file"),
    (lambda d: ["--labelme", str(d / "nowhere")], "nowhere: no such folder"),
    (lambda d: ["--images", str(d)], "annotations: give --coco"),
    (lambda d: ["--coco", str(d / "bad.json")], "the images folder is needed"),
])
def test_check_data_bad_input_exit_2(tmp_path, capsys, make_args, why):
    (tmp_path / "bad.json").write_text('{"images": [1, 2')
    rc = main(["check-data"] + make_args(tmp_path))
    assert why in one_line_error(capsys, rc)


def test_real_process_prints_one_error_line(tmp_path):
    (tmp_path / "bad.json").write_text("{oops")
    proc = subprocess.run([str(MASKRCNN), "check-data", "--coco", str(tmp_path / "bad.json"), "--images",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {tmp_path / 'bad.json'}: malformed JSON")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_help_shows_examples(capsys):
    for command in ("check-data", "evaluate", "detect"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"examples:\n  maskrcnn {command}" in capsys.readouterr().out


# ---- detect -----------------------------------------------------------------------------------
def _images(folder: Path, count: int, size=(40, 56)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rgb_image(*size, seed=i)).save(folder / f"img{i:04d}.png")
    return folder


def test_detect_writes_overlays_and_results(tmp_path, model_dir, capsys):
    inputs = _images(tmp_path / "in", 2)
    frames = [Image.fromarray(np.full((32, 32, 3), 60 * k, np.uint8)) for k in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    out = tmp_path / "out"
    rc = main(["detect", "--weights", str(model_dir), "--out", str(out), "--set", "detection_max_instances=2",
               str(inputs), str(tmp_path / "anim.gif")])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["anim_000000.png", "anim_000001.png", "anim_000002.png",
                                                     "img0000.png", "img0001.png", "results.json"]
    assert np.asarray(Image.open(out / "img0000.png")).shape == (40, 56, 3)
    records = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in records} <= set(range(5)) and records
    assert max(Counter(r["image_id"] for r in records).values()) <= 2  # the --set override took effect
    assert {(Path(r["file_name"]).name, r.get("frame")) for r in records} <= \
        {("img0000.png", None), ("img0001.png", None), ("anim.gif", 0), ("anim.gif", 1), ("anim.gif", 2)}
    for r in records:
        assert r["category_id"] in (1, 2, 3)
        assert r["segmentation"]["size"] == ([32, 32] if "frame" in r else [40, 56])
    printed = capsys.readouterr().out
    assert "instances in 5 images" in printed
    assert "ran on PyTorch eager (cpu, " in printed and " convolutions)" in printed  # which path ran
    assert main(["detect", "--weights", str(model_dir), "--out", str(tmp_path / "direct"), "--no-overlays",
                 "--set", "cpu_inference_conv=direct", str(inputs)]) == 0
    assert "direct convolutions)" in capsys.readouterr().out


def test_detect_bad_inputs_exit_2_and_keep_old_results(tmp_path, model_dir, capsys):
    good = _images(tmp_path / "in", 1) / "img0000.png"
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("[]\n")
    (tmp_path / "broken.yaml").write_text("num_classes: [4\n")
    weights = str(model_dir)
    cases = [
        (["--weights", weights, "--out", str(out), str(tmp_path / "missing.png")], "missing.png: no such file"),
        (["--weights", weights, "--set", "no_such_key=1", str(good)], "unknown config key 'no_such_key'"),
        (["--weights", weights, "--set", "num_classes=7", str(good)], "in the weights but"),
        (["--weights", str(tmp_path / "nomodel"), str(good)], "nomodel: no such model folder"),
        (["--weights", weights, "--config", str(tmp_path / "broken.yaml"), str(good)], "broken.yaml: not valid YAML"),
    ]
    for args, why in cases:
        rc = main(["detect"] + args)
        assert why in one_line_error(capsys, rc)
    assert (out / "results.json").read_text() == "[]\n"  # the failed run left the old results alone
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # no temporary files


def test_detect_skips_unreadable_inputs_and_writes_the_rest(tmp_path, model_dir, capsys, caplog):
    inputs = _images(tmp_path / "in", 2)
    (inputs / "img0000b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    rc = main(["detect", "--weights", str(model_dir), "--out", str(out), "--set", "detection_min_confidence=0",
               str(inputs)])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable input(s): " in printed and "img0000b.png" in printed.splitlines()[-1]
    assert any("img0000b.png" in r.getMessage() for r in caplog.records)  # warned as it happened
    records = json.loads((out / "results.json").read_text())
    assert {Path(r["file_name"]).name for r in records} == {"img0000.png", "img0001.png"}
    assert sorted(p.name for p in out.iterdir()) == ["img0000.png", "img0001.png", "results.json"]


def test_detect_full_disk_is_one_error_line(tmp_path, model_dir, capsys, monkeypatch):
    import errno

    import maskrcnn.utils

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    good = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("[]\n")
    monkeypatch.setattr(maskrcnn.utils.os, "replace", no_space)
    rc = main(["detect", "--weights", str(model_dir), "--out", str(out), str(good)])
    assert "cannot write (No space left on device)" in one_line_error(capsys, rc)
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # no overlay, no temporary file
    assert (out / "results.json").read_text() == "[]\n"


def test_detect_video_needs_a_decoder(tmp_path, model_dir, capsys):
    from maskrcnn.data.video import video_backend
    if video_backend() is not None:
        pytest.skip("a video decoder is installed")
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    rc = main(["detect", "--weights", str(model_dir), "--out", str(tmp_path / "out"), str(tmp_path / "clip.mp4")])
    assert "clip.mp4: cannot decode video: no video decoder is installed" in one_line_error(capsys, rc)
    assert not (tmp_path / "out").exists()


class _OneBoxModel:
    """Stands in for MaskRCNN in the memory test: one full-image detection per image, fast."""

    config = Config(num_classes=2)
    class_names = ["BG", "thing"]

    def detect(self, images):
        return [Detections(torch.tensor([[0, 0, im.shape[1], im.shape[0]]], dtype=torch.float32),
                           torch.tensor([1]), torch.tensor([0.9]),
                           torch.ones(1, im.shape[0], im.shape[1], dtype=torch.bool)) for im in images]


def test_detect_memory_stays_flat(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(detect_command, "load_model", lambda args: _OneBoxModel())

    def peak_bytes(count: int) -> int:
        inputs = _images(tmp_path / f"in{count}", count, size=(96, 96))
        tracemalloc.start()
        try:
            assert main(["detect", "--weights", "unused", "--out", str(tmp_path / f"out{count}"), str(inputs)]) == 0
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak_bytes(2)  # first run: imports and caches
    small, large = peak_bytes(10), peak_bytes(100)
    # 90 more images would add 90 * (27 KB image + 9 KB mask + overlay) if anything were kept.
    assert large - small < 1_000_000, (small, large)
    assert len(json.loads((tmp_path / "out100" / "results.json").read_text())) == 100


# ---- evaluate ---------------------------------------------------------------------------------
def test_evaluate_writes_metrics_plot_and_results(tmp_path, model_dir, capsys):
    ann, images = coco_sample(tmp_path)
    out = tmp_path / "eval" / "metrics.json"
    rc = main(["evaluate", "--weights", str(model_dir), "--coco", str(ann), "--images", str(images),
               "--out", str(out)])
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl",
                                    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
    assert metrics["num_images"] == 3 and set(metrics["per_class"]) == {"cat", "dog", "bird"}
    assert 0.0 <= metrics["segm"]["AP"] <= 1.0
    plot = np.asarray(Image.open(tmp_path / "eval" / "metrics_pr.png"))
    assert plot.ndim == 3 and plot.shape[2] in (3, 4)
    records = json.loads((tmp_path / "eval" / "metrics_results.json").read_text())
    assert records and {r["category_id"] for r in records} <= {7, 18, 42}  # the file's own category ids
    assert {r["image_id"] for r in records} <= {5, 9, 11}
    printed = capsys.readouterr().out
    assert "bbox" in printed and "VOC mAP@0.5" in printed and "bird" in printed


def test_evaluate_class_count_mismatch_exit_2(tmp_path, model_dir, capsys):
    via, images = via_sample(tmp_path, 2)
    rc = main(["evaluate", "--weights", str(model_dir), "--via", str(via), "--images", str(images)])
    assert "the model has 4 classes (background included) but the dataset has 2" in one_line_error(capsys, rc)


def test_evaluate_skips_an_unreadable_image_and_detect_takes_coco_image_ids(tmp_path, model_dir, capsys):
    ann, images = coco_sample(tmp_path)
    out = tmp_path / "det"
    assert main(["detect", "--weights", str(model_dir), "--out", str(out), "--no-overlays", "--coco", str(ann),
                 "--set", "detection_min_confidence=0", str(images)]) == 0
    records = json.loads((out / "results.json").read_text())
    assert {(Path(r["file_name"]).name, r["image_id"]) for r in records} <= {("rgb.png", 5), ("gray.png", 9),
                                                                             ("rgba.png", 11)}
    (images / "gray.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    capsys.readouterr()
    rc = main(["evaluate", "--weights", str(model_dir), "--coco", str(ann), "--images", str(images),
               "--out", str(tmp_path / "m.json")])
    assert rc == 1
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1].startswith("skipped 1 of 3 images") and "gray.png" in printed.splitlines()[-1]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 2
    assert {r["image_id"] for r in json.loads((tmp_path / "m_results.json").read_text())} <= {5, 11}


@pytest.mark.parametrize("top", [4095, 235])
def test_detect_overlay_of_a_sixteen_bit_image_looks_like_itself(tmp_path, model_dir, top):
    """A 12-bit camera image (0..4095) or a dim one (0..235) saved as 16-bit: the overlay spans
    0..255 (255/65535 made them black), with the ramp's middle mid-grey."""
    ramp = np.tile(np.linspace(0, top, 64).round().astype(np.uint16), (48, 1))
    Image.fromarray(ramp).save(tmp_path / "cells.png")
    out = tmp_path / "out"
    assert main(["detect", "--weights", str(model_dir), "--out", str(out), "--set", "detection_min_confidence=1.0",
                 str(tmp_path / "cells.png")]) == 0
    overlay = np.asarray(Image.open(out / "cells.png"))[..., 0]
    assert overlay.min() == 0 and overlay.max() == 255
    assert abs(int(overlay[24, 32]) - 128) <= 3
