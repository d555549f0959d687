import os

import pytest

import torch

# The fused Triton kernel is tested on the CPU in Triton's interpreter. The variable
# is read when kernels are defined, so it is set before torch_l2o is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=40, derandomize=True)
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(1)  # xdist runs a worker per core


@pytest.fixture(autouse=True)
def _reference_cpu_step(request):
    """Outside ``test_cpu_step.py`` CPU tensors take the PyTorch reference step.

    Many tests compare iterates bit for bit (textbook ISTA, one network call per group);
    the fused C++ loop computes the same mathematics to ~1e-6, not the same bits, and is
    tested against the reference in its own module. Under the Triton interpreter (CPU
    CI) it declines anyway; this keeps a machine with CUDA, where the interpreter is off,
    running the same CPU paths.
    """
    if request.module.__name__.rsplit(".", 1)[-1] == "test_cpu_step":
        yield
        return
    from torch_l2o.kernels.cpu_step import set_cpu_step_backend

    prev = set_cpu_step_backend("reference")
    try:
        yield
    finally:
        set_cpu_step_backend(prev)
