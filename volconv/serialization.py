"""``save`` / ``load``: MegEngine-compatible checkpoints that cannot run code.

A checkpoint is a pickle of plain data: an ``OrderedDict`` (or other dict, list,
tuple) of numpy arrays and Python scalars, exactly what
``mge.save(model.state_dict(), f)`` writes. So files written by MegEngine load
here, and files written here load in MegEngine (``mge.load`` or plain
``pickle.load``).

:func:`load` never executes code from the file. Unpickling can import and call
any global a file names (``os.system``, ``subprocess.Popen``, ...), so
:func:`load` uses an unpickler that resolves only a short allow-list: numpy's
array and dtype reconstructors, ``collections.OrderedDict`` and a few builtin
containers. Anything else raises :class:`UnsafeCheckpointError` before it is
imported. The allowed callables are guarded too (arrays only from their pickled
data, dtype states only as numpy writes them, no ``bytearray(n)``, dict keys cheap to
hash), so a small hostile file can neither crash numpy nor make :func:`load` allocate
or compute far more than its size. Anything else a truncated, corrupt or hostile
file makes the unpickler raise becomes a :class:`CheckpointError`.

>>> import io, numpy as np, volconv as mge, volconv.module as M
>>> buf = io.BytesIO()
>>> mge.save(M.Conv3d(2, 4, 3).state_dict(), buf)
>>> _ = buf.seek(0)
>>> {k: v.shape for k, v in mge.load(buf).items()}
{'bias': (1, 4, 1, 1, 1), 'weight': (4, 2, 3, 3, 3)}
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import struct
from typing import IO, Any

import numpy as np

from .tensor import Tensor

__all__ = ["CheckpointError", "UnsafeCheckpointError", "load", "save"]


class CheckpointError(pickle.UnpicklingError):
    """The file is not a readable checkpoint (truncated, corrupt, or not a pickle)."""


class UnsafeCheckpointError(CheckpointError):
    """The file asks for something other than arrays, dtypes and plain containers."""


# ---- what a checkpoint may contain --------------------------------------------------------------
if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
    from numpy._core import multiarray as _multiarray
else:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray


class _NdarrayClass:
    """Stands in for ``numpy.ndarray`` in a checkpoint: only :func:`_reconstruct` takes it.

    Calling ``numpy.ndarray(shape)`` itself (a REDUCE on the class) would hand back
    uninitialised memory, so the class is never given to the unpickler.
    """

    def __repr__(self) -> str:
        return "numpy.ndarray"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafeCheckpointError(
            "refusing to call numpy.ndarray directly (uninitialised memory): arrays in a "
            "checkpoint are built by numpy's _reconstruct and their pickled state"
        )


_NDARRAY = _NdarrayClass()


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct``, limited to the empty placeholder numpy always pickles.

    ``ndarray.__reduce__`` writes ``_reconstruct(ndarray, (0,), b"b")`` and then the
    array's state (BUILD). Any other shape would return ``np.empty(shape)``:
    uninitialised memory, or a lazily allocated huge array, from a few bytes of file.
    """
    if (
        subtype is not _NDARRAY
        or type(shape) is not tuple
        or len(shape) != 1
        or type(shape[0]) is not int
        or shape[0] != 0
        or type(dtype) not in (bytes, str)
        or dtype not in (b"b", "b")
    ):
        raise UnsafeCheckpointError(
            f"refusing _reconstruct({subtype!r}, {shape!r}, {dtype!r}): numpy pickles "
            "arrays as _reconstruct(numpy.ndarray, (0,), b'b') followed by their state"
        )
    return np.ndarray((0,), np.int8)


def _plain_dtype(dtype: Any, what: str) -> np.dtype:
    """``dtype`` unless it holds Python objects or has no size (both refused)."""
    if not isinstance(dtype, np.dtype):
        raise UnsafeCheckpointError(f"refusing {dtype!r} as the dtype of {what}: not a numpy dtype")
    if dtype.hasobject:
        # ndarray.__setstate__ and multiarray.scalar crash (SIGSEGV) on object dtypes
        # with hostile states, and object arrays could hold anything: never built.
        raise UnsafeCheckpointError(
            f"refusing dtype {dtype} for {what} (an array of Python objects): {_ALLOWED_TEXT}"
        )
    if dtype.itemsize == 0:
        # A zero-size dtype lets a few bytes describe an array of 2**62 elements.
        raise UnsafeCheckpointError(f"refusing the zero-size dtype {dtype} for {what}")
    return dtype


