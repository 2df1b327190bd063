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


# ---- more hostile files: imports, arbitrary objects, memory bombs ------------------------------
def test_a_module_named_by_the_file_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "volconv_evil_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef thing(*a):\n    return a\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for proto in (0, 2, 4):  # GLOBAL/INST opcodes (protocol 0, 2) and STACK_GLOBAL (4)
        if proto == 0:
            data = b"(ivolconv_evil_mod\nthing\n(dp0\nb."  # INST: build a class instance
        elif proto == 2:
            data = b"\x80\x02cvolconv_evil_mod\nthing\nK\x01\x85R."
        else:
            data = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x10volconv_evil_mod\x94"
            data += b"\x8c\x05thing\x94\x93\x94K\x01\x85\x94R\x94."
        with pytest.raises(UnsafeCheckpointError, match="volconv_evil_mod.thing"):
            mge.load(io.BytesIO(data))
    assert not marker.exists()
    assert "volconv_evil_mod" not in __import__("sys").modules


@pytest.mark.parametrize(
    ("data", "refused"),
    [
        # copyreg._reconstructor(cls, object, None): protocol 0-1 object construction
        (b"\x80\x02ccopyreg\n_reconstructor\ncbuiltins\nobject\nN\x87R.",
         "copyreg._reconstructor"),
        (b"\x80\x02cbuiltins\ngetattr\ncbuiltins\nobject\nX\x08\x00\x00\x00__init__\x86R.",
         "builtins.getattr"),
        (b"\x80\x02ccopyreg\n__newobj__\ncbuiltins\nobject\n\x85R.", "copyreg.__newobj__"),
        (b"\x80\x02cbuiltins\nobject\n)\x81.", "builtins.object"),  # NEWOBJ
        (b"\x80\x02cnumpy\nload\nX\x05\x00\x00\x00x.npy\x85R.", "numpy.load"),
        (b"\x80\x02cnumpy.testing\nmeasure\nX\x01\x00\x00\x001\x85R.", "numpy.testing.measure"),
        (b"\x80\x02cbuiltins\n__import__\nX\x02\x00\x00\x00os\x85R.", "builtins.__import__"),
        (b"\x80\x02cbuiltins\nexec\nX\x04\x00\x00\x00pass\x85R.", "builtins.exec"),
    ],
    ids=["reconstructor", "getattr", "newobj", "NEWOBJ_object", "numpy.load", "numpy.testing",
         "__import__", "exec"],
)  # fmt: skip
def test_arbitrary_objects_and_callables_are_refused(data, refused):
    with pytest.raises(UnsafeCheckpointError, match=refused.replace(".", r"\.")):
        mge.load(io.BytesIO(data))


def test_persistent_ids_are_refused():
    with pytest.raises(UnsafeCheckpointError, match="persistent id"):
        mge.load(io.BytesIO(b"\x80\x02X\x03\x00\x00\x00abcQ."))  # BINPERSID


def test_an_ndarray_subclass_is_refused():
    data = pickle.dumps(np.ma.masked_array([1.0, 2.0]), protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="numpy.ma"):
        mge.load(io.BytesIO(data))


_RUN = """
import io, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np, volconv
from volconv.serialization import CheckpointError
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    obj = volconv.load(io.BytesIO({data!r}))
    kind = type(obj).__name__ + " " + str(getattr(obj, "shape", len(obj)))
except CheckpointError as exc:
    kind = "CheckpointError"
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) // 1024
print(kind, "|", grew)
"""


def _load_isolated(data: bytes):
    """``(outcome, MiB the peak RSS grew)`` of ``volconv.load(data)`` in a capped process."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux (RLIMIT_AS) to cap the subprocess's memory")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [__import__("sys").executable, "-c", _RUN.format(root=root, data=data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, grew = proc.stdout.strip().rsplit("|", 1)
    return kind.strip(), int(grew)


def test_a_tiny_file_cannot_allocate_gigabytes():
    data = b"\x80\x02cbuiltins\nbytearray\n\x8a\x04\x00\x00\x00\x40\x85R."  # bytearray(2**30)
    kind, grew = _load_isolated(data)
    assert grew < 64, (kind, grew)


def test_an_array_without_data_is_refused_or_empty():
    data = (
        b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        b"M\x00\x10\x85C\x01b\x87R."  # _reconstruct(ndarray, (4096,), b"b"), no BUILD
    )
    kind, _ = _load_isolated(data)
    assert kind in ("CheckpointError", "ndarray (0,)"), kind


_LOAD_ONE = """
import io, signal, sys
sys.path.insert(0, {root!r})
import volconv
from volconv.serialization import CheckpointError
signal.alarm(3)  # a hang ends as an uncaught exception, not a stuck test
try:
    volconv.load(io.BytesIO({data!r}))
    print("loaded")
except CheckpointError as exc:
    print("CheckpointError")
