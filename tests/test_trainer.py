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
from maskrcnn.engine import trainer as trainer_module
from maskrcnn.engine.trainer import Trainer, epoch_batches
from maskrcnn.errors import MaskRCNNError
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


class _SlowItems(torch.utils.data.Dataset):
    """ShapesDataset items that take ``delay`` seconds each to load."""

    def __init__(self, delay):
        self.items, self.delay = ShapesDataset(8, 64, 64, seed=1), delay

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        if self.delay:
            time.sleep(self.delay)
        return self.items[index]


def test_metrics_report_how_long_the_steps_waited_for_data(tmp_path, caplog):
    """data_time: the mean seconds a step waited for its batch; with loading in the step's own
    process (no workers) it is at least the batch's loading time, never more than the whole
    step, and with quick loading a small part of the step."""
    for delay in (0.0, 0.05):
        out = tmp_path / f"delay{delay}"
        torch.manual_seed(0)
        caplog.clear()
        Trainer(TinyMaskRCNN(), _SlowItems(delay), out, Config(**CONFIG), progress=False, log_every=2).fit(4)
        warned = [r.getMessage() for r in caplog.records if "wait for their data" in r.getMessage()]
        # the second window is judged (the first holds start-up): a 0.1 s wait of a quick step
        assert len(warned) == (1 if delay else 0), warned
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        waits = [r["data_time"] for r in records]
        assert len(waits) == 2 and all(w >= 0 for w in waits)
        per_step = [1 / r["it_per_s"] for r in records]
        if delay:  # two items a batch
            assert all(w >= 2 * delay for w in waits) and all(w <= s for w, s in zip(waits, per_step)), records
        else:
            assert all(w < 0.5 * s for w, s in zip(waits, per_step)), records


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
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "b" / "tb"))
    events.Reload()  # TensorBoard purged the first run's steps 6..12: one curve
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 13))


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


# ---- hooks: validation, best model, patience, exact resume with augmentation -------------------
def test_validation_keeps_the_best_model_and_patience_stops(tmp_path):
    """Scripted validation APs by step: the best (0.3 at step 4) lands in model_best/ with its
    step and value; two evaluations without a new best stop the run at step 8, and a run
    resumed from step 6 keeps the best-so-far and the patience count."""
    aps = {2: 0.1, 4: 0.3, 6: 0.2, 8: 0.25, 10: 0.9}
    holder = {}

    def evaluate(model):
        return {"mask_AP": aps[holder["trainer"].step], "box_AP": 0.0}

    def make(out):
        holder["trainer"] = _trainer(out, evaluate=evaluate, eval_every=2, patience=2, checkpoint_every=2)
        return holder["trainer"]

    result = make(tmp_path / "a").fit(20)
    assert result["step"] == 8 and result["best_step"] == 4 and result["best_value"] == 0.3
    assert "no better val/mask_AP in 2 evaluations" in result["stop_reason"]
    best = json.loads((tmp_path / "a" / "model_best" / "best.json").read_text())
    assert best["step"] == 4 and best["value"] == 0.3 and best["metric"] == "val/mask_AP"
    assert (tmp_path / "a" / "model_best" / "model.safetensors").exists()
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val/mask_AP"]) for r in records if "val/mask_AP" in r] == [
        (2, 0.1), (4, 0.3), (6, 0.2), (8, 0.25)]

    make(tmp_path / "b").fit(6)  # ends at step 6 (one evaluation without a new best)
    resumed = make(tmp_path / "b").fit(20, resume=True)
    assert (resumed["step"], resumed["best_step"], resumed["best_value"]) == (8, 4, 0.3)
    assert json.loads((tmp_path / "b" / "model_best" / "best.json").read_text())["step"] == 4


class _Augmented(torch.utils.data.Dataset):
    """Shapes with random flips, scale jitter and colour jitter (torch's global RNG)."""

    def __init__(self):
        from maskrcnn.data.transforms import build_transforms
        self.items, self.transform = ShapesDataset(24, 64, 64, seed=1), build_transforms(train=True)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.transform(*self.items[index])


def test_resume_is_exact_with_augmentation_and_workers(tmp_path):
    """The drift seen after --resume: a DataLoader worker's RNG restarted at the resumed batch,
    so the augmentations differed.  Now an item's augmentation is a function of (seed, epoch,
    position): two resumes of the same mid-epoch checkpoint, with 2 workers, log exactly the
    uninterrupted run's losses (3 epochs of 12 steps: resumes cross epoch boundaries)."""
    def trainer(out, workers):
        torch.manual_seed(0)
        return Trainer(TinyMaskRCNN(), _Augmented(), out, Config(**CONFIG), progress=False, log_every=1,
                       checkpoint_every=5, num_workers=workers)

    trainer(tmp_path / "ref", 0).fit(16)
    reference = _losses(tmp_path / "ref")
    trainer(tmp_path / "run", 2).fit(5)
    for copy in ("r1", "r2"):
        import shutil
        shutil.copytree(tmp_path / "run", tmp_path / copy)
        trainer(tmp_path / copy, 2).fit(16, resume=True)
        assert _losses(tmp_path / copy) == reference


