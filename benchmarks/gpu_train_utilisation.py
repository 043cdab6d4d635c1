"""How busy `maskrcnn train` keeps the GPU on real-size images.

    python benchmarks/gpu_train_utilisation.py --images 32 --steps 40

Writes a COCO dataset of smooth 800x1066 JPEGs with elliptic instances (polygons) to a scratch
folder, runs ``maskrcnn train`` on it on the GPU (data loading in worker processes, pinned
memory, non-blocking copies), samples ``nvidia-smi``'s utilisation.gpu every 200 ms meanwhile,
and prints the utilisation over the run's steady part (after the first ``--skip`` seconds, which
hold start-up, the first batches and cuDNN's autotuning) with the run's own steps/s.
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


def write_dataset(folder: Path, count: int, height: int, width: int, instances: int, seed: int = 0) -> Path:
    """``count`` JPEGs and their COCO annotation file (polygons of ellipses, 3 categories)."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = rng.random((height // 16 + 1, width // 16 + 1, 3))
        img = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR))
        name = f"{i:05d}.jpg"
        Image.fromarray(img).save(folder / "images" / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
        for _ in range(instances):
            cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
            ry, rx = rng.uniform(0.03, 0.15) * height, rng.uniform(0.03, 0.15) * width
            t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
            poly = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).round(2).reshape(-1).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": int(rng.integers(1, 4)), "segmentation": [poly],
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--size", default="800x1066", help="image height x width")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip", type=float, default=20.0, help="seconds of start-up left out")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `maskrcnn train` arguments")
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="maskrcnn_util_"))
    height, width = map(int, args.size.split("x"))
    ann = write_dataset(scratch / "data", args.images, height, width, 8)
    cmd = [sys.executable, "-m", "maskrcnn.cli", "train", "--coco", str(ann), "--images", str(scratch / "data" / "images"),
           "--out", str(scratch / "run"), "--steps", str(args.steps), "--device", args.device,
           "--workers", str(args.workers), "--checkpoint-every", str(args.steps),
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
    steady = [u for t, u in samples if t - start > args.skip]
    if steady:
        print(f"GPU utilisation after the first {args.skip:.0f} s: mean {statistics.mean(steady):.0f}%, "
              f"median {statistics.median(steady):.0f}%, {len(steady)} samples; "
              f"run {time.perf_counter() - start:.0f} s, exit {proc.returncode}")


if __name__ == "__main__":
    main()
