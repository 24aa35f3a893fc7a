#!/usr/bin/env bash
# The GPU bring-up in one device call (issue 9): build ftlm._C with CUDA, run the GPU tests, then the kernel and
# training-step benchmarks, each step under its own time limit so the whole fits one 10-minute call. Every log lands
# in $OUT (at most 8 files come back): env.txt, build.log, gpu-tests.log, kernels.txt, train_step.txt.
#
# Here, once:   ../shared/tools/device-wheels.sh        # .whl/: hydra, omegaconf, streaming, deepspeed, ... for cp312
# Device call:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Options (environment): FTLM_GPU_STEPS="tests kernels train" (which steps), FTLM_GPU_QUICK=1 (smaller tables).
# Never `pip install torch` there (no network); the image's torch 2.11 / triton 3.6 are the ones to test.
set -uo pipefail
OUT=${OUT:-/tmp/ftlm-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
steps=${FTLM_GPU_STEPS:-tests kernels train}
quick=${FTLM_GPU_QUICK:-1}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

# ftlm._C in place against the image's torch (sm_90 only: the build is minutes per extra architecture)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FTLM_CUDA=1 timeout 240 \
  python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
  && echo "ftlm._C: built" || echo "ftlm._C: build failed or timed out (see build.log); its tests skip"

if [[ " $steps " == *" tests "* ]]; then
  # Correctness before any timing: every kernel against its PyTorch reference, on the GPU (TRITON_INTERPRET unset).
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/kernels tests/model \
    -o addopts="-ra --durations=10" 2>&1 | tee "$OUT/gpu-tests.log" | tail -n 25
fi

if [[ " $steps " == *" kernels "* ]]; then
  if [ "$quick" = 1 ]; then
    args=(--seqs 1024,4096,16384 --hiddens 1024,4096,8192 --vocabs 32768,131072)
  else
    args=()
  fi
  timeout 180 python3 benchmarks/kernels.py "${args[@]}" 2>&1 | tee "$OUT/kernels.txt" | tail -n 60
fi

if [[ " $steps " == *" train "* ]]; then
  timeout 150 python3 benchmarks/train_step.py --steps 5 --warmup 2 2>&1 | tee "$OUT/train_step.txt" | tail -n 30
fi
echo "logs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
