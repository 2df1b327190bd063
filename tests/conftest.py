import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import volconv  # noqa: E402


@pytest.fixture
def algorithm():
    """Force ``volconv.config.algorithm`` for one test and restore it afterwards."""
    saved = volconv.config.algorithm

    def force(name):
        volconv.config.algorithm = name

    yield force
    volconv.config.algorithm = saved


@pytest.fixture
def workspace():
    """Set ``volconv.config.workspace_bytes`` for one test and restore it afterwards."""
    saved = volconv.config.workspace_bytes

    def set_cap(nbytes):
        volconv.config.workspace_bytes = nbytes

    yield set_cap
    volconv.config.workspace_bytes = saved


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
