"""IREE devices and device-resident buffers.

On the local CPU drivers every buffer ireeopt owns is allocated host-visible and
mappable, and mapped once: the mapping is persistent, so writing a gradient or
reading a parameter is a plain memcpy into/out of the buffer the compiled step
updates in place (no per-step allocation, no staging).
"""
import atexit
import threading

import numpy as np

import iree.runtime as rt

#: ireeopt device name -> (IREE driver, compile target)
DEVICES = {
    "cpu": ("local-sync", "llvm-cpu"),
    "local-sync": ("local-sync", "llvm-cpu"),
    "local-task": ("local-task", "llvm-cpu"),
}

_ELEMENT_TYPES = {
    "float32": rt.HalElementType.FLOAT_32,
    "float16": rt.HalElementType.FLOAT_16,
    "bfloat16": rt.HalElementType.BFLOAT_16,
    "float64": rt.HalElementType.FLOAT_64,
    "int32": rt.HalElementType.SINT_32,
    "int64": rt.HalElementType.SINT_64,
}


def numpy_dtype(name):
    """The numpy dtype for a dtype name; bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as e:  # pragma: no cover - ml_dtypes ships with jax
            raise TypeError("bfloat16 variables need the ml_dtypes package") from e
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_name(dtype):
    """Canonical name of a numpy dtype ("float32", "bfloat16", ...)."""
    return np.dtype(dtype).name


class Device:
    """One IREE device plus the VM instance and HAL module that run modules on it."""

    _lock = threading.Lock()
    _instances = {}

    def __init__(self, driver, target):
        self.driver = driver
        self.target = target
        self.hal_device = rt.get_device(driver)
        self.vm_instance = rt.VmInstance()
        self.hal_module = rt.create_hal_module(self.vm_instance, self.hal_device)

    @classmethod
    def get(cls, name):
        """The shared ``Device`` for an ireeopt device name such as ``"cpu"``."""
        if not isinstance(name, str) or name not in DEVICES:
            raise ValueError(f"unknown device {name!r}; available: {sorted(DEVICES)}")
        driver, target = DEVICES[name]
        with cls._lock:
            if driver not in cls._instances:
                cls._instances[driver] = cls(driver, target)
            return cls._instances[driver]

    def allocate(self, shape, dtype):
        """A new mappable device buffer for an array of ``shape``/``dtype``, mapped once."""
        return DeviceBuffer(self, tuple(shape), dtype_name(dtype))

    def __repr__(self):
        return f"Device({self.driver!r}, target={self.target!r})"


class DeviceBuffer:
    """A device buffer with its buffer view and a persistent host mapping ``host``."""

    def __init__(self, device, shape, dtype):
        self.device, self.shape, self.dtype = device, shape, dtype
        np_dtype = numpy_dtype(dtype)
        nbytes = max(int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize, 1)
        allocator = device.hal_device.allocator
        self.buffer = allocator.allocate_buffer(
            memory_type=rt.MemoryType.DEVICE_LOCAL | rt.MemoryType.HOST_VISIBLE,
            allowed_usage=rt.BufferUsage.DEFAULT | rt.BufferUsage.MAPPING,
            allocation_size=nbytes)
        self.view = rt.HalBufferView(self.buffer, list(shape), _ELEMENT_TYPES[dtype])
        self._mapping = self.buffer.map()
        flat = self._mapping.asarray((nbytes,), np.dtype(np.uint8))
        count = int(np.prod(shape, dtype=np.int64))
        self.host = flat[:count * np_dtype.itemsize].view(np_dtype).reshape(shape)

    def write(self, array):
        np.copyto(self.host, array, casting="unsafe")

    def read(self):
        return self.host.copy()



@atexit.register
def _release():
    Device._instances.clear()
