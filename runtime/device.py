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

#: ireeopt device name -> (IREE driver, compile target); "name:N" picks the N-th device
DEVICES = {
    "cpu": ("local-sync", "llvm-cpu"),
    "local-sync": ("local-sync", "llvm-cpu"),
    "local-task": ("local-task", "llvm-cpu"),
    "vulkan": ("vulkan", "vulkan-spirv"),
    "cuda": ("cuda", "cuda"),
}
#: drivers whose device-local memory is also host-visible and cheap to map (CPU memory;
#: lavapipe).  On CUDA host-visible device memory is managed memory: buffers there are
#: device-local and go through a persistent host staging buffer instead.
_MAPPABLE = ("local-sync", "local-task", "vulkan")


def parse_device(name):
    """``"cuda:1"`` -> ("cuda", 1); ``"cpu"`` -> ("cpu", None)."""
    if not isinstance(name, str):
        raise ValueError(f"device must be a string such as 'cpu' or 'vulkan', got {name!r}")
    base, _, index = name.partition(":")
    if base not in DEVICES or (index and not index.isdigit()):
        raise ValueError(f"unknown device {name!r}; available: {sorted(DEVICES)} (optionally ':N', e.g. 'cuda:1')")
    return base, int(index) if index else None


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


def is_real(dtype, integers=True):
    """A real number dtype: float (bfloat16 included) or, with ``integers``, int/uint/bool."""
    dtype = np.dtype(dtype)
    return dtype.kind in ("fiub" if integers else "f") or dtype.name in ("bfloat16",)


def dtype_name(dtype):
    """Canonical name of a numpy dtype ("float32", "bfloat16", ...)."""
    return np.dtype(dtype).name


class Device:
    """One IREE device plus the VM instance and HAL module that run modules on it."""

    _lock = threading.Lock()
    _instances = {}

    def __init__(self, driver, target, index=None):
        self.driver, self.target, self.index = driver, target, index
        try:
            if index is None:
                self.hal_device = rt.get_device(driver)
            else:
                found = rt.get_driver(driver).query_available_devices()
                if index >= len(found):
                    raise ValueError(f"device {driver}:{index} does not exist; {driver} has {len(found)} device(s)")
                self.hal_device = rt.get_driver(driver).create_device(found[index]["device_id"])
        except ValueError:
            raise
        except Exception as e:
            raise RuntimeError(f"IREE could not open a {driver!r} device: {e}") from e
        self.mappable = driver in _MAPPABLE
        self.vm_instance = rt.VmInstance()
        self.hal_module = rt.create_hal_module(self.vm_instance, self.hal_device)
        self._semaphore = self.hal_device.create_semaphore(0)
        self._timeline = 0              # value signalled by the last queued copy
        self._copy_lock = threading.Lock()

    @classmethod
    def get(cls, name):
        """The shared ``Device`` for an ireeopt device name such as ``"cpu"`` or ``"cuda:1"``."""
        base, index = parse_device(name)
        driver, target = DEVICES[base]
        with cls._lock:
            if (driver, index) not in cls._instances:
                cls._instances[(driver, index)] = cls(driver, target, index)
            return cls._instances[(driver, index)]

    @property
    def key(self):
        return (self.driver, self.index)

    def allocate(self, shape, dtype):
        """A new device buffer for an array of ``shape``/``dtype``."""
        return DeviceBuffer(self, tuple(shape), dtype_name(dtype))

    def copy(self, source, target):
        """Queue a buffer-to-buffer copy after every copy queued before it; returns the
        timeline value that signals its completion (see ``wait``)."""
        with self._copy_lock:
            self._timeline += 1
            wait = rt.HalFence.create_at(self._semaphore, self._timeline - 1)
            signal = rt.HalFence.create_at(self._semaphore, self._timeline)
            self.hal_device.queue_copy(source, target, wait_semaphores=wait, signal_semaphores=signal)
            return self._timeline

    def wait(self, value=None):
        """Block until the copy that signals ``value`` (default: the last one queued) is done."""
        value = self._timeline if value is None else value
        if value:
            rt.HalFence.create_at(self._semaphore, value).wait()

    def __repr__(self):
        suffix = "" if self.index is None else f":{self.index}"
        return f"Device({self.driver}{suffix!r}, target={self.target!r})"


class DeviceBuffer:
    """A device buffer with its buffer view.

    On mappable devices the buffer is host-visible and mapped once: ``host`` is a
    persistent numpy view of it.  Elsewhere the buffer is device-local and ``write``/
    ``read`` go through a persistent host staging buffer and a queued copy.
    """

    def __init__(self, device, shape, dtype):
        self.device, self.shape, self.dtype = device, shape, dtype
        self.np_dtype = numpy_dtype(dtype)
        self.nbytes = max(int(np.prod(shape, dtype=np.int64)) * self.np_dtype.itemsize, 1)
        allocator = device.hal_device.allocator
        self.host = None
        if device.mappable:
            self.buffer = allocator.allocate_buffer(
                memory_type=rt.MemoryType.DEVICE_LOCAL | rt.MemoryType.HOST_VISIBLE,
                allowed_usage=rt.BufferUsage.DEFAULT | rt.BufferUsage.MAPPING,
                allocation_size=self.nbytes)
            self.host = self._map(self.buffer)
        else:
            self.buffer = allocator.allocate_buffer(memory_type=rt.MemoryType.DEVICE_LOCAL,
                                                    allowed_usage=rt.BufferUsage.DEFAULT,
                                                    allocation_size=self.nbytes)
            self._staging = allocator.allocate_buffer(
                memory_type=rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE,
                allowed_usage=rt.BufferUsage.TRANSFER | rt.BufferUsage.MAPPING,
                allocation_size=self.nbytes)
            self._staged = self._map(self._staging)
            self._pending = 0           # timeline value of the last copy through the staging buffer
        self.view = rt.HalBufferView(self.buffer, list(shape), _ELEMENT_TYPES[dtype])

    def _map(self, buffer):
        self._mapping = buffer.map()
        flat = self._mapping.asarray((self.nbytes,), np.dtype(np.uint8))
        count = int(np.prod(self.shape, dtype=np.int64))
        return flat[:count * self.np_dtype.itemsize].view(self.np_dtype).reshape(self.shape)

    def write(self, array):
        """Mapped: a memcpy.  Staged: fill the staging buffer and *queue* its copy to the device
        (``Device.wait`` before the device reads it; the step does that once for all its inputs)."""
        if self.host is not None:
            self.host[...] = array
        else:
            self.device.wait(self._pending)          # the staging buffer's previous copy is done
            self._staged[...] = array
            self._pending = self.device.copy(self._staging, self.buffer)

    def read(self):
        if self.host is not None:
            return self.host.copy()
        self._pending = self.device.copy(self.buffer, self._staging)
        self.device.wait(self._pending)
        return self._staged.copy()


@atexit.register
def _release():
    Device._instances.clear()
