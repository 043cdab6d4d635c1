"""Eager and ONNX Runtime, ours and torchvision's, in one interleaved run (issue 10.4).

    python benchmarks/bench_onnx.py                 # 480x640, ~10 detections, 2 threads
    python benchmarks/bench_onnx.py --cases 4 --reps 5
    python benchmarks/bench_onnx.py --skip 2            # 800x1333, ~10 detections

Rows: ours eager, ours exported (``maskrcnn.export.export_onnx``) on ONNX Runtime, torchvision
eager, torchvision exported to ONNX Runtime.  Same weights (ours converted from torchvision's),
same image, the score threshold set to give ~N detections; every row's detections are checked
against torchvision eager.  Each exported graph holds its score threshold, so each case exports
both models again (minutes: that is the export, not the timing).

torchvision's export recipe (its own test_onnx.py): the TorchScript exporter on the eval model
with one image in a list,

    torch.onnx.export(tv, ([image],), path, dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["boxes", "labels", "scores", "masks"],
                      dynamic_axes={"images": [1, 2], "boxes": [0], "labels": [0], "scores": [0], "masks": [0]})

run with ``image.float() / 255`` as input; its graph includes the resize and the mask paste.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import harness
import torch
from harness import (build_ours, build_torchvision, fmt_ms, interleaved, median, same_detections,
                     set_score_threshold, smooth_image, threshold_for)

CASES = [("480x640 -> 800x1066", (480, 640), 10), ("480x640 -> 800x1066", (480, 640), 100),
         ("800x1333", (800, 1333), 10), ("800x1333", (800, 1333), 100)]


def export_torchvision(tv, image: torch.Tensor, path: Path) -> Path:
    """torchvision's model through the TorchScript exporter, as the docstring's recipe."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tv, ([image.float() / 255],), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["boxes", "labels", "scores", "masks"],
                          dynamic_axes={"images": [1, 2], "boxes": [0], "labels": [0], "scores": [0], "masks": [0]})
    return path


def ort_session(path: Path, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])  # every fusion on


def bench_onnx(args, device) -> list[dict]:
    from maskrcnn.export import OnnxMaskRCNN, export_onnx

    threads = torch.get_num_threads()
    tv = build_torchvision(800, 1333)
    ours = build_ours(tv, 800, 1333)
    rows = []
    print(f"\n## Eager and ONNX Runtime (cpu, {threads} threads, median of {args.reps}, interleaved)\n")
    print("| image | dets | ours eager | ours ORT | tv eager | tv ORT | ours eager/tv | ours eager/tv ORT "
          "| ours ORT/tv | ours ORT/tv ORT | detections |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    for label, (h, w), count in CASES[args.skip:args.skip + args.cases]:
        image = smooth_image(h, w, seed=h + w)
        set_score_threshold(tv, ours, threshold_for(tv, image, count, device))
        ours_onnx = OnnxMaskRCNN(export_onnx(ours, tmp / "ours.onnx"), threads)
        tv_session = ort_session(export_torchvision(tv, image, tmp / "tv.onnx"), threads)
        tv_input = {"images": (image.float() / 255).numpy()}

        def run_tv():
            with torch.inference_mode():
                return tv([image.float() / 255])[0]

        def run_tv_ort():
            out = tv_session.run(None, tv_input)
            return {k: torch.from_numpy(v) for k, v in zip(("boxes", "labels", "scores", "masks"), out)}

        fns = {"ours eager": lambda: ours.detect([image])[0], "ours ORT": lambda: ours_onnx.detect([image])[0],
               "tv eager": run_tv, "tv ORT": run_tv_ort}
        ref = run_tv()
        notes = []
        for name in ("ours eager", "ours ORT"):
            ok, note = same_detections(ref, fns[name]())
            notes.append(f"{name}: {note}")
        tv_ort = run_tv_ort()
        notes.append(f"tv ORT: {len(tv_ort['boxes'])} dets" + (" (same count)" if len(tv_ort["boxes"]) == len(ref["boxes"])
                                                                else " (differs)"))
        t = {k: median(v) for k, v in interleaved(fns, args.reps, device).items()}
        n = len(ref["boxes"])
        print(f"| {label} | {n} | {fmt_ms(t['ours eager'])} | {fmt_ms(t['ours ORT'])} | {fmt_ms(t['tv eager'])} "
              f"| {fmt_ms(t['tv ORT'])} | {t['ours eager'] / t['tv eager']:.2f} | {t['ours eager'] / t['tv ORT']:.2f} "
              f"| {t['ours ORT'] / t['tv eager']:.2f} "
              f"| {t['ours ORT'] / t['tv ORT']:.2f} | {'; '.join(notes)} |", flush=True)
        rows.append(dict(case=label, dets=n, **t))
    return rows


def main(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--cases", type=int, default=1, help="run N of the 4 cases (default 1)")
    p.add_argument("--skip", type=int, default=0, help="skip the first N cases")
    args = p.parse_args(argv)
    bench_onnx(args, harness.setup(args))


if __name__ == "__main__":
    main()
