#!/usr/bin/env bash
# Everything that needs a GPU, in one run: the CUDA tests, a short `maskrcnn train` on real-size
# images with GPU utilisation sampled, and the GPU training benchmark.  Run from the repository
# root on a CUDA machine whose python3 has torch and torchvision:
#     bash benchmarks/gpu_check.sh quick    # issue 13's numbers and the CUDA tests (one call, < 600 s)
#     bash benchmarks/gpu_check.sh rest     # the rest, as a second call when device time is left
# Wheels for packages that machine lacks (pycocotools) may sit in .whl/; the Matterport parity
# fixture is found through MASKRCNN_SHARED (default ../shared).  benchmarks/gpu_snapshot.sh
# builds a folder with all of it to carry to such a machine.
set -uo pipefail
mode=${1:-quick}
# with OUT set (the device tool), a copy of everything printed lands in $OUT/gpu_check_<mode>.log
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu_check_$mode.log") 2>&1; fi
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import pycocotools" 2>/dev/null; then
  # the wheel that fits this python (benchmarks/gpu_snapshot.sh fetches one per CPython version)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links .whl \
    --target /tmp/site pycocotools
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
if [ "$mode" = quick ]; then
  # issue 13's numbers first (training at batch 8, the CUDA tests, inference, where the GPU
  # waits, utilisation during train); each step is capped and the caps add up to under the
  # device's 600 s per call, so a slow step costs its own rows only
  echo "## GPU training benchmark"
  timeout 150 python3 benchmarks/bench_gpu_train.py --cases large --amp fp32,bf16 --cudnn-benchmark on,off --reps 3
  echo "## CUDA tests"
  timeout 90 python3 -m pytest tests/test_cuda.py tests/test_amp.py -q -p no:cacheprovider 2>&1 | tail -15
  echo "## GPU inference benchmark"
  timeout 70 python3 benchmarks/bench_inference.py --device cuda --cases 2 --reps 5 --stage-reps 1 --no-flops
  echo "## Where the GPU waits for the host (synchronising calls, ops)"
  timeout 60 python3 benchmarks/gpu_syncs.py
  echo "## GPU utilisation during maskrcnn train (800x1066 COCO, batch 4, default workers)"
  timeout 100 python3 benchmarks/gpu_train_utilisation.py --images 32 --steps 150 --batch 4 --skip 15 \
    --extra --set backbone=resnet50
  echo "## The same with the torchvision preset (the training benchmark's; BatchNorm trained from random weights)"
  python3 -c "import maskrcnn; maskrcnn.Config.preset('torchvision').save('/tmp/gpu_check_torchvision.yaml')"
  timeout 100 python3 benchmarks/gpu_train_utilisation.py --images 32 --steps 150 --batch 4 --skip 15 \
    --extra --config /tmp/gpu_check_torchvision.yaml --set backbone=resnet50
  exit 0
fi
# "rest": what quick leaves out, as a second call of its own (the caps add up to under 600 s):
# the small case, where each model's time goes, the costliest kernels, inference at 800x1333,
# detect over a folder and the training step's split
echo "## GPU training benchmark, small case"
timeout 70 python3 benchmarks/bench_gpu_train.py --cases small --amp fp32,bf16 --cudnn-benchmark on,off --reps 4
echo "## Where each model's training time and memory go (synchronised at every stage)"
timeout 120 python3 benchmarks/bench_gpu_train.py --stages --cases small,large --amp fp32,bf16 --reps 3
timeout 90 python3 benchmarks/bench_gpu_train.py --cases large --amp fp32,bf16 --cudnn-benchmark off --reps 1 \
  --warmup 1 --profile
echo "## GPU inference benchmark, all four cases"
timeout 90 python3 benchmarks/bench_inference.py --device cuda --reps 5 --stage-reps 1 --no-flops
echo "## maskrcnn detect over a folder on the GPU: overlapped vs one thread (random COCO-size model, 100 detections)"
python3 -c "import maskrcnn; maskrcnn.MaskRCNN(maskrcnn.Config.preset('torchvision', num_classes=91)).save('/tmp/gpu_check_model')"
timeout 80 python3 benchmarks/bench_detect_cli.py --weights /tmp/gpu_check_model --device cuda --min-confidence 0 --rounds 1
echo "## Training step split: preparation in the step vs in the DataLoader workers (batch 8)"
timeout 120 python3 benchmarks/gpu_train_utilisation.py --split --device cuda --batch 8 --steps 10
echo "## ONNX Runtime providers"
python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" 2>&1 | tail -1
