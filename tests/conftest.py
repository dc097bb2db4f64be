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


@pytest.fixture(autouse=True)
def _signal_handlers_given_back():
    """A run set up in-process and never trained (a test that drives its steps itself, or one
    whose setup is expected to fail) keeps its preemption handler installed, as a real process
    would until it exits; give the signals back after every test so no test sees another's."""
    yield
    from nemo_loop.utils.preemption import PreemptionHandler

    PreemptionHandler.close_active()
