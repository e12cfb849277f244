#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a machine that has one:
#   bash benchmarks/run_gpu.sh            (from the repository root, with aim_kernels built)
# 1. every test marked gpu (the CUDA and Triton columns of the op test matrix, tests/common.py),
#    its log in benchmarks/results/gpu_tests.log
# 2. the GPU benchmarks, results under benchmarks/results/
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
status=0
python -m pytest -q -m gpu tests 2>&1 | tee benchmarks/results/gpu_tests.log || status=$?
python benchmarks/gpu_topdown_merge.py "$@" || status=$?
python benchmarks/gpu_gumbel_binarize.py "$@" || status=$?
python benchmarks/gpu_masked_conv2d.py "$@" || status=$?
python benchmarks/gpu_kernel_resources.py --json benchmarks/results/gpu_kernel_resources.json || status=$?
exit $status
