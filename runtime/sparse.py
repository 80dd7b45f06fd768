"""``IndexedSlices`` and their host-side preparation for the compiled step.

Everything here runs on the host before any device work: indices are checked to be
integers in ``[0, rows)`` (IREE does not drop out-of-bounds scatter indices, it writes
them and corrupts memory), duplicates are located with ``np.unique``, and the
arrays are padded to a power-of-two bucket so that a long run compiles only a few
modules (one per bucket: 8, 16, 32, ... rows).
"""
import numpy as np

MIN_BUCKET = 8


class IndexedSlices:
    """Rows ``values[j]`` of the gradient at row ``indices[j]`` of a ``dense_shape`` variable.
    Duplicate indices are summed (after clipping), as in Keras."""

    def __init__(self, values, indices, dense_shape=None):
        self.values = values
        self.indices = indices
        self.dense_shape = None if dense_shape is None else tuple(int(d) for d in dense_shape)

    def __repr__(self):
        return (f"IndexedSlices(values.shape={np.shape(self.values)}, indices.shape={np.shape(self.indices)}, "
                f"dense_shape={self.dense_shape})")


def bucket(k):
    """The padded row count for ``k`` gradient rows: the next power of two, at least 8."""
    return max(MIN_BUCKET, 1 << max(0, int(k) - 1).bit_length())


class SparseGradient:
    """A validated, deduplicated and padded sparse gradient, ready for the step's buffers."""

    def __init__(self, values, segments, indices, count):
        self.values, self.segments, self.indices, self.count = values, segments, indices, count
        self.bucket = len(segments)

    def arrays(self):
        return {"values": self.values, "segments": self.segments, "indices": self.indices,
                "count": np.int32(self.count)}


def prepare(grad, var):
    """Check ``grad`` (an IndexedSlices) against ``var`` and return a ``SparseGradient``."""
    name = var.name
    if not var.shape:
        raise ValueError(f"sparse gradient for {name!r}: the variable is a scalar; rows need rank >= 1")
    indices = np.asarray(grad.indices)
    values = np.asarray(grad.values)
    if indices.dtype.kind not in "iu":
        raise TypeError(f"sparse gradient for {name!r}: indices must be integers, got dtype {indices.dtype}")
    if indices.ndim != 1:
        raise ValueError(f"sparse gradient for {name!r}: indices must be 1-D, got shape {indices.shape}")
    if values.dtype.kind not in "fiu":
        raise TypeError(f"sparse gradient for {name!r}: values must be real numbers, got dtype {values.dtype}")
    if grad.dense_shape is not None and tuple(grad.dense_shape) != tuple(var.shape):
        raise ValueError(f"sparse gradient for {name!r}: dense_shape {grad.dense_shape} does not match the "
                         f"variable's shape {var.shape}")
    k, rows = len(indices), var.shape[0]
    if values.shape != (k,) + tuple(var.shape[1:]):
        if values.ndim == 0 or values.shape[0] != k:
            raise ValueError(f"sparse gradient for {name!r}: {values.shape[0] if values.ndim else 0} value rows "
                             f"but {k} indices")
        raise ValueError(f"sparse gradient for {name!r}: value rows have shape {values.shape[1:]}, the "
                         f"variable's rows have shape {tuple(var.shape[1:])}")
    if k:
        low, high = indices.min(), indices.max()
        if low < 0 or high >= rows:
            bad = low if low < 0 else high
            raise IndexError(f"sparse gradient for {name!r}: index {bad} is out of range for a variable with "
                             f"{rows} rows")
    unique, segments = np.unique(indices, return_inverse=True)
    size = bucket(k)
    padded_values = np.zeros((size,) + tuple(var.shape[1:]), values.dtype)
    padded_values[:k] = values
    padded_segments = np.zeros(size, np.int32)
    padded_segments[:k] = segments.reshape(-1)
    padded_indices = np.full(size, unique[0] if k else 0, np.int32)
    padded_indices[:len(unique)] = unique
    return SparseGradient(padded_values, padded_segments, padded_indices, len(unique))
