"""Shared test set-up."""

import gc

import pytest

from dpkd.privacy import engine


@pytest.fixture(autouse=True)
def _no_private_model_left_over():
    """Each test starts with no model private: while an engine lives, compiled losses with a batch-wide reduction
    check it outside the graph (a graph break). An earlier test's dropped model is freed by the cycle collector, or
    not at all where its refused loss's autograd graph (C++ nodes, which the collector cannot traverse) and its engine
    hold each other: that engine is removed."""
    if engine.live_engines:
        gc.collect()
        for leftover in engine._engines():
            leftover.remove()
    yield
