"""``maskrcnn detect`` over a folder: reading, detection and writing in one thread against
overlapped (the next batch read ahead, overlays drawn and written behind).

    python benchmarks/bench_detect_cli.py                         # a stand-in model that waits like a GPU
    python benchmarks/bench_detect_cli.py --wait-ms 0 --instances 100
    python benchmarks/bench_detect_cli.py --weights run1/model --device cuda

The stand-in model sleeps ``--wait-ms`` per image (with the GIL released, as a process waiting
for its GPU does) and returns ``--instances`` rectangles; with ``--weights`` the real model runs
instead.  Each row runs the whole command (model loading left out) on ``--images`` smooth JPEGs,
both ways interleaved ``--rounds`` times; the outputs of the two are checked to be identical.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from maskrcnn import Detections
from maskrcnn.cli import main as cli
from maskrcnn.commands import detect as detect_command


class StandIn:
    """A model whose ``detect`` waits ``wait`` seconds an image and finds ``count`` rectangles."""

    def __init__(self, wait: float, count: int, device: str = "cuda"):
        from maskrcnn import Config
        self.wait, self.count, self.device, self.config = wait, count, torch.device(device), Config()

    def detect(self, images):
        time.sleep(self.wait * len(images))
        found = []
        for image in images:
            h, w = image.shape[:2]
            g = torch.Generator().manual_seed(0)
            x1 = torch.randint(0, w - 160, (self.count,), generator=g)
            y1 = torch.randint(0, h - 150, (self.count,), generator=g)
            x2 = x1 + torch.randint(10, 160, (self.count,), generator=g)
            y2 = y1 + torch.randint(10, 150, (self.count,), generator=g)
            masks = torch.zeros(self.count, h, w, dtype=torch.bool)
            for k, (a, b, c, d) in enumerate(torch.stack([x1, y1, x2, y2], 1).tolist()):
                masks[k, b:d, a:c] = True
            found.append(Detections(torch.stack([x1, y1, x2, y2], 1).float(), torch.ones(self.count, dtype=torch.int64),
                                    torch.linspace(0.99, 0.5, self.count), masks))
        return found


def write_images(folder: Path, count: int, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = rng.random((height // 16 + 1, width // 16 + 1, 3))
        img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
        img.save(folder / f"{i:04d}.jpg", quality=90)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def run(model, images: Path, out: Path, overlapped: bool, extra: list[str]) -> float:
    threads = getattr(detect_command, "pipeline_threads", None)  # None: a version that had no overlap
    detect_command.load_model = lambda args: model
    if not overlapped:
        detect_command.pipeline_threads = lambda device, no_overlays=False: (0, 0)
    try:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli(["detect", "--weights", "unused", "--out", str(out), *extra, str(images)]) == 0
        return time.perf_counter() - start
    finally:
        detect_command.pipeline_threads = threads


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", default="480x640", help="image height x width")
    ap.add_argument("--instances", default="10,100", help="stand-in detections per image")
    ap.add_argument("--wait-ms", type=float, default=30.0, help="stand-in detection time per image")
    ap.add_argument("--weights", help="a real model folder instead of the stand-in")
    ap.add_argument("--device", default="cpu", help="with --weights")
    ap.add_argument("--min-confidence", type=float, help="with --weights: its detection_min_confidence")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `maskrcnn detect` arguments")
    args = ap.parse_args(argv)
    height, width = map(int, args.size.split("x"))
    scratch = Path(tempfile.mkdtemp(prefix="maskrcnn_detect_"))
    write_images(scratch / "images", args.images, height, width)
    if args.weights:
        from maskrcnn import MaskRCNN
        model = MaskRCNN.load(args.weights, map_location=args.device)
        if args.min_confidence is not None:
            model.config.detection_min_confidence = args.min_confidence
        models = {f"{args.weights} on {args.device}": model}
    else:
        models = {f"stand-in, {args.wait_ms:g} ms, {n} inst": StandIn(args.wait_ms / 1e3, int(n))
                  for n in args.instances.split(",")}
    print(f"\n## maskrcnn detect, {args.images} images of {args.size} ({torch.get_num_threads()} threads)\n")
    print("| model | one thread s | overlapped s | overlapped / one thread |")
    print("|---|---:|---:|---:|")
    for name, model in models.items():
        times = {False: [], True: []}
        for r in range(args.rounds):
            for overlapped in (False, True):
                times[overlapped].append(run(model, scratch / "images", scratch / f"out-{overlapped}", overlapped,
                                             args.extra))
        assert digest(scratch / "out-False") == digest(scratch / "out-True"), "the outputs differ"
        one, both = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {one:.2f} | {both:.2f} | {both / one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
