import os

import pytest
import torch

# Triton kernels run under its interpreter on machines without a GPU (CI). The switch must be set before
# any kernel module is imported, which is why it lives here, at the top of conftest.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel_device():
    """Where Triton kernels run in this test session: the GPU, or the CPU under TRITON_INTERPRET=1."""
    return KERNEL_DEVICE


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct GGUF on the CPU reference backend, loaded once per run."""
    import ingot

    return ingot.load("smollm2-135m", device="cpu", max_context=512)


@pytest.fixture(scope="session")
def smollm2_path():
    from ingot.registry import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path():
    from ingot.registry import resolve

    return resolve("gemma3-270m")
