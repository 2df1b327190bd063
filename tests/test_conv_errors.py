"""The error-case table: every bad input gives a clear exception naming the argument.

Each row: (id, function, kwargs overriding a valid call, exception type, regex that the
message must match -- the argument's name and the offending numbers).
"""

import numpy as np
import pytest

import volconv.functional as F

X = np.ones((1, 4, 5, 5, 5), np.float32)
W = np.ones((2, 4, 3, 3, 3), np.float32)
WG = np.ones((2, 1, 2, 3, 3, 3), np.float32)  # groups=2, 1 out / 2 in per group
WT = np.ones((4, 2, 3, 3, 3), np.float32)  # transposed: (in, out, k...)


def conv(**kw):
    args = dict(inp=X, weight=W)
    args.update(kw)
    return F.conv3d(**args)


def convt(**kw):
    args = dict(inp=X, weight=WT)
    args.update(kw)
    return F.conv_transpose3d(**args)


ERRORS = [
    ("stride0", conv, dict(stride=0), ValueError, r"stride must be >= 1.*\(0, 0, 0\)"),
    ("stride0_one_axis", conv, dict(stride=(1, 0, 1)), ValueError, r"stride.*\(1, 0, 1\)"),
    ("stride_negative", conv, dict(stride=-1), ValueError, r"stride.*\(-1, -1, -1\)"),
    ("padding_negative", conv, dict(padding=-1), ValueError, r"padding must be >= 0.*-1"),
    ("dilation0", conv, dict(dilation=0), ValueError, r"dilation must be >= 1.*0"),
    ("stride_len2", conv, dict(stride=(1, 1)), ValueError, r"stride must have 3 elements.*2"),
    ("stride_len4", conv, dict(stride=(1, 1, 1, 5)), ValueError, r"stride must have 3.*4"),
    ("padding_float", conv, dict(padding=1.5), TypeError, r"padding must contain integers.*1.5"),
    ("padding_none", conv, dict(padding=None), TypeError, r"padding must be an int"),
    ("padding_str", conv, dict(padding="333"), TypeError, r"padding must be an int"),
    ("groups0", conv, dict(groups=0), ValueError, r"groups must be a positive integer, got 0"),
    ("groups_negative", conv, dict(groups=-1), ValueError, r"groups.*-1"),
    ("conv_mode", conv, dict(conv_mode="convolution"), ValueError, r"conv_mode.*'convolution'"),
    ("conv_mode_none", conv, dict(conv_mode=None), ValueError, r"conv_mode.*None"),
    ("input_4d", conv, dict(inp=X[0]), ValueError, r"inp must be 5-D.*4-D.*\(4, 5, 5, 5\)"),
    ("input_6d", conv, dict(inp=X[None]), ValueError, r"inp must be 5-D.*6-D"),
    ("weight_4d", conv, dict(weight=W[0]), ValueError, r"weight must be 5-D.*\(4, 3, 3, 3\)"),
    ("weight_6d_groups1", conv, dict(weight=WG), ValueError, r"weight must be 5-D.*groups=1"),
    ("weight_5d_groups2", conv, dict(groups=2), ValueError, r"weight must be 6-D.*groups=2"),
    ("groups_vs_weight", conv, dict(weight=WG, groups=4), ValueError, r"groups=4.*2 groups"),
    (
        "channel_mismatch",
        conv,
        dict(weight=np.ones((2, 3, 3, 3, 3), np.float32)),
        ValueError,
        r"inp has 4 channels but the weight expects 3",
    ),
    (
        "kernel_too_large",
        conv,
        dict(weight=np.ones((2, 4, 6, 3, 3), np.float32)),
        ValueError,
        r"kernel too large on spatial axis 0: inp size 5 .* extent 6",
    ),
    (
        "dilated_kernel_too_large",
        conv,
        dict(dilation=3),
        ValueError,
        r"kernel too large.*extent 7 \(kernel 3, dilation 3\)",
    ),
    (
        "int_x_int",
        conv,
        dict(inp=X.astype(np.int32), weight=W.astype(np.int32)),
        TypeError,
        r"floating operand.*int32",
    ),
    ("bool_input", conv, dict(inp=X.astype(bool), weight=W.astype(bool)), TypeError, r"bool"),
    ("complex_input", conv, dict(inp=X.astype(np.complex64)), TypeError, r"complex64"),
    ("object_input", conv, dict(inp=X.astype(object)), TypeError, r"object"),
    ("string_input", conv, dict(inp="abc"), TypeError, r"inp must be a Tensor or numpy array"),
    (
        "bias_wrong_length",
        conv,
        dict(bias=np.ones(5, np.float32)),
        ValueError,
        r"bias must hold one value per output channel \(2\).*\(5,\)",
    ),
    (
        "bias_6d",
        conv,
        dict(bias=np.ones((1, 2, 1, 1, 1, 1), np.float32)),
        ValueError,
        r"bias.*\(1, 2, 1, 1, 1, 1\)",
    ),
    ("t_stride0", convt, dict(stride=0), ValueError, r"stride must be >= 1"),
    (
        "t_output_padding_ge_stride",
        convt,
        dict(output_padding=1),
        ValueError,
        r"output_padding.*\(1, 1, 1\).*stride=\(1, 1, 1\)",
    ),
    ("t_output_padding_negative", convt, dict(output_padding=-1), ValueError, r"output_padding"),
    (
        "t_channel_mismatch",
        convt,
        dict(weight=np.ones((3, 2, 3, 3, 3), np.float32)),
        ValueError,
        r"inp has 4 channels but the weight expects 3",
    ),
    ("t_empty_output", convt, dict(padding=4), ValueError, r"output would be empty.*padding 4"),
    ("t_conv_mode", convt, dict(conv_mode="cross_correlation"), TypeError, r"conv_mode"),
]


@pytest.mark.parametrize("fn,kwargs,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_input_raises_clear_error(fn, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(**kwargs)


def test_huge_output_is_a_memory_error_before_allocating():
    # 1 x 1 x 2^20 x 2^20 x 2^10 ... the output alone would need petabytes.
    x = np.lib.stride_tricks.as_strided(
        np.zeros(1, np.float32), (1, 1, 2**20, 2**20, 2**10), (0,) * 5
    )
    with pytest.raises(MemoryError, match="conv3d output of shape"):
        F.conv3d(x, np.ones((1, 1, 1, 1, 1), np.float32))
