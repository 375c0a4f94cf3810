"""A restricted unpickler for pickles that must hold only ``dict[str, numpy.ndarray]``.

SFHQ ships one pickle per image (``pretrained_features/<name>.pickle``: model name -> (1, D) feature array). Those
files come from the internet, and a plain ``pickle.load`` runs whatever callable a pickle names. This module lets
through only the few numpy globals needed to rebuild arrays and dtypes; any other global (``os.system``,
``builtins.eval``, ``subprocess.Popen`` …) is refused *before* it is imported or called, with
:class:`UnsafePickleError`. After loading, the result is checked to be a dict of plain numeric arrays.

Usage::

    from facegen.generators.safe_pickle import load_array_dict
    features = load_array_dict("SFHQ_pt1_00000185.pickle")   # {'CLIP_ViTL_14@336': array (1, 768), …}
"""

from __future__ import annotations

import io
import os
import pickle
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


class UnsafePickleError(ValueError):
    """The pickle names something other than numpy arrays, or does not hold a dict of numeric arrays."""


class _ArrayDictUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        module = _RENAMED_MODULES.get(module, module)
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"refused to unpickle global {module}.{name}: only numpy arrays in a dict are allowed"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafePickleError("refused to unpickle a persistent id: only numpy arrays in a dict are allowed")


def loads_array_dict(data: bytes) -> dict[str, np.ndarray]:
    """Unpickle bytes that must hold ``dict[str, ndarray]`` (numeric arrays); anything else raises UnsafePickleError."""
    return _load(io.BytesIO(data))


def load_array_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Unpickle a file that must hold ``dict[str, ndarray]`` (numeric arrays); anything else raises UnsafePickleError.

    A truncated or otherwise broken file raises ``pickle.UnpicklingError``/``EOFError``/``ValueError`` as usual.
    """
    with open(path, "rb") as f:
        return _load(f)


def _load(stream: BinaryIO) -> dict[str, np.ndarray]:
    try:
        value = _ArrayDictUnpickler(stream).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
        raise pickle.UnpicklingError(f"broken pickle: {type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise UnsafePickleError(f"expected a dict of numpy arrays, got {type(value).__name__}")
    for key, array in value.items():
        if not isinstance(key, str):
            raise UnsafePickleError(f"expected string keys, got {type(key).__name__} {key!r}")
        if type(array) is not np.ndarray:
            raise UnsafePickleError(f"value of {key!r} is {type(array).__name__}, expected a numpy array")
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise UnsafePickleError(f"value of {key!r} has dtype {array.dtype}, expected a numeric array")
    return value
