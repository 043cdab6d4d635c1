"""Checkpoints: round trip with weights_only, RNG states, keep-last-K, corrupt/partial files,
fine-tuning with a different class count, and the LR schedule they restore."""
import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from maskrcnn import Config
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine.schedule import WarmupDecay, build_scheduler
from maskrcnn.errors import WeightsError


def _model(num_classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, num_classes))


def _trained_optimizer(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    return opt


def test_round_trip_restores_everything(tmp_path):
    model = _model()
    opt = _trained_optimizer(model)
    sched, _ = build_scheduler(opt, Config(warmup_steps=10, lr_schedule="cosine"), total_steps=50)
    for _ in range(3):
        opt.step()
        sched.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ckpt.save_checkpoint(tmp_path, 7, model, opt, sched, extra={"layers": "heads"})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    state = torch.load(path, weights_only=True)  # only tensors and plain values inside
    fresh = _model(4)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    sched2, factor2 = build_scheduler(opt2, Config(), total_steps=1)
    assert ckpt.restore(state, fresh, opt2, sched2) == 7
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    assert sched2.last_epoch == 3 and factor2.total_steps == 50 and factor2.schedule == "cosine"
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert state["extra"] == {"layers": "heads"}


def test_keeps_the_last_k(tmp_path):
    model = _model()
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, model, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [30, 40]


def test_partial_and_corrupt_files_never_shadow_the_last_good(tmp_path, caplog):
    model = _model()
    ckpt.save_checkpoint(tmp_path, 10, model)
    good = (tmp_path / "ckpt-00000010.pt").read_bytes()
    # a save killed before its rename leaves a hidden temporary file
    (tmp_path / ".ckpt-00000020.pt.abc123.tmp").write_bytes(good[: len(good) // 2])
    # a file truncated by a disk problem, under a checkpoint's name
    (tmp_path / "ckpt-00000030.pt").write_bytes(good[: len(good) // 3])
    with caplog.at_level(logging.WARNING):
        path, state = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000010.pt" and state["step"] == 10
    assert "ckpt-00000030.pt" in caplog.text
    assert [p.name for p in ckpt.remove_stale_temporaries(tmp_path)] == [".ckpt-00000020.pt.abc123.tmp"]
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_load_pretrained_reinitialises_class_layers(tmp_path, caplog):
    coco = _model(num_classes=81)
    ckpt.save_checkpoint(tmp_path, 1, coco)
    target = _model(num_classes=4)
    before = target[2].weight.clone()
    with caplog.at_level(logging.WARNING, logger="maskrcnn.engine.checkpoint"):
        report = ckpt.load_pretrained(target, tmp_path / "ckpt-00000001.pt")
    assert report["loaded"] == ["0.weight", "0.bias"]
    assert report["reinitialised"] == ["2.weight [81, 5]->[4, 5]", "2.bias [81]->[4]"]
    assert torch.equal(target[0].weight, coco[0].weight) and torch.equal(target[2].weight, before)
    line = [r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage()]
    assert len(line) == 1 and "2.weight" in line[0] and "2.bias" in line[0]
    with pytest.raises(WeightsError):
        ckpt.load_pretrained(target, {"other.weight": torch.zeros(1)})


def test_warmup_then_step_and_cosine():
    step = WarmupDecay(warmup_steps=4, schedule="step", milestones=(10, 20), gamma=0.1)
    assert [step(s) for s in (0, 1, 3, 9, 10, 19, 20)] == pytest.approx([0.25, 0.5, 1, 1, 0.1, 0.1, 0.01])
    cos = WarmupDecay(warmup_steps=2, schedule="cosine", total_steps=12)
    assert [cos(s) for s in (0, 1, 2, 7, 12, 50)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert WarmupDecay(0, "constant")(1000) == 1.0
