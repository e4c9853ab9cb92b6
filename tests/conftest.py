import pytest


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
