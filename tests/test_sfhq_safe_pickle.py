"""The restricted unpickler for SFHQ feature pickles: numpy arrays in a dict come out, nothing else runs."""

import pickle

import numpy as np
import pytest

from facegen.generators.safe_pickle import UnsafePickleError, load_array_dict, loads_array_dict
from facegen.testing.sfhq import malicious_pickle_bytes


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_arrays_round_trip_in_every_protocol(protocol):
    features = {
        "CLIP_ViTL_14@336": np.arange(768, dtype=np.float16).reshape(1, 768),
        "ConvNext_XL_Imagenet21k": np.linspace(-1, 1, 2048, dtype=np.float32).reshape(1, 2048),
        "counts": np.array([[1, 2, 3]], dtype=np.int64),
    }
    loaded = loads_array_dict(pickle.dumps(features, protocol=protocol))
    assert list(loaded) == list(features)
    for name, array in features.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)


def test_pickles_written_by_numpy_1_name_numpy_core():
    # numpy 1.x wrote "numpy.core.multiarray _reconstruct"; numpy 2 renamed the module to numpy._core
    data = pickle.dumps({"f": np.ones((1, 4), np.float32)}, protocol=2)
    assert b"numpy._core.multiarray" in data
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    np.testing.assert_array_equal(loads_array_dict(old)["f"], np.ones((1, 4), np.float32))


def test_malicious_reduce_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    data = malicious_pickle_bytes(f"touch {marker}")
    path = tmp_path / "evil.pickle"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"refused to unpickle global (posix|os|nt)\.system"):
        load_array_dict(path)
    assert not marker.exists()
    # the fixture really is dangerous: a naive pickle.load runs the command
    pickle.loads(data)
    assert marker.exists()


@pytest.mark.parametrize("payload, message", [
    (b"cbuiltins\neval\n(S'1+1'\ntR.", "builtins.eval"),
    (b"csubprocess\nPopen\n(S'true'\ntR.", "subprocess.Popen"),
    (pickle.dumps([np.ones(3)], protocol=4), "expected a dict of numpy arrays, got list"),
    (pickle.dumps({1: np.ones(3)}, protocol=4), "expected string keys"),
    (pickle.dumps({"a": "text"}, protocol=4), "value of 'a' is str"),
    (pickle.dumps({"a": np.array([None, 1], dtype=object)}, protocol=4), "dtype object"),
])
def test_anything_but_numeric_arrays_in_a_dict_is_refused(payload, message):
    with pytest.raises(UnsafePickleError, match=message):
        loads_array_dict(payload)


def test_a_scalar_subclass_global_is_refused():
    # numpy scalars pickle through numpy._core.multiarray.scalar, which we do not let through
    with pytest.raises(UnsafePickleError, match="scalar"):
        loads_array_dict(pickle.dumps({"a": np.float32(1.5)}, protocol=4))


def test_truncated_pickle_is_a_broken_pickle_not_a_crash():
    data = pickle.dumps({"a": np.ones((1, 512), np.float32)}, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="broken pickle"):
        loads_array_dict(data[: len(data) // 2])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_arrays_sharing_one_buffer_are_refused_before_any_copy(tmp_path, protocol):
    """4 MB that 700 arrays share (memo references: protocols 2-4 through _reconstruct's state, 5 through one
    _frombuffer array): 2.9 GB once a reader copies each array. All the arrays together may not reference more
    bytes than the pickle holds (issue 18: the build peaked at 3.06 GB and exited 0)."""
    from facegen.testing.hostile import shared_buffer_pickle_bytes

    path = tmp_path / "shared.pickle"
    path.write_bytes(shared_buffer_pickle_bytes(protocol=protocol))
    assert path.stat().st_size < 7 << 20  # under the features cap (16 MB)
    with pytest.raises(UnsafePickleError, match="together more than its .* bytes .arrays sharing one buffer"):
        load_array_dict(path)
    path.write_bytes(shared_buffer_pickle_bytes(arrays=1, protocol=protocol))
    assert load_array_dict(path)["model_0"].nbytes == 4 << 20  # one array over its own buffer is what SFHQ writes
