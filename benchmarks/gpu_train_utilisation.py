"""How busy `maskrcnn train` keeps the GPU on real-size images.

    python benchmarks/gpu_train_utilisation.py --images 32 --steps 40

Writes a COCO dataset of smooth 800x1066 JPEGs with elliptic instances (polygons) to a scratch
folder, runs ``maskrcnn train`` on it on the GPU (data loading in worker processes, pinned
memory, non-blocking copies), samples ``nvidia-smi``'s utilisation.gpu every 200 ms meanwhile,
and prints the utilisation over the run's steady part (after the first ``--skip`` seconds, which
hold start-up, the first batches and cuDNN's autotuning) with the run's own steps/s.

    python benchmarks/gpu_train_utilisation.py --split --device cpu --backbone resnet18 --thin --workers 2
    python benchmarks/gpu_train_utilisation.py --dispatch --backbone resnet50 --size 512x512

``--split`` measures where a step's time goes instead, on in-memory items of the same kind
(``--batch`` x ``--size`` images, 8 ellipses each, the Matterport preset unless ``--preset``):
the per-image preparation (resize of image and masks, mini masks) when the step does it, as
before it moved to the DataLoader workers, against the batched remainder the step does now
(normalise, pad, stack, move), next to forward + backward; then the wall time per Trainer step
with ``--workers`` workers, preparing in the step against in the workers (interleaved runs of
``--steps`` steps, the first of each left out), with the GPU's utilisation when there is one.

``--dispatch`` counts, on the CPU, the kernels and GPU waits of one Trainer step as a GPU runs
it (torchvision's roi_align, direct convolutions, gathered crops, the offset NMS; thin heads
keep it quick, which changes sizes, not the count) with ``--preset``, ``--backbone``,
``--batch``, ``--size`` (the images' molded size: ``image_min_dim`` x ``image_max_dim``) and
``--amp``: each one an ATen op, the waits estimated from the op names
(:class:`harness.DispatchCounter`), with the functions that dispatch most.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def scene(rng: np.random.Generator, height: int, width: int, instances: int):
    """A smooth [height, width, 3] uint8 image and ``instances`` ellipses (cy, cx, ry, rx, category)."""
    coarse = rng.random((height // 16 + 1, width // 16 + 1, 3))
    img = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR))
    ellipses = [(rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width, rng.uniform(0.03, 0.15) * height,
                 rng.uniform(0.03, 0.15) * width, int(rng.integers(1, 4))) for _ in range(instances)]
    return img, ellipses


def write_dataset(folder: Path, count: int, height: int, width: int, instances: int, seed: int = 0) -> Path:
    """``count`` JPEGs and their COCO annotation file (polygons of ellipses, 3 categories)."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img, ellipses = scene(rng, height, width, instances)
        name = f"{i:05d}.jpg"
        Image.fromarray(img).save(folder / "images" / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
        for cy, cx, ry, rx, category in ellipses:
            t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
            poly = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).round(2).reshape(-1).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": category, "segmentation": [poly],
                                "bbox": [cx - rx, cy - ry, 2 * rx, 2 * ry], "area": math.pi * rx * ry,
                                "iscrowd": 0})
    ann = folder / "train.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": k, "name": f"c{k}"} for k in (1, 2, 3)]}))
    return ann


def sample_utilisation(samples: list, stop: threading.Event, period: float = 0.2) -> None:
    """Append (time, utilisation %) every ``period`` s until ``stop``; nothing without nvidia-smi."""
    while shutil.which("nvidia-smi") and not stop.is_set():
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.strip().splitlines()
        if out:
            samples.append((time.perf_counter(), float(out[0])))
        time.sleep(period)


#: Ellipses an image, as COCO's images hold several objects.
INSTANCES = 8