def _dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype(obj, align, copy)`` as pickled, always a fresh copy of a plain dtype.

    numpy pickles ``dtype(name, False, True)``; forcing ``copy=True`` means a later
    BUILD can never touch numpy's shared builtin dtype objects.
    """
    if type(obj) is not str or type(align) is not bool or type(copy) is not bool:
        # numpy's dtype constructor walks nested lists and dicts (exponentially when
        # they are shared); what numpy pickles is always a type string.
        raise UnsafeCheckpointError(
            f"refusing numpy.dtype({type(obj).__name__}, {type(align).__name__}, "
            f"{type(copy).__name__}): numpy pickles dtypes as dtype(str, bool, bool)"
        )
    return _plain_dtype(np.dtype(obj, align, True), "numpy.dtype(...)")


def _scalar(dtype: Any, *args: Any) -> Any:
    """numpy's ``multiarray.scalar`` (scalars such as ``np.float32(1)``), plain dtypes only."""
    return _multiarray.scalar(_plain_dtype(dtype, "a numpy scalar"), *args)


_MAX_KEY_ITEMS = 1000  # tuple items (counted with repeats) in one dict key or set item
_MAX_KEY_INT_BITS = 4096


def _check_key(key: Any) -> Any:
    """``key`` (a dict key or set item) unless hashing it is expensive.

    Python hashes a tuple by hashing every item, recursively and without caching: a few
    hundred bytes of pickle can build 60 levels of a tuple that holds the level below
    twice (2**60 items to hash, the same attack as shared lists) or a tuple nested
    10**6 deep (whose hash overflows the C stack: SIGSEGV). Plain ``pickle.load`` does
    both. Keys here stay small (at most 1000 tuple items, ints of at most 4096 bits), so
    each hash costs a bounded amount. str, bytes and frozenset cache their hash.
    """
    budget = _MAX_KEY_ITEMS
    stack = [key]
    while stack:
        item = stack.pop()
        if type(item) is tuple:
            budget -= len(item) + 1
            if budget < 0:
                raise UnsafeCheckpointError(
                    f"refusing a dict key or set item of more than {_MAX_KEY_ITEMS} nested "
                    "tuple items (hashing it could take exponential time)"
                )
            stack.extend(item)
        elif type(item) is int and item.bit_length() > _MAX_KEY_INT_BITS:
            raise UnsafeCheckpointError(
                f"refusing a dict key or set item that is an int of {item.bit_length()} bits"
            )
    return key


def _checked_items(items: Any, what: str) -> Any:
    if type(items) not in (list, tuple):
        raise UnsafeCheckpointError(
            f"refusing {what}({type(items).__name__}): only a list or tuple is allowed"
        )
    for item in items:
        _check_key(item)
    return items


def _set(items: Any = ()) -> set:
    """``set(list)``: how protocols 0-3 store a set."""
    return set(_checked_items(items, "set"))


def _frozenset(items: Any = ()) -> frozenset:
    """``frozenset(list)``: how protocols 0-3 store a frozenset."""
    return frozenset(_checked_items(items, "frozenset"))


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    """``OrderedDict()`` (items follow as SETITEMS) or Python 2's ``OrderedDict([[k, v], ...])``."""
    for pair in _checked_items(items, "OrderedDict"):
        if type(pair) not in (list, tuple) or len(pair) != 2:
            raise CheckpointError(f"invalid OrderedDict item {type(pair).__name__}")
        _check_key(pair[0])
    return collections.OrderedDict(items)


