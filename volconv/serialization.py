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
imported. A truncated or corrupt file raises :class:`CheckpointError`.

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


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles use to store bytes (``_codecs.encode(s, "latin1")``)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(
            f"refusing _codecs.encode with encoding {encoding!r}: only 'latin1' is allowed"
        )
    return codecs.encode(text, "latin1")


# numpy 1 pickles name ``numpy.core.*``, numpy 2 ``numpy._core.*``; both map to the
# functions of the numpy that is installed.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _latin1_encode,
}

_ALLOWED_TEXT = (
    "only numpy arrays, dtypes, OrderedDict and plain Python containers/scalars are allowed"
)

_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``_ALLOWED``."""

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


def _check_plain(obj: Any, source: str) -> None:
    """Reject arrays of Python objects anywhere in the loaded structure (iteratively)."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray):
            if item.dtype.hasobject:
                raise UnsafeCheckpointError(
                    f"refusing an array of Python objects (dtype {item.dtype}) in "
                    f"checkpoint{source}: {_ALLOWED_TEXT}"
                )
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)


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
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as exc:  # fmt: skip
        raise CheckpointError(
            f"cannot read checkpoint{source}: the file is truncated, corrupt or not a "
            f"volconv/MegEngine checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    _check_plain(obj, source)
    return obj
