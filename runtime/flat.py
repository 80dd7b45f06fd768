"""Flat storage for CPU devices: the variables of one group share one buffer.

On IREE's local (CPU) drivers ireeopt owns the memory: one 64-byte-aligned numpy arena
per group and kind of state, imported into IREE twice without a copy: whole (the
*group* buffer, which a flat step updates with one dispatch) and per member (a slice,
for steps that update some variables only or clip each one by its own norm).  The
Python bindings expose no sub-range view of an IREE buffer; importing the slices of
memory we own gives the same thing.  Each member starts on a 64-byte boundary (IREE's
dispatches assume 64-byte aligned bindings) and the padding between members stays
zero, which every update leaves at zero (Adam, Adamax, weight decay, EMA; it adds
nothing to a norm).
"""
import numpy as np

import iree.runtime as rt

from .device import _ELEMENT_TYPES, numpy_dtype

ALIGN = 64
DRIVERS = ("local-sync", "local-task")


class ImportedBuffer:
    """The DeviceBuffer interface (``host``, ``view``, ``buffer``, ``write``, ``read``) over
    ``host``, a numpy array of ours imported into the device without a copy."""

    def __init__(self, device, host, dtype):
        self.device, self.host, self.dtype = device, host, dtype
        self.shape, self.np_dtype = tuple(host.shape), host.dtype
        self.buffer = device.hal_device.allocator.import_host_allocation(
            host, memory_type=rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE,
            allowed_usage=rt.BufferUsage.DEFAULT)
        self.view = rt.HalBufferView(self.buffer, list(self.shape), _ELEMENT_TYPES[dtype])

    def write(self, array):
        np.copyto(self.host, array, casting="unsafe")

    def read(self):
        return self.host.copy()


def _aligned_zeros(nbytes):
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes]


def layout(shapes, dtype):
    """Element offsets of members of ``shapes`` and the total, each member on a 64-byte
    boundary for elements of ``dtype`` and of any wider dtype (so that a group's float32
    slots share its bfloat16 parameters' layout)."""
    step = max(1, ALIGN // numpy_dtype(dtype).itemsize)
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(total)
        size = int(np.prod(shape, dtype=np.int64))
        total += -(-max(size, 1) // step) * step
    return offsets, total


def arena(device, shapes, dtype, layout_dtype=None):
    """(group buffer, [member buffers]) for members of ``shapes`` and ``dtype``, zero-filled,
    laid out as for ``layout_dtype`` (default ``dtype``)."""
    np_dtype = numpy_dtype(dtype)
    offsets, total = layout(shapes, layout_dtype or dtype)
    flat = _aligned_zeros(total * np_dtype.itemsize).view(np_dtype)
    members = [ImportedBuffer(device, flat[o:o + int(np.prod(s, dtype=np.int64))].reshape(s), dtype)
               for o, s in zip(offsets, shapes)]
    return ImportedBuffer(device, flat, dtype), members