def _bytearray(source: Any = b"", encoding: Any = None) -> bytearray:
    """``bytearray`` as pickle writes it: ``bytearray(bytes)`` or ``bytearray(str, "latin-1")``.

    ``bytearray(n)`` with an int would allocate ``n`` zero bytes from a 30-byte file.
    """
    if type(source) is bytes and encoding is None:
        return bytearray(source)
    if type(source) is str and encoding in ("latin-1", "latin1"):
        return bytearray(source, "latin-1")
    raise UnsafeCheckpointError(
        f"refusing bytearray({type(source).__name__}, encoding={encoding!r}): only "
        "bytearray(bytes) and bytearray(str, 'latin-1') are allowed"
    )


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()``: how protocols 0-2 store ``b""`` (``bytes(n)`` would allocate ``n`` bytes)."""
    if args:
        raise UnsafeCheckpointError(
            "refusing bytes() with arguments: only bytes() (an empty bytes object) is allowed"
        )
    return b""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles use to store bytes (``_codecs.encode(s, "latin1")``)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(
            f"refusing _codecs.encode with encoding {encoding!r}: only 'latin1' is allowed"
        )
    return codecs.encode(text, "latin1")


# numpy 1 pickles name ``numpy.core.*``, numpy 2 ``numpy._core.*``; both map to the
# (guarded) functions of the numpy that is installed.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "bytes"): _empty_bytes,
    ("_codecs", "encode"): _latin1_encode,
}
# Python 3 writes ``builtins`` as ``__builtin__`` in protocols 0-2 (Python 2's name)
_ALLOWED.update({("__builtin__", n): f for (m, n), f in list(_ALLOWED.items()) if m == "builtins"})

_ALLOWED_TEXT = (
    "only numpy arrays, dtypes, OrderedDict and plain Python containers/scalars are allowed"
)

_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray)


def _same(state: Any, trusted: Any) -> bool:
    """``state == trusted`` with identical types all the way down (no ``dtype == "f4"``)."""
    if type(state) is not type(trusted):
        return False
    if type(trusted) is tuple:
        return len(state) == len(trusted) and all(map(_same, state, trusted))
    if type(trusted) is dict:
        return state.keys() == trusted.keys() and all(_same(state[k], trusted[k]) for k in trusted)
    return bool(state == trusted)


def _build_dtype(dtype: np.dtype, state: Any, source: str) -> None:
    """BUILD on a dtype: accept only the state numpy itself writes for that dtype.

    numpy's ``dtype.__setstate__`` trusts its argument: a hostile state crashes the
    process (SIGSEGV in numpy 2.4 for a 6-item version-3 tuple) or raises SystemError.
    That is a numpy bug (unhardened ``arraydescr_setstate``), reachable from plain
    ``pickle.load`` and ``mge.load`` too. Every real checkpoint writes
    ``dtype(name, False, True)`` followed by exactly ``dtype.__reduce__()[2]`` of the
    dtype it saved, so the state must equal that of the freshly built dtype (nothing
    to do) or, for a byte-swapped dtype such as ``>f4``, that of
    ``dtype.newbyteorder(state[1])``, which numpy's own state then sets.
    """
    if _same(state, dtype.__reduce__()[2]):
        return
    if (
        type(state) is tuple
        and len(state) > 1
        and state[1] in ("<", ">")
        and not dtype.isbuiltin  # never change numpy's shared dtype objects
    ):
        swapped = dtype.newbyteorder(state[1]).__reduce__()[2]
        if _same(state, swapped):
            dtype.__setstate__(swapped)
            return
    raise UnsafeCheckpointError(
        f"refusing the state {state!r:.200} for dtype {dtype} in checkpoint{source}: it is "
        "not the state numpy writes for a dtype"
    )


def _build_array(array: np.ndarray, state: Any, source: str) -> None:
    """BUILD on the empty array from :func:`_reconstruct`: numpy's array state, plain data only."""
    if type(state) is not tuple or len(state) not in (4, 5):
        raise CheckpointError(f"invalid array state in checkpoint{source}: {state!r:.200}")
    # (version,) shape, dtype, is_fortran, data: refuse object arrays before numpy reads
    # the data (ndarray.__setstate__ crashes on an object dtype with a short list).
    _plain_dtype(state[-3], "an array")
    if type(state[-1]) not in (bytes, str):
        raise CheckpointError(
            f"invalid array data in checkpoint{source}: {type(state[-1]).__name__}, not bytes"
        )
    array.__setstate__(state)


