"""``IndexedSlices`` and their host-side preparation for the compiled step.

Everything here runs on the host before any device work: indices are checked to be
integers in ``[0, rows)`` (IREE does not drop out-of-bounds scatter indices, it writes
them and corrupts memory).  Then, in spec §1 order, ``clipvalue`` is applied to the raw
values, the squared norm of the raw values is taken (for the norm clippings, which the
step applies), duplicates are summed (each row's duplicates in order of occurrence), and the rows are padded to a power-of-two bucket
so that a long run compiles only a few modules (8, 16, 32, ... rows).
"""
import numpy as np

from .device import is_real

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

    def __init__(self, rows, indices, count, sumsq):
        self.rows, self.indices, self.count, self.sumsq = rows, indices, count, sumsq
        self.bucket = len(indices)

    def arrays(self):
        return {"rows": self.rows, "indices": self.indices, "count": np.int32(self.count),
                "sumsq": np.float32(self.sumsq)}


def check(grad, var):
    """Validate ``grad`` (an IndexedSlices) against ``var``; returns (values, indices) with
    the values in the variable's dtype (a gradient has its variable's dtype, as in Keras)."""
    name = var.name
    if not var.shape:
        raise ValueError(f"sparse gradient for {name!r}: the variable is a scalar; rows need rank >= 1")
    indices = np.asarray(grad.indices)
    values = np.asarray(grad.values)
    if indices.dtype.kind not in "iu":
        raise TypeError(f"sparse gradient for {name!r}: indices must be integers, got dtype {indices.dtype}")
    if indices.ndim != 1:
        raise ValueError(f"sparse gradient for {name!r}: indices must be 1-D, got shape {indices.shape}")
    if not is_real(values.dtype):
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
    return values.astype(var.numpy_dtype, copy=False), indices


def reduce(values, indices, clip_mode, clip, bucket_of=bucket):
    """Clip (clipvalue), measure (sum of squares), sum duplicates and pad: a ``SparseGradient``."""
    values = values.astype(np.float32)
    if clip_mode == "clipvalue":
        values = np.clip(values, np.float32(-clip), np.float32(clip))
    sumsq = 0.0
    if clip_mode in ("clipnorm", "global_clipnorm"):
        flat = values.reshape(-1).astype(np.float64)
        sumsq = float(flat @ flat)
    k = len(indices)
    unique, inverse = np.unique(indices, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")       # stable: each row's duplicates in occurrence order
    ordered = values[order]
    if len(unique) == k:
        rows = ordered
    else:
        segment = inverse[order]
        first = np.r_[True, segment[1:] != segment[:-1]]
        rows = ordered[first]
        # rank of each value among its row's duplicates; pass r adds every r-th duplicate
        # (targets are unique within a pass, so plain fancy-index addition is exact)
        starts = np.flatnonzero(first)
        rank = np.arange(k) - np.repeat(starts, np.diff(np.r_[starts, k]))
        for r in range(1, int(rank.max()) + 1):
            at = rank == r
            rows[segment[at]] += ordered[at]
    size = bucket_of(k)
    padded_rows = np.empty((size,) + values.shape[1:], np.float32)
    padded_rows[:len(unique)] = rows
    padded_rows[len(unique):] = rows[0] if k else 0
    padded_indices = np.full(size, unique[0] if k else 0, np.int32)
    padded_indices[:len(unique)] = unique
    return SparseGradient(padded_rows, padded_indices, len(unique), sumsq)
