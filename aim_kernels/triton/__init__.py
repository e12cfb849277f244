"""Triton kernels and launchers (GPU; they also run on CPU tensors under TRITON_INTERPRET=1).

aim_kernels/_cuda_backend.py decides whether they serve the ops on CUDA tensors."""
