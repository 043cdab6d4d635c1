"""The Trainer on a tiny real Mask R-CNN: the loss falls, logs are written, layer regimes
freeze what they should, and a run killed with SIGKILL (even mid-save) resumes onto exactly
the loss curve of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maskrcnn import Config
from maskrcnn.data.shapes import ShapesDataset
from maskrcnn.engine.trainer import Trainer, epoch_batches
from tiny_maskrcnn import TinyMaskRCNN

TESTS = Path(__file__).parent
CONFIG = dict(images_per_gpu=2, learning_rate=0.02, warmup_steps=5, lr_schedule="cosine")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads spin against other jobs and
    run these tiny convolutions ~8x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(out, **kwargs):
    torch.manual_seed(0)
    return Trainer(TinyMaskRCNN(), ShapesDataset(24, 64, 64, seed=1), out, Config(**CONFIG),
                   progress=False, log_every=1, **kwargs)


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_loss_falls_and_logs_are_written(tmp_path):
    evaluated = []
    trainer = _trainer(tmp_path, checkpoint_every=20, evaluate=lambda m: evaluated.append(m.training) or {"AP": 0.5})
    result = trainer.fit(40)
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < 0.75 * first, (first, last)
    assert result["step"] == 40 and result["it_per_s"] > 0 and result["val/AP"] == 0.5
    assert evaluated == [False]  # evaluated once, at the end, in eval mode
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-00000020.pt", "ckpt-00000040.pt"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_heads_regime_leaves_the_backbone_untouched(tmp_path):
    trainer = _trainer(tmp_path, layers="heads")
    before = [p.clone() for p in trainer.model.backbone.parameters()]
    head = trainer.model.class_logits.weight.clone()
    trainer.fit(3)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.backbone.parameters()))
    assert not torch.equal(head, trainer.model.class_logits.weight)


def test_in_process_resume_matches(tmp_path):
    _trainer(tmp_path / "a").fit(12)
    _trainer(tmp_path / "b", checkpoint_every=5).fit(12)
    for name in ("ckpt-00000010.pt", "ckpt-00000012.pt"):  # as if killed after step 9
        (tmp_path / "b" / "checkpoints" / name).unlink()
    trainer = _trainer(tmp_path / "b", checkpoint_every=5)
    trainer.fit(12, resume=True)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")  # steps 6..12 logged once, identical


def test_batches_are_a_function_of_seed_and_epoch():
    assert epoch_batches(10, 3, seed=0, epoch=1) == epoch_batches(10, 3, seed=0, epoch=1)
    assert epoch_batches(10, 3, seed=0, epoch=1) != epoch_batches(10, 3, seed=0, epoch=2)
    ranks = [sum(epoch_batches(10, 2, 0, 0, rank=r, world_size=2), []) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4 and not set(ranks[0]) & set(ranks[1])


SCRIPT = """
import sys, torch
from maskrcnn import Config
from maskrcnn.data.shapes import ShapesDataset
from maskrcnn.engine.trainer import Trainer
from tiny_maskrcnn import TinyMaskRCNN
torch.set_num_threads(1)
torch.manual_seed(0)
trainer = Trainer(TinyMaskRCNN(), ShapesDataset(24, 64, 64, seed=1), sys.argv[1], Config(**{config}),
                  progress=False, log_every=1, checkpoint_every=4)
trainer.fit(int(sys.argv[2]), resume=True)
"""


def _run(out, steps, env_extra=None):
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", SCRIPT.format(config=CONFIG), str(out), str(steps)],
                            env=env, stderr=subprocess.PIPE)


def _wait_for(condition, proc, timeout=60):
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < end, "timed out"
        time.sleep(0.05)


def test_resume_after_sigkill_mid_save_and_mid_step(tmp_path):
    steps = 20
    reference = _run(tmp_path / "ref", steps)
    killed = tmp_path / "killed"
    # 1) killed inside the save of step 8: the temporary file is written, the rename not done
    proc = _run(killed, steps, {"MASKRCNN_SLEEP_IN_SAVE": "30"})
    ckpts = killed / "checkpoints"
    _wait_for(lambda: (ckpts / "ckpt-00000004.pt").exists() is False and
              any(p.name.startswith(".ckpt-00000004") and p.stat().st_size > 0 for p in ckpts.glob(".*.tmp"))
              if ckpts.exists() else False, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpts / "ckpt-00000004.pt").exists()  # nothing finished: resume starts from scratch
    # 2) restarted with slow saves off, killed mid-training after its checkpoint of step 12
    proc = _run(killed, steps)
    _wait_for(lambda: (ckpts / "ckpt-00000012.pt").exists() and max(_losses(killed), default=0) >= 14, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 3) resumed to the end
    proc = _run(killed, steps)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    assert reference.wait(timeout=120) == 0, reference.stderr.read().decode()
    ref, got = _losses(tmp_path / "ref"), _losses(killed)
    assert sorted(got) == list(range(1, steps + 1))
    for step in ref:
        assert abs(ref[step] - got[step]) <= 1e-6 * max(1.0, abs(ref[step])), (step, ref[step], got[step])
    assert not list(ckpts.glob(".*.tmp"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_training(tmp_path):
    from maskrcnn.engine.distributed import DistInfo
    torch.manual_seed(0)
    trainer = Trainer(TinyMaskRCNN(), ShapesDataset(24, 64, 64, seed=1), tmp_path, Config(**CONFIG),
                      info=DistInfo(device=torch.device("cuda")), progress=False, log_every=1)
    assert trainer.amp_dtype in (torch.bfloat16, torch.float16)
    trainer.fit(30)
    losses = _losses(tmp_path)
    assert all(v == v for v in losses.values())
    assert sum(losses[s] for s in range(26, 31)) < sum(losses[s] for s in range(1, 6))
