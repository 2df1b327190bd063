"""``volconv.save`` / ``volconv.load``: MegEngine files load; hostile files run nothing."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
from collections import OrderedDict

import numpy as np
import pytest
from test_module import FIXTURES, Net

import volconv as mge
import volconv.module as M
from volconv.serialization import CheckpointError, UnsafeCheckpointError

SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
}


def _globals_in(data: bytes) -> set[tuple[str, str]]:
    """The ``(module, name)`` globals a pickle references, found by unpickling it."""
    found = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(data)).load()
    return found


# ---- MegEngine's files --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "shapes"),
    [
        ("conv3d_state", {"bias": (1, 4, 1, 1, 1), "weight": (4, 2, 3, 3, 3)}),
        ("conv3d_grouped_state", {"bias": (1, 6, 1, 1, 1), "weight": (2, 3, 2, 1, 2, 3)}),
    ],
)
def test_load_megengine_files(name, shapes):
    path = FIXTURES / f"{name}.mge"
    for source in (path, str(path)):
        sd = mge.load(source)
        assert isinstance(sd, OrderedDict)
        assert {k: v.shape for k, v in sd.items()} == shapes
        assert all(v.dtype == np.float32 for v in sd.values())
    with open(path, "rb") as f:
        from_file = mge.load(f, map_location="cpu0")
    for key in sd:
        np.testing.assert_array_equal(from_file[key], sd[key])


def test_load_trained_net_file_matches_npz():
    io_ = np.load(FIXTURES / "trained_net_io.npz")
    sd = mge.load(FIXTURES / "trained_net.mge")
    assert list(sd) == list(io_["state_keys"])
    for key, value in sd.items():
        np.testing.assert_array_equal(value, io_[f"final_{key}"])


# ---- round trip and MegEngine compatibility of what we write ------------------------------------
def test_save_load_round_trip_path_and_file(tmp_path):
    net = Net()
    path = tmp_path / "net.mge"
    mge.save(net.state_dict(), path)
    loaded = mge.load(path)
    assert isinstance(loaded, OrderedDict) and list(loaded) == list(net.state_dict())
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(loaded[key], value)
        assert loaded[key].flags.writeable  # a fresh array, not a read-only view
    other = Net()
    other.load_state_dict(loaded)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(other(x).numpy(), net(x).numpy())

    buf = io.BytesIO()
    mge.save(net.state_dict(keep_var=True), buf)  # Parameters are stored as arrays
    buf.seek(0)
    from_buf = mge.load(buf)
    assert all(type(v) is np.ndarray for v in from_buf.values())


def test_written_file_is_plain_pickle_with_safe_globals(tmp_path):
    path = tmp_path / "conv.mge"
    mge.save(M.Conv3d(2, 4, 3).state_dict(), str(path))
    data = path.read_bytes()
    assert data[:2] == b"\x80\x04"  # protocol 4, as mge.save on Python 3.10
    assert _globals_in(data) <= SAFE_GLOBALS
    plain = pickle.loads(data)  # what MegEngine's mge.load does
    assert isinstance(plain, OrderedDict) and list(plain) == ["bias", "weight"]


def test_round_trip_of_plain_containers_and_scalars():
    obj = {
        "epoch": 3,
        "lr": 0.1,
        "name": "run",
        "flags": (True, None),
        "history": [1.5, 2.5],
        "tags": {"a", "b"},
        "frozen": frozenset({1}),
        "z": 1 + 2j,
        "raw": b"\x00\x01",
        "scalar": np.float32(2.5),
        "int_array": np.arange(4, dtype=np.int64),
        "dtype": np.dtype("float16"),
        "tensor": mge.tensor([1.0, 2.0]),
    }
    buf = io.BytesIO()
    mge.save(obj, buf)
    loaded = mge.load(buf.getvalue())
    assert type(loaded) is dict
    assert loaded["epoch"] == 3 and loaded["tags"] == {"a", "b"} and loaded["z"] == 1 + 2j
    assert loaded["scalar"] == np.float32(2.5) and loaded["scalar"].dtype == np.float32
    assert loaded["dtype"] == np.float16
    np.testing.assert_array_equal(loaded["tensor"], np.array([1.0, 2.0], np.float32))


def test_protocol_2_pickles_load():
    sd = M.Conv3d(1, 2, 2).state_dict()
    data = pickle.dumps(OrderedDict((k, np.array(v)) for k, v in sd.items()), protocol=2)
    loaded = mge.load(io.BytesIO(data))
    np.testing.assert_array_equal(loaded["weight"], sd["weight"])


def test_save_refuses_modules_and_arbitrary_objects(tmp_path):
    path = tmp_path / "model.mge"
    with pytest.raises(TypeError, match=r"state_dict\(\)"):
        mge.save(Net(), path)
    with pytest.raises(TypeError, match="cannot store object"):
        mge.save({"opt": object()}, path)
    assert not path.exists()  # nothing written


# ---- hostile files ------------------------------------------------------------------------------
class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsPopen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


class _RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize(
    ("payload", "refused"),
    [(_RunsShell, "system"), (_RunsPopen, "subprocess.Popen"), (_RunsEval, "builtins.eval")],
)
def test_hostile_pickles_are_refused_and_run_nothing(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.mge"
    with open(path, "wb") as f:  # hidden inside an otherwise normal state dict
        pickle.dump(OrderedDict(weight=np.zeros(2), bias=payload(marker)), f, protocol=4)
    with pytest.raises(UnsafeCheckpointError) as info:
        mge.load(path)
    message = str(info.value)
    assert refused in message and "evil.mge" in message
    assert "only numpy arrays, dtypes, OrderedDict and plain Python containers" in message
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_pickled_module_objects_are_refused():
    data = pickle.dumps(M.Conv3d(1, 1, 1))  # what mge.save(model, f) would write
    with pytest.raises(UnsafeCheckpointError, match="volconv.module.conv.Conv3d"):
        mge.load(io.BytesIO(data))


def test_object_arrays_are_refused():
    data = pickle.dumps({"w": np.array([1, "x"], dtype=object)})
    with pytest.raises(UnsafeCheckpointError, match="array of Python objects"):
        mge.load(io.BytesIO(data))


def test_codecs_encode_only_latin1():
    # protocol 2: _codecs.encode("abc", "rot13")
    data = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(UnsafeCheckpointError, match="latin1"):
        mge.load(io.BytesIO(data))


# ---- truncated and corrupt files ----------------------------------------------------------------
def test_truncated_file_raises_clear_error(tmp_path):
    data = (FIXTURES / "conv3d_state.mge").read_bytes()
    path = tmp_path / "cut.mge"
    for size in (0, 1, 40, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="cut.mge.*truncated, corrupt"):
            mge.load(path)


def test_garbage_file_raises_clear_error(tmp_path):
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(CheckpointError, match="noise.bin"):
        mge.load(path)
    with pytest.raises(TypeError, match="path or a binary file"):
        mge.load(12)
