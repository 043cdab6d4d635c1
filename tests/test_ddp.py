"""Two-process DistributedDataParallel training on the CPU (gloo), as torchrun would start it."""
import os
import socket

import torch
import torch.multiprocessing as mp

from maskrcnn import Config
from maskrcnn.data.shapes import ShapesDataset
from maskrcnn.engine.distributed import cleanup, init_distributed, is_distributed
from maskrcnn.engine.trainer import Trainer
from tiny_maskrcnn import TinyMaskRCNN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, folder: str) -> None:
    # what torchrun puts in the environment of each process
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    assert is_distributed() and info.rank == rank and info.world_size == world_size
    torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
    model = TinyMaskRCNN()
    trainer = Trainer(model, ShapesDataset(16, 64, 64, seed=1), f"{folder}/run-rank{rank}",
                      Config(images_per_gpu=2, learning_rate=0.02, warmup_steps=2), info=info,
                      progress=False, log_every=1, checkpoint_every=2)
    trainer.fit(4)
    torch.save(model.state_dict(), f"{folder}/final-rank{rank}.pt")
    cleanup()


def _run_two(worker, folder) -> list:
    """Start ``worker(rank, 2, port, folder)`` in two spawned processes, as torchrun would;
    their exit codes (None for one still running after 120 s, which is then killed)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, str(folder))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


def test_two_process_gloo_training(tmp_path):
    assert _run_two(_worker, tmp_path) == [0, 0]
    a, b = (torch.load(tmp_path / f"final-rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)
    initial = TinyMaskRCNN().state_dict()
    for name in a:
        # each rank saw different images; averaged gradients keep the replicas identical
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[n], initial[n]) for n in a)
    # only rank 0 writes logs and checkpoints
    assert not (tmp_path / "run-rank1").exists()
    run = tmp_path / "run-rank0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def _budget_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    import time

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == 1:  # this rank's clock runs 3x fast: on its own it would think the time is up first
        real = time.perf_counter
        start = real()
        time.perf_counter = lambda: start + 3 * (real() - start)
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = TinyMaskRCNN()
    trainer = Trainer(model, ShapesDataset(16, 64, 64, seed=1), f"{folder}/run-rank{rank}",
                      Config(images_per_gpu=2, learning_rate=0.02, warmup_steps=2), info=info,
                      progress=False, log_every=5, checkpoint_every=1000)
    result = trainer.fit(10_000, max_seconds=4.0)
    torch.save({"step": result["step"], "state": model.state_dict()}, f"{folder}/final-rank{rank}.pt")
    cleanup()


def test_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    """fit(max_seconds=...) under DDP with clocks that disagree: every rank decides from the
    slowest clock's reading, so all stop at the same step with the same weights (a rank that
    stopped alone would leave the other waiting in its gradient all-reduce)."""
    assert _run_two(_budget_worker, tmp_path) == [0, 0]
    a, b = (torch.load(tmp_path / f"final-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["step"] == b["step"] > 1
    for name in a["state"]:
        assert torch.equal(a["state"][name], b["state"][name]), name


def _patience_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = TinyMaskRCNN()
    trainer = Trainer(model, ShapesDataset(16, 64, 64, seed=1), f"{folder}/run-rank{rank}",
                      Config(images_per_gpu=2, learning_rate=0.02, warmup_steps=2), info=info,
                      progress=False, log_every=1, checkpoint_every=100, eval_every=2, patience=1,
                      evaluate=lambda m: {"mask_AP": 0.5 if trainer.step <= 2 else 0.1})
    result = trainer.fit(40)
    torch.save({"step": result["step"], "state": model.state_dict()}, f"{folder}/final-rank{rank}.pt")
    cleanup()


def test_patience_stops_every_rank(tmp_path):
    """Only rank 0 validates; when its patience runs out every rank stops at that step (the
    others would otherwise wait for it in their next gradient all-reduce)."""
    assert _run_two(_patience_worker, tmp_path) == [0, 0]
    a, b = (torch.load(tmp_path / f"final-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["step"] == b["step"] == 4


def _resume_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """Two steps, then a fresh trainer resumes to four, in --out ``shared`` (both ranks) or in a
    folder per rank (``split``: rank 1 sees no checkpoint)."""
    from maskrcnn.errors import MaskRCNNError
    layout, folder = folder.split(":", 1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    out = f"{folder}/run" if layout == "shared" else f"{folder}/run-rank{rank}"

    def trainer():
        torch.manual_seed(0)
        model = TinyMaskRCNN()
        return model, Trainer(model, ShapesDataset(16, 64, 64, seed=1), out,
                              Config(images_per_gpu=2, learning_rate=0.02, warmup_steps=2), info=info,
                              progress=False, log_every=1, checkpoint_every=2)
    trainer()[1].fit(2)
    model, resumed = trainer()
    try:
        result = resumed.fit(4, resume=True)
    except MaskRCNNError as e:
        with open(f"{folder}/error-rank{rank}.txt", "w") as f:
            f.write(str(e))
        cleanup()
        raise SystemExit(3)
    torch.save({"step": result["step"], "state": model.state_dict()}, f"{folder}/final-rank{rank}.pt")
    cleanup()


def test_resume_on_every_rank_from_the_shared_run(tmp_path):
    assert _run_two(_resume_worker, f"shared:{tmp_path}") == [0, 0]
    a, b = (torch.load(tmp_path / f"final-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["step"] == b["step"] == 4
    for name in a["state"]:
        assert torch.equal(a["state"][name], b["state"][name]), name


def test_resume_where_a_rank_cannot_see_the_checkpoints_is_one_clear_error(tmp_path):
    """--out on storage only rank 0 writes to (rank 1's folder stays empty): every rank stops
    with the same explanation instead of hanging."""
    assert _run_two(_resume_worker, f"split:{tmp_path}") == [3, 3]
    errors = [(tmp_path / f"error-rank{r}.txt").read_text() for r in (0, 1)]
    assert "rank 1 finds no checkpoint" in errors[1] and "storage all machines share" in errors[1]
    assert "rank 0 finds checkpoint step 2" in errors[0]
