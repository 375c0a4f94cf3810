"""The one vector normalisation (facegen.generators.embeddings.normalize): a zero vector stays zero."""

import numpy as np

from facegen.generators.embeddings import normalize


def test_unit_rows_in_the_asked_precision_and_zero_rows_stay_zero():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    x[2] = 0
    unit = normalize(x)
    assert unit.dtype == np.float32 and np.all(np.isfinite(unit))
    np.testing.assert_allclose(np.linalg.norm(unit[[0, 1, 3]], axis=1), 1.0, rtol=1e-6)
    assert np.all(unit[2] == 0)
    # exactly x / ||x|| for the others: the transform's float64 prototypes depend on those bits
    wide = normalize(x, dtype=np.float64)
    assert wide.dtype == np.float64
    rows = x[[0, 1, 3]].astype(np.float64)
    assert wide[[0, 1, 3]].tobytes() == (rows / np.linalg.norm(rows, axis=1, keepdims=True)).tobytes()
    # one vector, and along another axis
    assert np.all(normalize(np.zeros(3)) == 0)
    np.testing.assert_allclose(np.linalg.norm(normalize(x[[0, 1]].T, axis=0), axis=0), 1.0, rtol=1e-6)