#: ``--thin``: the demo's narrow FPN and heads and its ROI counts (``maskrcnn demo``), so that a
#: CPU step at 1024x1024 takes seconds, not a minute, and the preparation's share shows.
THIN = dict(top_down_pyramid_size=64, rpn_conv_channels=64, fpn_classif_fc_layers_size=256, mask_head_channels=64,
            rpn_train_anchors_per_image=128, pre_nms_limit_training=1000, post_nms_rois_training=200,
            train_rois_per_image=32)


class EllipseItems:
    """``count`` in-memory training items of the same kind as :func:`write_dataset`'s: ([3, H, W]
    uint8 image, target with ``masks`` [N, H, W] bool, ``labels``, ``boxes``), copies on each read
    as a reader's fresh arrays would be."""

    def __init__(self, count: int, height: int, width: int, instances: int, seed: int = 0):
        import torch

        from maskrcnn.boxes import masks_to_boxes

        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:height, :width]
        self.items = []
        for _ in range(count):
            img, ellipses = scene(rng, height, width, instances)
            masks = torch.from_numpy(np.stack([((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
                                               for cy, cx, ry, rx, _ in ellipses]))
            self.items.append((torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(),
                               {"masks": masks, "boxes": masks_to_boxes(masks),
                                "labels": torch.tensor([e[4] for e in ellipses])}))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image, target = self.items[index]
        return image.clone(), {k: v.clone() for k, v in target.items()}


def cpu_quota() -> str:
    """The cores this process may use: its affinity and, in a container, the cgroup's CPU quota."""
    from maskrcnn.utils import usable_cores
    text = f"{usable_cores()} cores in the affinity"
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        text += ", cgroup quota " + ("none" if quota == "max" else f"{int(quota) / int(period):.1f} cores")
    except (OSError, ValueError):
        pass
    return text


def report_data_waits(metrics: Path) -> None:
    """From the run's metrics.jsonl, the later half of its records (past start-up): steps/s and
    the share of each step spent waiting for the DataLoader (``data_time``)."""
    try:
        records = [r for r in map(json.loads, metrics.read_text().splitlines()) if "data_time" in r]
    except OSError:
        return
    later = records[len(records) // 2:]
    if not later:
        return
    rate = statistics.mean(r["it_per_s"] for r in later)
    wait = statistics.mean(r["data_time"] for r in later)
    print(f"later {len(later)} of {len(records)} logged windows: {rate:.2f} steps/s, {wait * 1e3:.0f} ms a step waiting "
          f"for data ({100 * wait * rate:.0f}% of the step); {cpu_quota()}")


def median_seconds(fn, reps: int) -> float:
    """Median wall time of ``reps`` calls of ``fn`` (CUDA synchronised)."""
    import torch

    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def split(args) -> None:
    """The step's time split and the Trainer's wall time per step (see the module's docstring)."""
    import torch

    from maskrcnn import Config, MaskRCNN
    from maskrcnn.data.dataset import collate
    from maskrcnn.engine.hooks import HookBase
    from maskrcnn.engine.trainer import Trainer, default_workers, seed_everything
    from maskrcnn.model import training

    torch.set_num_threads(args.threads)
    height, width = map(int, args.size.split("x"))
    device = torch.device(args.device)
    config = Config.preset(args.preset, num_classes=4, backbone=args.backbone, images_per_gpu=args.batch,
                           warmup_steps=0, **(THIN if args.thin else {}))
    seed_everything(0)
    model = MaskRCNN(config).to(device).train()
    items = EllipseItems(2 * args.batch, height, width, INSTANCES)
    images, targets = collate([items[i] for i in range(args.batch)])
    on_device = [im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets]
    def prepare_all():
        return collate([training.prepare_training_item(im, t, config) for im, t in zip(images, targets)])

    per_image = median_seconds(prepare_all, args.reps) / args.batch
    prepared = prepare_all()
    moved = [im.to(device) for im in prepared[0]], [{k: v.to(device) if torch.is_tensor(v) else v
                                                      for k, v in t.items()} for t in prepared[1]]
    before = median_seconds(lambda: training.mold_training_batch(model, *on_device), args.reps)
    after = median_seconds(lambda: training.mold_training_batch(model, *moved), args.reps)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        sum(training.batch_losses(model, *training.mold_training_batch(model, *moved)).values()).backward()

    forward_backward()  # warm-up (cuDNN autotuning, caches)
    rest = median_seconds(forward_backward, max(1, args.reps // 2)) - after
    print(f"{args.preset} preset{' (thin heads)' if args.thin else ''}, {config.backbone}, "
          f"batch {args.batch} x {args.size}, {INSTANCES} instances, {device}, {torch.get_num_threads()} thread(s), "
          f"image_resize_mode={config.image_resize_mode}, use_mini_mask={config.use_mini_mask}")
    print(f"  preparation in the step, before (per-image resize + batching): {before * 1e3:7.0f} ms")
    print(f"  preparation in the step, now (normalise, pad, stack):           {after * 1e3:7.0f} ms")
    print(f"  per-image preparation, now in the workers:                      {per_image * 1e3:7.0f} ms an image")
    print(f"  forward + backward (losses from the molded batch):              {rest * 1e3:7.0f} ms", flush=True)

    class StepTimes(HookBase):
        def __init__(self):
            self.stamps = [time.perf_counter()]

        def after_step(self):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

    if args.workers is None:
        args.workers = default_workers(device)
    walls = {True: [], False: []}
    busy = {True: [], False: []}
    for _ in range(args.rounds):
        for in_workers in (False, True):
            seed_everything(0)
            model = MaskRCNN(config).to(device)
            times = StepTimes()
            samples, stop = [], threading.Event()
            sampler = threading.Thread(target=sample_utilisation, args=(samples, stop), daemon=True)
            with tempfile.TemporaryDirectory() as out:
                trainer = Trainer(model, items, out, config, num_workers=args.workers, progress=False,
                                  checkpoint_every=0, log_every=10 ** 6, hooks=(times,),
                                  prepare_in_workers=in_workers)
                sampler.start()
                trainer.fit(args.steps)
                stop.set()
                sampler.join()
            steps = np.diff(times.stamps)[1:]  # the first waits for the workers' first batch
            walls[in_workers].extend(steps.tolist())
            started = times.stamps[1]
            busy[in_workers].extend(u for t, u in samples if t > started)
    for in_workers, label in ((False, "preparing in the step (before)"), (True, "preparing in the workers (now)")):
        util = f", GPU utilisation mean {statistics.mean(busy[in_workers]):.0f}%" if busy[in_workers] else ""
        print(f"  Trainer, {args.workers} workers, {label}: {statistics.median(walls[in_workers]):.3f} s a step "
              f"(median of {len(walls[in_workers])}){util}")


def dispatch(args) -> None:
    """One Trainer step's kernels and waits in the GPU's form, counted on the CPU (see the
    module's docstring)."""
    import torch

    from maskrcnn import Config, MaskRCNN
    from maskrcnn.engine.trainer import Trainer, seed_everything

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import DispatchCounter, gpu_form

    height, width = map(int, args.size.split("x"))
    thin = dict(top_down_pyramid_size=16, rpn_conv_channels=16, fpn_classif_fc_layers_size=32, mask_head_channels=16)
    config = Config.preset(args.preset, num_classes=4, backbone=args.backbone, images_per_gpu=args.batch,
                           warmup_steps=0, image_min_dim=min(height, width), image_max_dim=max(height, width), **thin)
    seed_everything(0)
    items = EllipseItems(3 * args.batch, height, width, INSTANCES)
    with tempfile.TemporaryDirectory() as out, gpu_form():
        trainer = Trainer(MaskRCNN(config), items, out, config, num_workers=0, progress=False, checkpoint_every=0,
                          log_every=10 ** 6, amp=args.amp)
        for group in trainer.optimizer.param_groups:
            group["foreach"] = True  # a GPU's default
        batches = trainer.batches(0)
        for _ in range(2):  # warm: caches, the optimizer's momentum
            trainer.run_step(*next(batches))
        batch = next(batches)
        counter = DispatchCounter()
        with counter:
            trainer.run_step(*batch)
    print(f"{args.preset} preset, {args.backbone}, batch {args.batch} x {args.size}, {args.amp}, "
          f"{INSTANCES} instances an image: {counter.kernels} kernels ({counter.total} ATen ops), "
          f"{counter.syncs} waits seen in op names (on a GPU also each sampler's count read and the loss read)")
    print("waits: " + ", ".join(f"{k} {v}" for k, v in counter.sync_sites.most_common()))
    print("ops by function: " + ", ".join(f"{k} {v}" for k, v in counter.callers.most_common(12)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=None,
                    help="data workers (default: maskrcnn train's own, trainer.default_workers)")
    ap.add_argument("--size", default="800x1066", help="image height x width")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip", type=float, default=20.0, help="seconds of start-up left out")
    ap.add_argument("--split", action="store_true", help="the step's time split and wall time per step instead")
    ap.add_argument("--dispatch", action="store_true",
                    help="count one Trainer step's kernels and waits as a GPU runs it, on the CPU, instead")
    ap.add_argument("--amp", default="bf16", help="--dispatch: bf16, fp16 or off")
    ap.add_argument("--preset", default="matterport", help="--split, --dispatch: the config preset")
    ap.add_argument("--backbone", default="resnet101", help="--split, --dispatch: the backbone (resnet18 for --split on a CPU)")
    ap.add_argument("--thin", action="store_true", help="--split: the demo's narrow FPN, heads and ROI counts")
    ap.add_argument("--reps", type=int, default=5, help="--split: repetitions of each timing")
    ap.add_argument("--rounds", type=int, default=1, help="--split: interleaved Trainer runs of each kind")
    ap.add_argument("--threads", type=int, default=1, help="--split: torch threads of the main process")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `maskrcnn train` arguments")
    args = ap.parse_args(argv)
    if args.dispatch:
        return dispatch(args)
    if args.split:
        return split(args)
    scratch = Path(tempfile.mkdtemp(prefix="maskrcnn_util_"))
    height, width = map(int, args.size.split("x"))
    ann = write_dataset(scratch / "data", args.images, height, width, INSTANCES)
    cmd = [sys.executable, "-m", "maskrcnn.cli", "train", "--coco", str(ann), "--images", str(scratch / "data" / "images"),
           "--out", str(scratch / "run"), "--steps", str(args.steps), "--device", args.device,
           *(["--workers", str(args.workers)] if args.workers is not None else []), "--checkpoint-every", str(args.steps),
           "--set", f"images_per_gpu={args.batch}", *args.extra]
    print(" ".join(cmd), flush=True)
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=sample_utilisation, args=(samples, stop), daemon=True)
    start = time.perf_counter()
    sampler.start()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    stop.set()
    sampler.join()
    print(proc.stdout[-1500:], proc.stderr[-1500:] if proc.returncode else "", sep="\n")
    run = time.perf_counter() - start
    report_data_waits(scratch / "run" / "metrics.jsonl")
    steady = [u for t, u in samples if t - start > args.skip]
    if not samples:
        print(f"no GPU utilisation samples (nvidia-smi missing?); run {run:.0f} s, exit {proc.returncode}")
    elif steady:
        print(f"GPU utilisation after the first {args.skip:.0f} s: mean {statistics.mean(steady):.0f}%, "
              f"median {statistics.median(steady):.0f}%, {len(steady)} samples; "
              f"run {run:.0f} s, exit {proc.returncode}")
    else:
        every = [u for _, u in samples]
        print(f"the run ({run:.0f} s) ended within the first {args.skip:.0f} s: no steady part; over the whole run, "
              f"start-up included, mean {statistics.mean(every):.0f}%, median {statistics.median(every):.0f}%, "
              f"{len(every)} samples; exit {proc.returncode} (more --steps, or a smaller --skip)")


if __name__ == "__main__":
    main()
