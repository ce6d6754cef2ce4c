"""`runtime.deterministic`: the same spec, seed and hardware give the same weights.

On the CPU this library's training already repeats bit for bit (the benchmark's stages rely on
it); on CUDA, cuDNN's autotuner and atomic-add kernels make runs differ in their last bits.
PyTorch's switch picks the deterministic kernels where they exist. torchvision's RoIAlign and
RoIPool backward on CUDA have none, so a Faster R-CNN cannot be made fully deterministic there:
the switch warns for those kernels instead of failing the run, and the rest is deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# cuBLAS needs a fixed workspace to repeat its results (CUDA >= 10.2); read when the CUDA
# context is created, so it is set before the process touches the device.
CUBLAS_WORKSPACE = ":4096:8"


@contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Within the block, deterministic kernels only (where PyTorch has them); the process's
    previous settings are restored after it, so an in-process run leaves its caller as found."""
    if not enabled:
        yield
        return
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
