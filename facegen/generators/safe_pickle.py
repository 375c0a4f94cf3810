"""A restricted unpickler for pickles that must hold only ``dict[str, numpy.ndarray]``.

SFHQ ships one pickle per image (``pretrained_features/<name>.pickle``: model name -> (1, D) feature array). Those
files come from the internet, and a plain ``pickle.load`` runs whatever callable a pickle names. This module lets
through only the few numpy globals needed to rebuild arrays and dtypes; any other global (``os.system``,
``builtins.eval``, ``subprocess.Popen`` …) is refused *before* it is imported or called, with
:class:`UnsafePickleError`. After loading, the result is checked to be a dict of plain numeric arrays.

Memory is bounded too: the file is refused above ``max_bytes`` before it is read, and every array the pickle asks
numpy to allocate is checked against the pickle's own size first (an array's data always travels inside the
pickle, so a pickle that requests a 2**40-element array is lying, and is refused without allocating anything).

Usage::

    from facegen.generators.safe_pickle import load_array_dict
    features = load_array_dict("SFHQ_pt1_00000185.pickle")   # {'CLIP_ViTL_14@336': array (1, 768), …}
"""

from __future__ import annotations

import io
import os
import pickle
import re
from typing import BinaryIO

import numpy as np

# What numpy itself writes when pickling an ndarray: protocols <= 4 use _reconstruct + ndarray + dtype (protocol 2
# also wraps raw bytes in _codecs.encode), protocol 5 uses _frombuffer. numpy 2 moved numpy.core to numpy._core;
# pickles written by numpy 1.x still name numpy.core, which is mapped to the same objects here.
_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol-2 pickles encode bytes as (latin-1 str, 'latin1'): no code runs
}
_RENAMED_MODULES = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy.core.numeric": "numpy._core.numeric"}
# numeric kinds only: bool, signed and unsigned integers, floats, complex (object arrays could carry anything)
_NUMERIC_KINDS = "biufc"
MAX_PICKLE_BYTES = 64 << 20  # an SFHQ feature pickle is ~10 KB
_NDARRAY = object()  # what the global numpy.ndarray unpickles to: not callable, only _reconstruct's first argument


def _check_request(shape, dtype, available: int) -> None:
    """Refuse an array of ``shape`` x ``dtype`` before numpy allocates it: more bytes than the pickle carries."""
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS:
        raise UnsafePickleError(f"refused an array of dtype {dtype}: only numeric arrays are allowed")
    try:
        dims = [int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,))]
    except (TypeError, ValueError):
        raise UnsafePickleError(f"refused an array of shape {shape!r}") from None
    if any(d < 0 for d in dims):
        raise UnsafePickleError(f"refused an array of shape {tuple(dims)}")
    requested = dtype.itemsize
    for d in dims:  # Python integers: no overflow
        requested *= d
    if requested > available:
        raise UnsafePickleError(f"refused an array of shape {tuple(dims)} and dtype {dtype} ({requested} bytes): "
                                f"more than the {available} bytes of the pickle")


class _CheckedArray(np.ndarray):
    """What ``_reconstruct`` makes here: its ``__setstate__`` (the pickle's BUILD) checks the state first."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("refused an array state that numpy does not write")
        shape, dtype, rawdata = state[-4], state[-3], state[-1]
        if not isinstance(dtype, np.dtype):
            raise UnsafePickleError("refused an array state without a dtype")
        _check_request(shape, dtype, len(rawdata) if isinstance(rawdata, (bytes, bytearray)) else 0)
        super().__setstate__(state)


class UnsafePickleError(ValueError):
    """The pickle names something other than numpy arrays, or does not hold a dict of numeric arrays."""


class _ArrayDictUnpickler(pickle.Unpickler):
    def __init__(self, stream: BinaryIO, size: int):
        super().__init__(stream)
        self.size = size  # bytes of the pickle: no array it holds can be larger

    def find_class(self, module: str, name: str):
        module = _RENAMED_MODULES.get(module, module)
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"refused to unpickle global {module}.{name}: only numpy arrays in a dict are allowed"
            )
        # the globals that allocate get a size check in front; ndarray itself is only a marker for _reconstruct
        if name == "_reconstruct":
            return self._reconstruct
        if name == "_frombuffer":
            return self._frombuffer
        if name == "ndarray":
            return _NDARRAY
        return super().find_class(module, name)

    def _reconstruct(self, subtype, shape, dtype):
        if subtype is not _NDARRAY:
            raise UnsafePickleError("refused _reconstruct of anything but numpy.ndarray")
        _check_request(shape, dtype, self.size)
        return _CheckedArray(shape, dtype)

    def _frombuffer(self, buf, dtype, shape, order, axis_order=None):
        if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
            raise UnsafePickleError("refused _frombuffer of anything but bytes")
        _check_request(shape, dtype, memoryview(buf).nbytes)
        from numpy._core.numeric import _frombuffer

        return _frombuffer(buf, dtype, shape, order, axis_order)

    def persistent_load(self, pid):
        raise UnsafePickleError("refused to unpickle a persistent id: only numpy arrays in a dict are allowed")


def describe_refusal(exc: Exception) -> str:
    """One line out of the page of advice that ``torch.load(weights_only=True)`` raises when it refuses a pickle:
    what was refused (``unsupported GLOBAL posix.system``), or what was broken."""
    text = str(exc)
    for pattern in (r"[Uu]nsupported (?:global|GLOBAL):? (?:GLOBAL )?[\w.]+", r"Unsupported operand[^\n]*"):
        found = re.search(pattern, text)
        if found:
            return found.group(0)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def loads_array_dict(data: bytes) -> dict[str, np.ndarray]:
    """Unpickle bytes that must hold ``dict[str, ndarray]`` (numeric arrays); anything else raises UnsafePickleError."""
    return _load(io.BytesIO(data), len(data))


def load_array_dict(path: str | os.PathLike, max_bytes: int = MAX_PICKLE_BYTES) -> dict[str, np.ndarray]:
    """Unpickle a file that must hold ``dict[str, ndarray]`` (numeric arrays); anything else raises UnsafePickleError.

    A file over ``max_bytes`` is refused unread (UnsafePickleError). A truncated or otherwise broken file raises
    ``pickle.UnpicklingError``.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise UnsafePickleError(f"{size} bytes, over the {max_bytes} bytes limit of a features pickle")
        data = f.read(max_bytes + 1)
    return _load(io.BytesIO(data), len(data))


def _load(stream: BinaryIO, size: int) -> dict[str, np.ndarray]:
    try:
        value = _ArrayDictUnpickler(stream, size).load()
    except UnsafePickleError:
        raise
    except MemoryError:  # e.g. an opcode declaring a 2**40-byte string: refused by pickle before it is read
        raise UnsafePickleError("the pickle declares more data than memory holds") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
            OverflowError) as exc:
        raise pickle.UnpicklingError(f"broken pickle: {type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise UnsafePickleError(f"expected a dict of numpy arrays, got {type(value).__name__}")
    for key, array in list(value.items()):
        if not isinstance(key, str):
            raise UnsafePickleError(f"expected string keys, got {type(key).__name__} {key!r}")
        if type(array) is _CheckedArray:
            array = value[key] = array.view(np.ndarray)
        if type(array) is not np.ndarray:
            raise UnsafePickleError(f"value of {key!r} is {type(array).__name__}, expected a numpy array")
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise UnsafePickleError(f"value of {key!r} has dtype {array.dtype}, expected a numeric array")
    return value