def test_resume_without_checkpoint_says_so_and_starts_over(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # killed before its first save
    with caplog.at_level("INFO", logger="maskrcnn.engine.trainer"):
        result = _trainer(tmp_path).fit(2, resume=True)
    assert "resume: no checkpoint in" in caplog.text and "training from step 0" in caplog.text
    assert result["step"] == 2 and sorted(_losses(tmp_path)) == [1, 2] and _losses(tmp_path)[1] != 9.0


def test_schedule_length_is_set_through_the_trainer(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.set_total_steps(7)
    assert trainer.total_steps == trainer.lr_factor.total_steps == 7
    trainer.lr_factor.set_total_steps(0)
    assert trainer.total_steps == 1
    with pytest.raises(MaskRCNNError, match="steps=-5"):
        trainer.fit(-5)


def test_a_full_disk_during_a_checkpoint_is_one_error_and_keeps_the_earlier(tmp_path, monkeypatch):
    import errno

    trainer = _trainer(tmp_path, checkpoint_every=2)
    trainer.fit(2)
    good = (tmp_path / "checkpoints" / "ckpt-00000002.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # half a file is on disk when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(MaskRCNNError, match=r"ckpt-00000004.pt: cannot write \(No space left on device\)"):
        trainer.fit(4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-00000002.pt"]
    assert (tmp_path / "checkpoints" / "ckpt-00000002.pt").read_bytes() == good


def test_time_budget_extends_a_schedule_estimated_while_the_machine_was_busy(monkeypatch):
    """Ten slow steps (another process held the cores) set a short schedule; when it would end
    with most of the budget left, it is re-estimated at the faster pace and the run goes on
    until the time is up, not to the stale estimate."""
    from maskrcnn.engine import hooks
    from maskrcnn.engine.distributed import DistInfo

    clock = {"now": 0.0}
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: clock["now"])

    class Run:  # the Trainer's side of the hook protocol
        step, max_steps, total_steps, stop_reason = 0, 10_000, 10_000, None
        info = DistInfo()

        def set_total_steps(self, total):
            self.total_steps = total

        def request_stop(self, reason):
            self.stop_reason = reason

    run = Run()
    budget = hooks.TimeBudget(max_seconds=60.0)
    budget.trainer = run
    budget.before_train()
    while run.step < min(run.max_steps, run.total_steps) and run.stop_reason is None:
        clock["now"] += 1.0 if run.step < 10 else 0.1
        run.step += 1
        budget.after_step()
    assert run.stop_reason is not None and "time budget" in run.stop_reason
    assert 440 <= run.step <= 510  # 10 steps in 10 s, then 10 steps/s for the other 50 s


def test_default_workers_feed_a_gpu_from_the_cores_each_process_has(monkeypatch):
    """2 workers on a CPU (they share its cores with the step); on CUDA one per core this
    process may use, less its own, split among torchrun's local processes, within [2, 8]."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(trainer_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert trainer_module.default_workers(cpu) == 2
    assert trainer_module.default_workers(cuda) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert trainer_module.default_workers(cuda) == 3  # 16 cores / 4 processes, less the process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert trainer_module.default_workers(cuda) == 2  # never fewer than on a CPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(trainer_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert trainer_module.default_workers(cuda) == 5


def test_a_loss_that_is_not_finite_stops_the_run_before_the_weights_change(tmp_path):
    """The losses are read after the backward pass is queued (one wait for a GPU, not seven),
    but a NaN still stops the step before the optimizer: the weights stay those of the last
    good step, and the message names the step and each loss."""
    from maskrcnn.errors import MaskRCNNError
    trainer = _trainer(tmp_path)
    trainer.fit(2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    forward = trainer.wrapped.forward

    def poisoned(*args, **kwargs):
        losses = forward(*args, **kwargs)
        losses["mrcnn_mask_loss"] = losses["mrcnn_mask_loss"] * float("nan")
        return losses

    trainer.wrapped.forward = poisoned
    with pytest.raises(MaskRCNNError, match=r"the loss became nan at step 3 \(.*mrcnn_mask_loss=nan"):
        trainer.fit(3)
    after = trainer.model.state_dict()
    assert trainer.step == 2 and all(torch.equal(before[k], after[k]) for k in before)
