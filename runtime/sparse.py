"""``IndexedSlices``: a sparse gradient of some rows (axis 0) of a variable."""
import numpy as np


class IndexedSlices:
    """Rows ``values[j]`` of the gradient at row ``indices[j]`` of a ``dense_shape`` variable.
    Duplicate indices are summed (after clipping), as in Keras."""

    def __init__(self, values, indices, dense_shape=None):
        self.values = np.asarray(values)
        self.indices = np.asarray(indices)
        self.dense_shape = None if dense_shape is None else tuple(int(d) for d in dense_shape)

    def __repr__(self):
        return (f"IndexedSlices(values.shape={self.values.shape}, indices.shape={self.indices.shape}, "
                f"dense_shape={self.dense_shape})")
