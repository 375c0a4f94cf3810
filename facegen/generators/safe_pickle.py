"""Restricted unpicklers: ``dict[str, numpy.ndarray]`` (SFHQ features) and insightface's verification pairs.

SFHQ ships one pickle per image (``pretrained_features/<name>.pickle``: model name -> (1, D) feature array). Those
files come from the internet, and a plain ``pickle.load`` runs whatever callable a pickle names. This module lets
through only the few numpy globals needed to rebuild arrays and dtypes; any other global (``os.system``,
``builtins.eval``, ``subprocess.Popen`` …) is refused *before* it is imported or called, with
:class:`UnsafePickleError`. After loading, the result is checked to be a dict of plain numeric arrays.

Memory is bounded too: the file is refused above ``max_bytes`` before it is read, and every array the pickle asks
numpy to make is checked against the pickle's own size first, and so are all the arrays of the result together
(each counted every time it appears: its reader copies it every time): an array's data always travels inside the
pickle, once, so a pickle that requests a 2**40-element array, or 700 arrays over one shared 4 MB buffer (memo
references cost a few bytes each: 2.9 GB once copied), is lying, and is refused before anything is copied.

insightface's verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``) are pickles of ``(bins,
issame_list)``: 2P encoded images as bytes (Python 2 ``str``, so Python 3 reads them with ``encoding="bytes"``) or as
uint8 arrays (``cv2.imencode``'s (N, 1) buffers in newer packs), and P booleans. :func:`load_verification_pairs`
reads them with the same restrictions plus ``numpy``'s bool scalars, after checking that every length the pickle
declares fits in the file (:func:`pickletools.genops` walks it first), and checks the result's structure.

Usage::

    from facegen.generators.safe_pickle import load_array_dict, load_verification_pairs
    features = load_array_dict("SFHQ_pt1_00000185.pickle")   # {'CLIP_ViTL_14@336': array (1, 768), …}
    images, issame = load_verification_pairs("lfw.bin")      # 12,000 encoded images (bytes), 6,000 bools
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
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
MAX_PAIRS_BYTES = 1 << 30  # lfw.bin is ~60 MB, cfp_fp.bin ~90 MB
_NDARRAY = object()  # what the global numpy.ndarray unpickles to: not callable, only _reconstruct's first argument


def _check_request(shape, dtype, available: int) -> int:
    """Refuse an array of ``shape`` x ``dtype`` before numpy allocates it: more bytes than the pickle carries.
    Returns its bytes."""
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
    return requested


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


def _latin1_encode(text, encoding="utf-8"):
    """``_codecs.encode`` as pickles use it (protocol 2 writes bytes as a latin-1 str): that codec only."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise UnsafePickleError("refused _codecs.encode with anything but a str and latin-1")
    return text.encode("latin-1")


class _ArrayDictUnpickler(pickle.Unpickler):
    allowed = _ALLOWED
    what = "only numpy arrays in a dict are allowed"

    def __init__(self, stream: BinaryIO, size: int, encoding: str = "ASCII"):
        super().__init__(stream, encoding=encoding)
        self.size = size  # bytes of the pickle: no array it holds can be larger, nor all of them together
        self.claimed = 0  # bytes of the arrays made so far

    def find_class(self, module: str, name: str):
        module = _RENAMED_MODULES.get(module, module)
        if (module, name) not in self.allowed:
            raise UnsafePickleError(f"refused to unpickle global {module}.{name}: {self.what}")
        # the globals that allocate get a size check in front; ndarray itself is only a marker for _reconstruct
        if name == "_reconstruct":
            return self._reconstruct
        if name == "_frombuffer":
            return self._frombuffer
        if name == "ndarray":
            return _NDARRAY
        if name == "encode":
            return _latin1_encode
        return super().find_class(module, name)

    def _claim(self, shape, dtype, available: int) -> None:
        """Count an array about to be made against what the pickle carries, for it alone and for all together."""
        self.claimed += _check_request(shape, dtype, available)
        if self.claimed > self.size:
            raise UnsafePickleError(f"refused the arrays of the pickle: together {self.claimed} bytes, more than the "
                                    f"{self.size} bytes of the pickle (arrays sharing one buffer)")

    def _reconstruct(self, subtype, shape, dtype):
        if subtype is not _NDARRAY:
            raise UnsafePickleError("refused _reconstruct of anything but numpy.ndarray")
        self._claim(shape, dtype, self.size)
        return _CheckedArray(shape, dtype)

    def _frombuffer(self, buf, dtype, shape, order, axis_order=None):
        if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
            raise UnsafePickleError("refused _frombuffer of anything but bytes")
        self._claim(shape, dtype, memoryview(buf).nbytes)
        from numpy._core.numeric import _frombuffer

        return _frombuffer(buf, dtype, shape, order, axis_order)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refused to unpickle a persistent id: {self.what}")


