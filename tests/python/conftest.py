"""Shared test set-up."""

import gc

import pytest

from dpkd.privacy import engine


@pytest.fixture(autouse=True)
def _no_private_model_left_over():
    """Each test starts with no model private: while an engine lives, compiled losses with a batch-wide reduction
    check it outside the graph (a graph break). An earlier test's dropped model is freed by the cycle collector, or
    not while something still holds it (the traceback of an error a test expected keeps its frames): that engine is
    removed."""
    if engine.live_engines:
        gc.collect()
        for leftover in engine._engines():
            leftover.remove()
        assert engine.live_engines == 0, "the count of live engines drifted from the engines themselves"
    yield
