"""``ireeopt.Variable``: a parameter that lives in an IREE device buffer."""
import numpy as np

from ..kernels.step import SUPPORTED_DTYPES
from .device import Device, dtype_name, is_real, numpy_dtype


class Variable:
    """A named, device-resident array updated in place by the compiled optimizer step.

    ``Variable(initial_value, name=None, dtype=None, device="cpu")``; ``dtype`` defaults
    to the initial value's dtype (float32 for Python numbers and lists).
    """

    def __init__(self, initial_value, name=None, dtype=None, device="cpu"):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Variable name must be a string, got {type(name).__name__}")
        self._device = Device.get(device)
        self.device = device
        value = np.asarray(initial_value)
        if not is_real(value.dtype):
            raise TypeError(f"Variable {name!r}: initial value must be numeric, got dtype {value.dtype}")
        if dtype is None:   # numpy values keep their dtype; Python numbers and lists are float32
            dtype = value.dtype if isinstance(initial_value, (np.ndarray, np.generic)) else "float32"
        self.dtype = dtype_name(numpy_dtype(dtype) if isinstance(dtype, str) else dtype)
        if self.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"Variable {name!r}: unsupported dtype {self.dtype}; supported: "
                            f"{', '.join(SUPPORTED_DTYPES)} (pass dtype= to convert)")
        self.name = "variable" if name is None else name
        self.shape = tuple(value.shape)
        self._buffer = self._device.allocate(self.shape, self.dtype)
        self._buffer.write(value)

    @classmethod
    def _over(cls, buffer, name, device):
        """A Variable whose storage is ``buffer`` (optimizer slots in flat storage)."""
        var = cls.__new__(cls)
        var._device, var.device, var.name = buffer.device, device, name
        var.dtype, var.shape, var._buffer = buffer.dtype, tuple(buffer.shape), buffer
        return var

    def numpy(self):
        """A host copy of the current value."""
        return self._buffer.read()

    def __array__(self, dtype=None, copy=None):
        value = self.numpy()
        return value if dtype is None else value.astype(dtype)

    def assign(self, value):
        """Overwrite the value (shape must match; the value is cast to ``dtype``)."""
        value = np.asarray(value)
        if value.shape != self.shape:
            raise ValueError(f"Variable {self.name!r}: cannot assign a value of shape {value.shape} "
                             f"to a variable of shape {self.shape}")
        if not is_real(value.dtype):
            raise TypeError(f"Variable {self.name!r}: cannot assign a value of dtype {value.dtype}")
        self._buffer.write(value)
        return self

    @property
    def numpy_dtype(self):
        return numpy_dtype(self.dtype)

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    def __repr__(self):
        return f"<ireeopt.Variable {self.name!r} shape={self.shape} dtype={self.dtype} device={self.device!r}>"