class _RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED`` and checks every BUILD.

    It is the pure-Python unpickler, so that BUILD (``__setstate__``) can be checked
    before numpy sees the state; for a state dict, whose bulk is a few large byte
    strings, it is about as fast as the C one.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load '{module}.{name}' from checkpoint{self._source}: {_ALLOWED_TEXT}"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            f"refusing persistent id {pid!r} in checkpoint{self._source}: {_ALLOWED_TEXT}"
        )

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is np.ndarray:
            _build_array(inst, state, self._source)
        elif isinstance(inst, np.dtype):
            _build_dtype(inst, state, self._source)
        else:
            raise UnsafeCheckpointError(
                f"refusing to set the state of a {type(inst).__name__} in checkpoint"
                f"{self._source}: only arrays and dtypes have one"
            )

    dispatch[pickle.BUILD[0]] = load_build

    def load_bytearray8(self) -> None:
        # the base class allocates bytearray(length) before reading: 20 bytes of file
        # could zero-fill gigabytes. Read the data first; a short file ends here.
        (length,) = struct.unpack("<Q", self.read(8))
        data = self.read(length)
        if len(data) != length:
            raise CheckpointError(f"truncated BYTEARRAY8 in checkpoint{self._source}")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    # Containers are filled only as pickle fills them (SETITEMS into a dict, APPENDS to a
    # list, ADDITEMS to a set: never into an array or bytearray), and every dict key and
    # set item passes _check_key before it is hashed.
    def _target(self, kinds: tuple[type, ...], op: str) -> Any:
        target = self.stack[-1]
        if type(target) not in kinds:
            raise CheckpointError(
                f"invalid {op} on a {type(target).__name__} in checkpoint{self._source}"
            )
        return target

    def load_dict(self) -> None:
        items = self.pop_mark()
        self.append({_check_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})

    dispatch[pickle.DICT[0]] = load_dict

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._target((dict, collections.OrderedDict), "SETITEM")[_check_key(key)] = value

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target((dict, collections.OrderedDict), "SETITEMS")
        for i in range(0, len(items), 2):
            target[_check_key(items[i])] = items[i + 1]

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._target((set,), "ADDITEMS").update(_checked_items(items, "ADDITEMS"))

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self) -> None:
        items = self.pop_mark()  # (pop_mark rebinds self.append)
        self.append(_frozenset(items))

    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_append(self) -> None:
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_ext(self) -> None:
        # copyreg's extension cache could hand back objects that find_class never saw
        raise UnsafeCheckpointError(
            f"refusing a copyreg extension code in checkpoint{self._source}: {_ALLOWED_TEXT}"
        )

    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = load_ext
    del _op


def _check_plain(obj: Any, source: str) -> None:
    """Reject anything but plain data (and arrays of Python objects) in the loaded structure.

    Iterative, and each container is visited once (by ``id``; the loaded structure keeps
    them all alive), so self-references and shared sub-structures take linear time.
    """
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray):
            if item.dtype.hasobject:
                raise UnsafeCheckpointError(
                    f"refusing an array of Python objects (dtype {item.dtype}) in "
                    f"checkpoint{source}: {_ALLOWED_TEXT}"
                )
        elif isinstance(item, (dict, list, tuple, set, frozenset)):
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                stack.extend(item)
        elif not isinstance(item, (np.generic, np.dtype, *_PLAIN_SCALARS)):
            # e.g. an allow-listed function that the file names but never calls
            raise UnsafeCheckpointError(
                f"refusing a {type(item).__name__} in checkpoint{source}: {_ALLOWED_TEXT}"
            )