"""


def _outcome_isolated(data: bytes) -> str:
    """What ``volconv.load(data)`` does in a fresh process: its output, or how it died."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [__import__("sys").executable, "-c", _LOAD_ONE.format(root=root, data=data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        return f"exit code {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    return proc.stdout.strip()


# np.dtype("f4", False, True) followed by BUILD with a hostile state: numpy's
# dtype.__setstate__ trusts the state (plain pickle.load -- MegEngine's mge.load -- crashes too)
_DTYPE = b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f4\x89\x88\x87R"
HOSTILE_STATES = {
    # a 6-item version-3 state: Segmentation fault in numpy 2.4 (found by the fuzzer below)
    "dtype_state_segfault": _DTYPE
    + b"(K\x03X\x01\x00\x00\x00<NJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.",
    # state False: SystemError("bad argument to internal function"), not a CheckpointError
    "dtype_state_system_error": _DTYPE + b"\x89b.",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_STATES))
def test_hostile_dtype_states_are_a_clean_checkpoint_error(name):
    assert _outcome_isolated(HOSTILE_STATES[name]) == "CheckpointError"


# a list that contains itself (10 bytes); 2**60 paths through 60 shared lists (~1 KiB)
_CYCLE = b"\x80\x02]q\x00h\x00a."
_LAUGHS = (
    b"\x80\x02]q\x00K\x01a"
    + b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) for i in range(60))
    + b"."
)


@pytest.mark.parametrize("data", [_CYCLE, _LAUGHS], ids=["cycle", "shared_2**60"])
def test_self_referencing_and_shared_structures_load_quickly(data):
    assert _outcome_isolated(data) in ("loaded", "CheckpointError")


# ---- fuzzing: random mutations of a valid checkpoint ---------------------------------------------
_FUZZ = """
import io, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np, volconv
from volconv.serialization import CheckpointError
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
PLAIN = (type(None), bool, int, float, complex, str, bytes, bytearray, np.generic, np.dtype)

def plain(obj, depth=0):
    if depth > 200:
        return False
    if isinstance(obj, np.ndarray):
        return not obj.dtype.hasobject and type(obj) is np.ndarray
    if isinstance(obj, dict):
        return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return all(plain(v, depth + 1) for v in obj)
    return isinstance(obj, PLAIN)

data = open({path!r}, "rb").read()
rng = np.random.default_rng({seed})
counts = {{"loaded": 0, "CheckpointError": 0}}
for i in range({n}):
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        op = rng.integers(4)
        pos = int(rng.integers(len(buf)))
        if op == 0:
            buf[pos] = int(rng.integers(256))
        elif op == 1:
            buf[pos] ^= 1 << int(rng.integers(8))
        elif op == 2:
            del buf[pos : pos + int(rng.integers(1, 16))]
        else:
            buf[pos:pos] = rng.bytes(int(rng.integers(1, 16)))
    start = time.perf_counter()
    try:
        obj = volconv.load(io.BytesIO(bytes(buf)))
    except CheckpointError:
        counts["CheckpointError"] += 1
    except BaseException as exc:
        print("BAD", i, type(exc).__name__, str(exc)[:200], bytes(buf).hex())
        continue
    else:
        counts["loaded"] += 1
        if not plain(obj):
            print("BAD", i, "loaded a non-plain object", type(obj), bytes(buf).hex())
    if time.perf_counter() - start > 5:
        print("BAD", i, "slow", time.perf_counter() - start)
print("COUNTS", counts)
"""


@pytest.mark.parametrize("name", ["conv3d_grouped_state", "trained_net"])
def test_random_mutations_load_plain_data_or_raise_checkpoint_error(name):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux (RLIMIT_AS) to cap the subprocess's memory")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _FUZZ.format(root=root, path=str(FIXTURES / f"{name}.mge"), seed=17, n=200)
    proc = subprocess.run(
        [__import__("sys").executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = [line for line in proc.stdout.splitlines() if line.startswith("BAD")]
    assert not bad, bad[:5]
    assert "COUNTS" in proc.stdout, proc.stdout[-2000:]


# ---- load_state_dict: all or nothing, even when a conversion fails -------------------------------
def test_load_state_dict_is_atomic_when_a_conversion_fails():
    import warnings

    m = M.Conv3d(2, 4, 3)
    before = {k: np.array(v) for k, v in m.state_dict().items()}
    sd = {"bias": np.full((1, 4, 1, 1, 1), 7.0), "weight": np.full((4, 2, 3, 3, 3), 1e300)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning):
            m.load_state_dict(sd)
    for key, value in m.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_load_state_dict_with_a_failing_closure_changes_nothing():
    m = Net()
    before = {k: np.array(v) for k, v in m.state_dict().items()}
    names = list(before)

    def closure(key, tensor):
        if key == names[-1]:
            raise RuntimeError("disk error")
        return np.zeros(tensor.shape, np.float32)

    with pytest.raises(RuntimeError, match="disk error"):
        m.load_state_dict(closure)
    for key, value in m.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