class _PairsUnpickler(_ArrayDictUnpickler):
    """insightface's ``(bins, issame_list)``: also numpy's bool scalars (``np.bool_`` in ``issame_list``)."""

    allowed = _ALLOWED | {("numpy._core.multiarray", "scalar")}
    what = "only bytes, uint8 arrays and bools are allowed in a verification pickle"

    def find_class(self, module: str, name: str):
        if _RENAMED_MODULES.get(module, module) == "numpy._core.multiarray" and name == "scalar":
            return _bool_scalar
        return super().find_class(module, name)


def _bool_scalar(dtype, data=None):
    """``numpy._core.multiarray.scalar`` for a bool only (1 byte): numpy's own pickle of ``np.bool_``."""
    if not isinstance(dtype, np.dtype) or dtype != np.dtype(bool) or not isinstance(data, (bytes, str)) \
            or len(data) != 1:
        raise UnsafePickleError("refused a numpy scalar that is not a bool")
    return np.bool_(ord(data) != 0) if isinstance(data, str) else np.bool_(data[0] != 0)


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
        data = f.read(min(size, max_bytes) + 1)  # not max_bytes: read() allocates what it is asked for
    return _load(io.BytesIO(data), len(data))


def load_verification_pairs(path: str | os.PathLike, max_bytes: int = MAX_PAIRS_BYTES
                            ) -> tuple[list[bytes | np.ndarray], list[bool]]:
    """An insightface verification ``.bin``: its 2P encoded images (bytes, or uint8 arrays as ``cv2.imencode``
    returns them) and P same-identity flags. Anything else in the pickle raises UnsafePickleError; a file over
    ``max_bytes`` is refused unread; a truncated or broken one, or a length declared past its end, raises
    ``pickle.UnpicklingError`` before anything is allocated for it."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise UnsafePickleError(f"{size} bytes, over the {max_bytes} bytes limit of a verification pickle")
        data = f.read(min(size, max_bytes) + 1)  # not max_bytes: read() allocates what it is asked for
    try:  # every counted length is read against what remains (pickle's C unpickler allocates a length first)
        for _ in pickletools.genops(data):
            pass
    except (ValueError, EOFError) as exc:
        raise pickle.UnpicklingError(f"broken pickle: {str(exc).splitlines()[0][:200]}") from None
    value = _load(io.BytesIO(data), len(data), _PairsUnpickler, encoding="bytes", check=False)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(isinstance(v, (list, tuple, np.ndarray))
                                                                          for v in value):
        raise UnsafePickleError(f"expected (bins, issame_list), got {type(value).__name__}")
    bins, issame = value
    if isinstance(issame, np.ndarray):
        issame = issame.view(np.ndarray)
        if issame.dtype != bool or issame.ndim != 1:
            raise UnsafePickleError(f"issame_list is a {issame.dtype} array of shape {issame.shape}, not bools")
        issame = issame.tolist()
    flags = []
    for flag in issame:
        if type(flag) not in (bool, np.bool_):
            raise UnsafePickleError(f"issame_list holds a {type(flag).__name__}, not bools")
        flags.append(bool(flag))
    if isinstance(bins, np.ndarray) or len(bins) != 2 * len(flags):
        raise UnsafePickleError(f"{len(bins)} images for {len(flags)} pairs: expected two images per pair")
    _check_total((item for item in bins if isinstance(item, np.ndarray)), len(data))
    images = []
    for item in bins:
        if type(item) is _CheckedArray:
            item = item.view(np.ndarray)
        if isinstance(item, (bytes, bytearray)):
            images.append(bytes(item))
        elif type(item) is np.ndarray and item.dtype == np.uint8 and (item.ndim == 1 or (
                item.ndim == 2 and 1 in item.shape)):
            images.append(item)
        else:
            kind = f"{item.dtype} array of shape {item.shape}" if isinstance(item, np.ndarray) else type(item).__name__
            raise UnsafePickleError(f"bins holds a {kind}, not encoded image bytes")
    return images, flags


def _check_total(arrays, size: int) -> None:
    """The arrays' bytes, each counted every time it appears (its reader copies it every time), against the bytes of
    the pickle: arrays that share one buffer (a memo reference each) are refused here, before anyone copies them."""
    total = 0
    for array in arrays:
        total += array.nbytes
        if total > size:
            raise UnsafePickleError(f"refused the arrays of the pickle: together more than its {size} bytes (arrays "
                                    "sharing one buffer)")


def _load(stream: BinaryIO, size: int, unpickler=_ArrayDictUnpickler, encoding: str = "ASCII", check: bool = True):
    try:
        value = unpickler(stream, size, encoding=encoding).load()
    except UnsafePickleError:
        raise
    except MemoryError:  # e.g. an opcode declaring a 2**40-byte string: refused by pickle before it is read
        raise UnsafePickleError("the pickle declares more data than memory holds") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
            OverflowError) as exc:
        raise pickle.UnpicklingError(f"broken pickle: {type(exc).__name__}: {exc}") from None
    if not check:
        return value
    if not isinstance(value, dict):
        raise UnsafePickleError(f"expected a dict of numpy arrays, got {type(value).__name__}")
    _check_total((a for a in value.values() if isinstance(a, np.ndarray)), size)
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