# ---- save ---------------------------------------------------------------------------------------
def _to_plain(obj: Any, path: str) -> Any:
    """A copy of ``obj`` with Tensors as numpy arrays; anything not plain data is refused."""
    if isinstance(obj, Tensor):
        return np.array(obj._data)
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"volconv.save cannot store an object array at {path}")
        return obj
    if isinstance(obj, (np.generic, np.dtype, *_PLAIN_SCALARS)):
        return obj
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            out[_to_plain(key, f"{path} key")] = _to_plain(value, f"{path}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_to_plain(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else type(obj)(items)
    from .module import Module

    if isinstance(obj, Module):
        raise TypeError(
            f"volconv.save stores plain data, not a whole {type(obj).__name__} module "
            f"(at {path}); save its parameters instead: volconv.save(model.state_dict(), f)"
        )
    raise TypeError(
        f"volconv.save cannot store {type(obj).__name__} at {path}: a checkpoint holds "
        "numpy arrays, Tensors, Python scalars and dict/list/tuple containers of them"
    )


def save(obj: Any, f: str | os.PathLike | IO[bytes], pickle_protocol: int = 4) -> None:
    """Write ``obj`` (usually ``model.state_dict()``) as a MegEngine-loadable checkpoint.

    Parameters
    ----------
    obj : dict, list, tuple, numpy array, Tensor or Python scalar
        Tensors and Parameters anywhere inside are stored as numpy arrays, so the
        file is an ``OrderedDict`` of arrays that ``mge.load`` (or ``pickle.load``)
        reads without volconv installed. A whole Module cannot be saved.
    f : str, path-like or binary file object
        Where to write.
    pickle_protocol : int
        Default 4 (MegEngine 1.13 on Python 3.10 writes protocol 4).

    Raises
    ------
    TypeError
        ``obj`` contains something other than plain data (nothing is written).

    Examples
    --------
    >>> import io, volconv as mge, volconv.module as M
    >>> buf = io.BytesIO()
    >>> mge.save(M.Linear(3, 2).state_dict(), buf)
    >>> buf.getvalue()[:2]
    b'\\x80\\x04'
    """
    data = pickle.dumps(_to_plain(obj, "the saved object"), protocol=pickle_protocol)
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as fout:
            fout.write(data)
        return
    if not hasattr(f, "write"):
        raise TypeError(f"f must be a path or a binary file object, got {type(f).__name__}")
    f.write(data)


# ---- load ---------------------------------------------------------------------------------------
def load(f: str | os.PathLike | IO[bytes], map_location: Any = None) -> Any:
    """Read a checkpoint written by :func:`save` or by ``mge.save(state_dict, f)``.

    Parameters
    ----------
    f : str, path-like or binary file object
    map_location : optional
        Accepted for MegEngine compatibility and ignored (volconv runs on the CPU).

    Returns
    -------
    The stored object, e.g. an ``OrderedDict`` of numpy arrays.

    Raises
    ------
    UnsafeCheckpointError
        The file names any global outside the allow-list (``os.system``,
        ``subprocess.Popen``, a pickled Module class, ...). Nothing from the file is
        imported or called. Also a subclass of ``pickle.UnpicklingError``.
    CheckpointError
        The file is truncated, corrupt, or not a pickle.

    Examples
    --------
    >>> import volconv as mge
    >>> sd = mge.load("tests/fixtures/megengine/conv3d_state.mge")  # doctest: +SKIP
    >>> list(sd)  # doctest: +SKIP
    ['bias', 'weight']
    """
    del map_location
    if isinstance(f, (str, os.PathLike)):
        with open(f, "rb") as fin:
            return _load_from(fin, f" '{os.fspath(f)}'")
    if isinstance(f, (bytes, bytearray, memoryview)):
        return _load_from(io.BytesIO(f), "")
    if not hasattr(f, "read"):
        raise TypeError(f"f must be a path or a binary file object, got {type(f).__name__}")
    name = getattr(f, "name", None)
    return _load_from(f, f" '{name}'" if isinstance(name, str) else "")


def _load_from(file: IO[bytes], source: str) -> Any:
    try:
        obj = _RestrictedUnpickler(file, source).load()
    except CheckpointError as exc:
        if source and source not in str(exc):  # raised by a helper that knows no file name
            raise type(exc)(f"{exc} (checkpoint{source})") from exc
        raise
    except Exception as exc:  # anything a corrupt or hostile file makes the unpickler raise
        raise CheckpointError(
            f"cannot read checkpoint{source}: the file is truncated, corrupt or not a "
            f"volconv/MegEngine checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    _check_plain(obj, source)
    return obj
