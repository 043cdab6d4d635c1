"""`maskrcnn train` and `maskrcnn demo` end to end on the real model, small settings."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_resume_keeps_the_run_config_and_names_what_config_would_change(tmp_path, caplog):
    """Resuming with the same --config is quiet; with a different one the run keeps its saved
    config and a warning names the keys the file would change."""
    import yaml
    first, other = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"detection_min_confidence": 0.5, "detection_nms_threshold": 0.3}))
    other.write_text(yaml.safe_dump({"detection_min_confidence": 0.6, "detection_nms_threshold": 0.3}))
    run = tmp_path / "run"
    assert _train(run, "--steps", "1", "--config", str(first)) == 0
    with caplog.at_level("WARNING", logger="maskrcnn"):
        assert _train(run, "--steps", "2", "--config", str(first), "--resume") == 0
        assert "--config" not in caplog.text
        assert _train(run, "--steps", "3", "--config", str(other), "--resume") == 0
    warning = [r.getMessage() for r in caplog.records if "--config" in r.getMessage()]
    assert len(warning) == 1 and "detection_min_confidence (run 0.5, --config 0.6)" in warning[0]
    assert "detection_nms_threshold" not in warning[0]
    assert yaml.safe_load((run / "config.yaml").read_text())["detection_min_confidence"] == 0.5


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


def _train_coco(data, out, *extra):
    ann, images = data
    return main(["train", "--coco", str(ann), "--images", str(images), "--out", str(out), "--device", "cpu",
                 "--log-every", "1", "--checkpoint-every", "2", *extra, *[a for s in SMALL for a in ("--set", s)]])


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.mark.slow
def test_seeded_runs_repeat_and_resumes_repeat_the_uninterrupted_curve(tmp_path, capsys):
    """COCO data with augmentation, 2 data workers.  The same --seed gives the same initial
    weights and losses; a run stopped at step 2 and resumed (twice from the same checkpoint)
    logs exactly the uninterrupted run's losses."""
    from safetensors.torch import load_file

    from data_samples import coco_sample

    data = coco_sample(tmp_path / "data")
    for name in ("a", "b"):
        assert _train_coco(data, tmp_path / name, "--steps", "0", "--seed", "3") == 0
    first = [load_file(tmp_path / name / "model" / "model.safetensors") for name in ("a", "b")]
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])
    assert _train_coco(data, tmp_path / "c", "--steps", "0", "--seed", "4") == 0
    other = load_file(tmp_path / "c" / "model" / "model.safetensors")
    assert not torch.equal(first[0]["fpn.lateral.0.weight"], other["fpn.lateral.0.weight"])

    assert _train_coco(data, tmp_path / "full", "--steps", "5", "--seed", "3") == 0
    assert _train_coco(data, tmp_path / "part", "--steps", "2", "--seed", "3") == 0
    for copy in ("r1", "r2"):
        shutil.copytree(tmp_path / "part", tmp_path / copy)
        assert _train_coco(data, tmp_path / copy, "--steps", "5", "--seed", "3", "--resume") == 0
        assert _losses(tmp_path / copy) == _losses(tmp_path / "full")
    assert [s for s, _ in _losses(tmp_path / "full")] == [1, 2, 3, 4, 5]


def test_validation_set_keeps_the_best_model(tmp_path, capsys):
    from data_samples import coco_sample

    ann, images = data = coco_sample(tmp_path / "data")
    assert _train_coco(data, tmp_path / "run", "--steps", "2", "--workers", "0", "--val-coco", str(ann),
                       "--val-images", str(images), "--eval-every", "1") == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/mask_AP" in r] == [1, 2]
    best = json.loads((tmp_path / "run" / "model_best" / "best.json").read_text())
    assert best["step"] in (1, 2) and best["metric"] == "val/mask_AP" and "val/box_AP" not in best["metrics"]
    assert (tmp_path / "run" / "model_best" / "model.safetensors").exists()
    assert "best: val/mask_AP" in capsys.readouterr().out


def test_a_run_folder_is_never_reused_silently(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: old\n")
    (run / "notes.txt").write_text("mine")
    assert _train(run, "--steps", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run} holds a run: use --resume to continue it or --overwrite to replace it"]
    assert (run / "config.yaml").read_text() == "name: old\n"
    assert _train(run, "--steps", "1", "--resume", "--overwrite") == 2
    assert _train(run, "--steps", "0", "--overwrite") == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "model" / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(empty, "--steps", "0") == 0


def test_from_scratch_batchnorm_trains_or_a_line_says_why_not(tmp_path, caplog):
    from maskrcnn.cli import build_parser
    from maskrcnn.commands.train import build_config

    def config(*extra):
        args = build_parser().parse_args(["train", "--shapes", "8", "--out", str(tmp_path / "x"), *extra])
        return build_config(args, 4)

    with caplog.at_level("INFO", logger="maskrcnn"):
        assert config().train_bn is True
        assert "training from random weights: BatchNorm trains" in caplog.text
        caplog.clear()
        assert config("--set", "train_bn=false").train_bn is False
        assert "frozen BatchNorm because train_bn: false was set" in caplog.text
    (tmp_path / "c.yaml").write_text("train_bn: false\n")
    assert config("--config", str(tmp_path / "c.yaml")).train_bn is False
    assert config("--weights", str(tmp_path)).train_bn is False  # pretrained: Matterport's frozen BN


def test_a_full_disk_while_training_is_one_error_line(tmp_path, capsys, monkeypatch):
    import errno

    import torch

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert _train(tmp_path, "--steps", "1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("train:")]
    assert len(err) == 1 and err[0].startswith("error: ") and "No space left on device" in err[0]
    assert not [p for p in (tmp_path / "checkpoints").iterdir()]
