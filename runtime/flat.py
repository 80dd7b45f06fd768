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
import ctypes
import mmap
import os

import numpy as np

import iree.runtime as rt

from ..kernels.step import GRAD_SLACK
from .device import _ELEMENT_TYPES, numpy_dtype

ALIGN = 64
DRIVERS = ("local-sync", "local-task")
PAGE = mmap.PAGESIZE
#: a caller's gradient this large (bytes) is passed in place rather than copied (an import
#: costs ~14 us; a copy of 256 KiB ~20-60 us here, and 11 ms at 64 MiB)
IN_PLACE_MIN_BYTES = 1 << 18


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


def arena(device, shapes, dtype, layout_dtype=None, slack=0):
    """(group buffer, [member buffers]) for members of ``shapes`` and ``dtype``, zero-filled,
    laid out as for ``layout_dtype`` (default ``dtype``).  With ``slack``, the arena has that
    many more (zero) elements at its end, and the group buffer is a pair (without them, with
    them)."""
    np_dtype = numpy_dtype(dtype)
    offsets, total = layout(shapes, layout_dtype or dtype)
    flat = _aligned_zeros((total + slack) * np_dtype.itemsize).view(np_dtype)
    members = [ImportedBuffer(device, flat[o:o + int(np.prod(s, dtype=np.int64))].reshape(s), dtype)
               for o, s in zip(offsets, shapes)]
    group = ImportedBuffer(device, flat[:total], dtype)
    return (group, ImportedBuffer(device, flat, dtype)) if slack else group, members


#: gradient copies of at least this many bytes in one step are split over the cores
PARALLEL_MIN_BYTES = 1 << 22
_pool = []
_CORES = os.cpu_count() or 1


def _copy_part(part):
    for dst, src in part:
        np.copyto(dst, src, casting="unsafe")


def copy_in(pairs):
    """``buffer.write(array)`` for each ``(buffer, array)``; the host-mapped buffers'
    copies go through ``copy_to_hosts``."""
    hosts = []
    for buffer, array in pairs:
        if buffer.host is None:
            buffer.write(array)
        else:
            hosts.append((buffer.host, array))
    copy_to_hosts(hosts, sum(h.nbytes for h, _ in hosts))


def copy_to_hosts(pairs, nbytes):
    """``np.copyto(host, array)`` (casting) for each ``(host array, array)``, the hosts adding
    up to ``nbytes``: from PARALLEL_MIN_BYTES on, split into one contiguous share per core,
    copied concurrently (numpy releases the GIL while copying)."""
    if nbytes < PARALLEL_MIN_BYTES or _CORES < 2:
        _copy_part(pairs)
        return
    flat_pairs = []
    for dst, src in pairs:
        if _splittable(dst, src):
            flat_pairs.append((dst.reshape(-1), src.reshape(-1)))
        else:
            np.copyto(dst, src, casting="unsafe")
    total = sum(d.nbytes for d, _ in flat_pairs)
    share, parts, part, filled = -(-total // _CORES), [], [], 0
    for dst, src in flat_pairs:
        start = 0
        while start < dst.size:
            take = min(dst.size - start, max(1, (share - filled) // dst.itemsize))
            part.append((dst[start:start + take], src[start:start + take]))
            start, filled = start + take, filled + take * dst.itemsize
            if filled >= share:
                parts.append(part)
                part, filled = [], 0
    if part:
        parts.append(part)
    if not parts:
        return
    if not _pool:
        from concurrent.futures import ThreadPoolExecutor
        _pool.append(ThreadPoolExecutor(_CORES - 1, thread_name_prefix="ireeopt-copy"))
    futures = [_pool[0].submit(_copy_part, p) for p in parts[1:]]
    _copy_part(parts[0])
    for f in futures:
        f.result()


def _splittable(dst, src):
    return type(src) is np.ndarray and src.flags.c_contiguous and src.shape == dst.shape and dst.flags.c_contiguous


def on_device(buffer, device):
    """``buffer`` (an ``ImportedBuffer``, or a mapped ``DeviceBuffer`` of another local
    driver) imported into ``device`` too: the same host memory, no copy."""
    if buffer.device is device:
        return buffer
    return ImportedBuffer(device, buffer.host, buffer.dtype)


def host_buffer(device, shape, dtype):
    """A zero-filled ``ImportedBuffer`` of our own memory on ``device``."""
    np_dtype = numpy_dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    return ImportedBuffer(device, _aligned_zeros(max(size, 1) * np_dtype.itemsize).view(np_dtype)[:size]
                          .reshape(shape), dtype)


class InPlaceGradient:
    """A caller's float32 gradient imported into the device where it lies: the flat
    ``length + GRAD_SLACK`` elements from the 64-byte boundary at or before its first
    element (``start`` elements before it), as a grad-view step reads it (kernels/step.py).
    Built only where that whole range lies in the memory pages the array (or the array it
    is a view of) occupies, so nothing outside mapped memory is read; the elements past the
    array are masked off by the step.  Keeps ``array`` alive while the import exists."""

    def __init__(self, device, array, length):
        self.array = array
        self.start = self.start_of(array)
        base = array.ctypes.data - 4 * self.start
        nbytes = (length + GRAD_SLACK) * 4
        region = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(base))
        self.buffer = device.hal_device.allocator.import_host_allocation(
            region, memory_type=rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE,
            allowed_usage=rt.BufferUsage.DEFAULT)
        self.view = rt.HalBufferView(self.buffer, [length + GRAD_SLACK], _ELEMENT_TYPES["float32"])
        self.region = region

    @staticmethod
    def start_of(array):
        """Elements from the 64-byte boundary at or before ``array``'s first element to it."""
        return array.ctypes.data % ALIGN // 4

    @classmethod
    def view(cls, array, length):
        """The step's view ``(start, count)`` of ``array`` passed in place as the gradient of a
        ``length``-element group, or None where it cannot be (see ``possible``)."""
        return (cls.start_of(array), array.size) if cls.possible(array, length) else None

    @staticmethod
    def possible(array, length):
        """Whether ``array`` (the gradient of a ``length``-element group) can be imported."""
        if type(array) is not np.ndarray or array.dtype != np.float32 or not array.flags.c_contiguous \
                or array.nbytes < IN_PLACE_MIN_BYTES or not array.flags.aligned:
            return False
        address = array.ctypes.data
        end = address - address % ALIGN + (length + GRAD_SLACK) * 4
        last = address + array.nbytes          # the memory known to be mapped ends here, or
        root = array.base                      # at the end of the array it is a view of
        while isinstance(root, np.ndarray) and root.base is not None:
            root = root.base
        if isinstance(root, np.ndarray) and root.flags.c_contiguous:
            last = max(last, root.ctypes.data + root.nbytes)
        return (end - 1) // PAGE <= (last - 1) // PAGE
