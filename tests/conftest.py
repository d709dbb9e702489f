import pytest

from mirage_env import kernel_warmup


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels_ready():
    """Tests that compare the compiled path with the torch path must run the compiled one: in a test
    process the kernels are made ready (compiled, or loaded from numba's cache) before any test, as
    they would be a few steps into any run. Where numba is unavailable the torch path runs anyway."""
    kernel_warmup.wait()
