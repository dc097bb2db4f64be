import pytest


@pytest.fixture(scope="session")
def megatron_single_process():
    """A world of one with TP=PP=1, for unit tests that build megatron-core modules."""
    from nemo_loop.utils.distributed import (
        ParallelConfig,
        init_distributed,
        initialize_model_parallel,
    )

    init_distributed()
    initialize_model_parallel(ParallelConfig(), seed=1234)
    yield
