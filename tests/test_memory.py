"""The workspace cap holds: scratch memory beyond the output stays under config.workspace_bytes.

numpy reports its allocations to ``tracemalloc``, so the traced peak during one call
minus what the call must return (the output) is the scratch the algorithm used.
"""

import numpy as np
import pytest
from tracing import scratch_bytes

from volconv import engine
from volconv.engine._args import conv_geometry

CAP = 4 << 20  # 4 MiB: far below the unbounded im2col buffers of these layers (24-37 MiB),
# above one output plane of scratch (the smallest slab; about 2 MiB here)
SLACK = 256 << 10  # weights, transformed weights and small per-call arrays

GEOMETRIES = {
    "dense_3x3x3": ((1, 32, 12, 24, 24), (1, 32, 32, 3, 3, 3), (1, 1, 1), 1, 1),
    "strided_stem": ((1, 3, 12, 40, 40), (1, 16, 3, 3, 7, 7), (1, 2, 2), 2, 1),
    "depthwise": ((2, 16, 12, 24, 24), (16, 1, 1, 3, 3, 3), (1, 1, 1), 1, 16),
    "dilated": ((1, 16, 12, 24, 24), (1, 16, 16, 3, 3, 3), (1, 1, 1), 2, 1),
    "in_plane": ((1, 32, 6, 40, 40), (1, 48, 32, 1, 3, 3), (1, 1, 1), 1, 1),
    "pointwise": ((2, 64, 12, 24, 24), (2, 16, 32, 1, 1, 1), (1, 1, 1), 0, 2),
    "pointwise_strided": ((2, 64, 12, 48, 48), (1, 32, 64, 1, 1, 1), (2, 2, 2), 0, 1),
}


def _geometry(name):
    in_shape, w_shape, stride, pad, groups = GEOMETRIES[name]
    dilation = (2, 2, 2) if name == "dilated" else (1, 1, 1)
    return conv_geometry(in_shape, w_shape, stride, ((pad, pad),) * 3, dilation, groups)


PARAMS = [
    pytest.param(g, a, id=f"{g}-{a}")
    for g in GEOMETRIES
    for a in engine.algorithms()
    if engine._supports(a, _geometry(g))
]


@pytest.mark.parametrize("name,alg", PARAMS)
def test_scratch_memory_under_cap(name, alg, algorithm, workspace):
    geom = _geometry(name)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(geom.in_shape, dtype=np.float32)
    w = rng.standard_normal(geom.w_shape, dtype=np.float32)
    dy = rng.standard_normal(geom.out_shape, dtype=np.float32)
    algorithm(alg)
    workspace(CAP)
    engine.conv3d_forward(x, w, geom)  # warm-up: JIT compilation allocates too
    limit = CAP + SLACK
    assert scratch_bytes(lambda: engine.conv3d_forward(x, w, geom), dy.nbytes) <= limit
    assert scratch_bytes(lambda: engine.conv3d_backward_input(dy, w, geom), x.nbytes) <= limit
    assert scratch_bytes(lambda: engine.conv3d_backward_weight(x, dy, geom), w.nbytes) <= limit
