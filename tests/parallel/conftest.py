import pytest

from megaseg.megatron import parallel


@pytest.fixture(scope="module")
def model_parallel():
    """megatron-core parallel state for one gloo process (world size 1)."""
    parallel.initialize_model_parallel(tp=1, pp=1, seed=1234)
    yield
    parallel.destroy_model_parallel()
