"""`maskrcnn train` and `maskrcnn demo` end to end on the real model, small settings."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maskrcnn.cli import main

SMALL = ["backbone=resnet18", "backbone_style=pytorch", "image_min_dim=64", "image_max_dim=64",
         "rpn_anchor_scales=[8,16,32,64,128]", "top_down_pyramid_size=32", "rpn_conv_channels=32",
         "fpn_classif_fc_layers_size=64", "mask_head_channels=32", "train_rois_per_image=16",
         "post_nms_rois_training=100", "post_nms_rois_inference=50", "images_per_gpu=2",
         "train_bn=true", "learning_rate=0.005", "warmup_steps=2"]
SET_SMALL = [a for kv in SMALL for a in ("--set", kv)]  # one KEY=VALUE per --set


def _train(out, *extra):
    return main(["train", "--shapes", "8", "--out", str(out), "--workers", "0", "--device", "cpu",
                 "--checkpoint-every", "2", *SET_SMALL, *extra])


def test_train_then_resume_then_load(tmp_path, capsys):
    from maskrcnn import MaskRCNN

    assert _train(tmp_path, "--steps", "2") == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert _train(tmp_path, "--steps", "3", "--resume") == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and 2 in steps
    model = MaskRCNN.load(tmp_path / "model")
    assert model.class_names == ["BG", "square", "circle", "triangle"] and model.config.num_classes == 4
    # fine-tuning from it to another class count re-initialises the class layers only
    other = tmp_path / "other"
    assert main(["train", "--shapes", "8", "--out", str(other), "--workers", "0", "--device", "cpu",
                 "--steps", "1", "--weights", str(tmp_path / "model"), *SET_SMALL]) == 0


def test_train_on_coco_leaves_out_a_missing_image(tmp_path, capsys, caplog):
    """COCO data with crowd, RLE, odd image modes and one image deleted: the run trains on the
    images it can read and says how many it left out."""
    from data_samples import coco_sample

    ann, images = coco_sample(tmp_path / "data")
    (images / "rgba.png").unlink()
    with caplog.at_level("WARNING", logger="maskrcnn"):
        assert main(["train", "--coco", str(ann), "--images", str(images), "--out", str(tmp_path / "run"),
                     "--workers", "0", "--device", "cpu", "--steps", "2", *SET_SMALL]) == 0
    assert "1 missing or unreadable image(s) left out of training" in caplog.text
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_train_without_data_is_one_line_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "maskrcnn.cli", "train", "--shapes", "8",
           "--out", str(tmp_path), "--workers", "0", "--device", "cpu", "--steps", "2", *SET_SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-00000002.pt"]


@pytest.mark.slow
def test_demo_writes_its_outputs(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--minutes", "0.5", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"mask_AP50", "mask_AP", "box_AP"} <= set(metrics)
    assert (tmp_path / "detections.png").stat().st_size > 0
    assert (tmp_path / "model" / "model.safetensors").exists()
