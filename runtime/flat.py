"""Flat storage for CPU devices: the variables of one group share one buffer.

On IREE's local (CPU) drivers ireeopt owns the memory: one 64-byte-aligned numpy arena
per group and kind of state, imported into IREE twice without a copy: whole (the
*group* buffer, which a flat step updates with one dispatch) and per member (a slice,
for steps that update some variables only or clip each one by its own norm).  The
Python bindings expose no sub-range view of an IREE buffer; importing the slices of
memory we own gives the same thing.  Each member starts on a 64-byte boundary (a cache
line) and the padding between members stays zero, which every update leaves at zero
(Adam, Adamax, weight decay, EMA; it adds nothing to a norm).

A large float32 variable has a group of its own, so that its step can read a caller's
gradient where it lies (``GradientBindings``): imported as it is, at any 4-byte-aligned
address, since llvm-cpu steps are compiled to assume no more than that of their bindings
(compiler/targets.py).  Smaller variables share a group, and their gradients are copied
into its staging buffer (``copy_in``).
"""
import ctypes
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

import iree.runtime as rt

from ..kernels.step import size_of
from . import cores
from .device import _ELEMENT_TYPES, numpy_dtype

ALIGN = 64
DRIVERS = ("local-sync", "local-task")
#: a float32 variable this large (bytes) has a group (and a dispatch) of its own, whose
#: gradient is passed in place rather than copied.  Measured here: an import costs ~5 us,
#: a copy of 64 KiB ~5-10 us (11 ms at 64 MiB) (200 tensors of 84 KB: 4.7 ms per step in
#: place, 7.0 ms copied into one group); many own groups are updated by a chain of steps
#: of any length (runtime/groups.py), not one dispatch each (~40 ms of compile time each)
IN_PLACE_MIN_BYTES = 1 << 16


class ImportedBuffer:
    """The DeviceBuffer interface (``host``, ``view``, ``buffer``, ``write``, ``read``) over
    ``host``, a numpy array imported into the device without a copy (ours, or a caller's
    gradient, which is only read)."""

    def __init__(self, device, host, dtype):
        self.device, self.host, self.dtype = device, host, dtype
        self.shape, self.np_dtype = tuple(host.shape), host.dtype
        self.buffer = device.hal_device.allocator.import_host_allocation(
            host, memory_type=rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE,
            allowed_usage=rt.BufferUsage.DEFAULT)
        self.view = rt.HalBufferView(self.buffer, list(self.shape), _ELEMENT_TYPES[dtype])

    def write(self, array):
        self.host[...] = array

    def read(self):
        return host_copy(self.host)


#: arenas this large start on a 2 MiB boundary (a huge page's)
HUGE_PAGE = 2 << 20


def _alignment(nbytes):
    """The boundary memory of ``nbytes`` starts on: 2 MiB from HUGE_PAGE bytes on, else ALIGN."""
    return HUGE_PAGE if nbytes >= HUGE_PAGE else ALIGN


def _aligned_zeros(nbytes, fills=None):
    """``nbytes`` of zeros on a 64-byte boundary (2 MiB from HUGE_PAGE bytes on), written
    now, or by ``fill(fills)`` if a list ``fills`` is given (they are zeros before that, not
    yet faulted in): the pages are faulted in by a write (as huge pages where numpy's madvise
    and the kernel allow), not first read and then written inside a step, which left them
    slower to stream (2^24-parameter step, one process, alternating: 15.4-18.3 ms over
    np.zeros arenas, 13.1-14.6 over these)."""
    align = _alignment(nbytes)
    raw = np.empty(nbytes + align, np.uint8) if fills is None else np.zeros(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    out = raw[start:start + nbytes]
    if fills is None:
        out[...] = 0
    else:
        fills.append((out, 0))
    return out


def fill(fills):
    """``dst[...] = src`` for each ``(dst, src, ...)`` of ``fills``, in order."""
    for dst, src, *_ in fills:
        dst[...] = src


def fill_meanwhile(fills):
    """``fill(fills)``, from PARALLEL_MIN_BYTES on started on the pool's thread (numpy
    releases the GIL while it writes); returns a Future whose ``result()`` waits for it (and
    raises what it raised) before the memory is used."""
    if sum(dst.nbytes for dst, *_ in fills) >= PARALLEL_MIN_BYTES and _CORES > 1:
        return _the_pool().submit(fill, fills)
    done = Future()
    try:
        done.set_result(fill(fills))
    except BaseException as e:
        done.set_exception(e)
    return done


def layout(shapes, dtype):
    """Element offsets of members of ``shapes`` and the total, each member on a 64-byte
    boundary for elements of ``dtype`` and of any wider dtype (so that a group's float32
    slots share its bfloat16 parameters' layout); the last one ends the group (a group of
    one variable is exactly its size)."""
    step = max(1, ALIGN // numpy_dtype(dtype).itemsize)
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(-(-total // step) * step)
        total = offsets[-1] + max(size_of(shape), 1)
    return offsets, total


def arenas(device, groups, fills=None):
    """[(group buffer, [member buffers])] for each ``(shapes, dtype, layout dtype)`` of
    ``groups``: members of ``shapes`` and ``dtype`` laid out as for the layout dtype
    (``layout``), zero-filled (written now, or by ``fill(fills)``: ``_aligned_zeros``).

    The groups lie in one allocation, each on a 64-byte boundary (2 MiB from HUGE_PAGE bytes
    on): from 4 MiB on numpy asks for huge pages for it, which separate small arenas did not
    get; a model of 200 variables of 2^22/200 parameters (an arena each) streams its state
    faster then (one process, alternating with the separate arenas: 5.80-6.11 against
    6.09-6.48 ms a step on cpu)."""
    layouts = [(numpy_dtype(dtype), layout(shapes, layout_dtype or dtype)) for shapes, dtype, layout_dtype in groups]
    starts, end = [], 0
    for np_dtype, (_, total) in layouts:
        nbytes = total * np_dtype.itemsize
        align = _alignment(nbytes)
        starts.append(-(-end // align) * align)
        end = starts[-1] + nbytes
    memory = _aligned_zeros(end, fills)
    out = []
    for (shapes, dtype, _), (np_dtype, (offsets, total)), start in zip(groups, layouts, starts):
        flat = memory[start:start + total * np_dtype.itemsize].view(np_dtype)
        members = [ImportedBuffer(device, flat[o:o + size_of(s)].reshape(s), dtype)
                   for o, s in zip(offsets, shapes)]
        out.append((ImportedBuffer(device, flat, dtype), members))
    return out


#: gradient copies of at least this many bytes in one step are split over the cores
PARALLEL_MIN_BYTES = 1 << 22
_pool = []
_CORES = cores.CORES         # (the cores this process may run on)


def _copy_part(part):
    for dst, src in part:
        dst[...] = src          # (an assignment casts like copyto(casting="unsafe"), at ~40% of its cost)


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
    """``host[...] = array`` (casting) for each ``(host array, array)``, the hosts adding
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
            dst[...] = src
    parts = [[(flat_pairs[k][0][a:b], flat_pairs[k][1][a:b]) for k, a, b in share]
             for share in _shares([d for d, _ in flat_pairs])]
    _on_cores(_copy_part, parts)


def host_copy(host):
    """A copy of ``host`` (a variable's or a slot's value, ``Variable.numpy``): from
    PARALLEL_MIN_BYTES on, one contiguous share per core, copied at once.  Measured here, a
    2^22-element float32 array: 0.45-0.51 against 0.68-0.71 ms."""
    if host.nbytes < PARALLEL_MIN_BYTES or _CORES < 2 or not host.flags.c_contiguous:
        return host.copy()
    out = np.empty_like(host)
    copy_to_hosts([(out, host)], host.nbytes)
    return out


def squared_norms(arrays):
    """``sum(a ** 2)`` of each array as a step sees it (float32), by numpy where it lies:
    einsum in float32 (within 5e-7 of the exact sum at 2^24 elements; BLAS's dot was 1.6e-4
    off), the parts added in float64.  From PARALLEL_MIN_BYTES on, in one contiguous share
    per core, at once (einsum releases the GIL): 200 x 84 KB, 7.2 -> 4.9 ms."""
    flats = [a.reshape(-1) if a.dtype == np.float32 else a.reshape(-1).astype(np.float32) for a in arrays]
    if sum(f.nbytes for f in flats) < PARALLEL_MIN_BYTES or _CORES < 2:
        return [_squared_norm(f) for f in flats]
    sums = [0.0] * len(flats)
    parts = [[(k, flats[k][a:b]) for k, a, b in share] for share in _shares(flats)]
    for done in _on_cores(lambda part: [(k, _squared_norm(f)) for k, f in part], parts):
        for k, value in done:
            sums[k] += value
    return sums


def _squared_norm(flat):
    return float(np.einsum("i,i->", flat, flat))


def _shares(flats):
    """The 1-D arrays ``flats`` cut into one contiguous share of their bytes per core:
    ``[[(array index, start, stop), ...] per share]``."""
    total = sum(f.nbytes for f in flats)
    share, shares, part, filled = -(-total // _CORES), [], [], 0
    for k, f in enumerate(flats):
        start = 0
        while start < f.size:
            take = min(f.size - start, max(1, (share - filled) // f.itemsize))
            part.append((k, start, start + take))
            start, filled = start + take, filled + take * f.itemsize
            if filled >= share:
                shares.append(part)
                part, filled = [], 0
    return shares + [part] if part else shares


def _on_cores(fn, parts):
    """``[fn(part) for part in parts]``, the first on this thread, the others at once on
    the pool's (made once, one thread per core but this one)."""
    if not parts:
        return []
    futures = [_the_pool().submit(fn, p) for p in parts[1:]]
    return [fn(parts[0])] + [f.result() for f in futures]


def _the_pool():
    """The pool of one thread per core but the caller's (made once)."""
    if not _pool:
        _pool.append(ThreadPoolExecutor(_CORES - 1, thread_name_prefix="ireeopt-copy"))
    return _pool[0]


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
    size = size_of(shape)
    return ImportedBuffer(device, _aligned_zeros(max(size, 1) * np_dtype.itemsize).view(np_dtype)[:size]
                          .reshape(shape), dtype)


_FLOAT32 = np.dtype(np.float32)


def in_place(array):
    """Whether a caller's gradient ``array`` (of a variable's shape) can be passed to a flat
    step where it lies: a float32, C-contiguous, aligned numpy array of IN_PLACE_MIN_BYTES
    or more."""
    if type(array) is not np.ndarray or array.dtype is not _FLOAT32 or array.nbytes < IN_PLACE_MIN_BYTES:
        return False                # (``is``: an equal dtype that is not numpy's own is copied)
    flags = array.flags
    return flags.c_contiguous and flags.aligned


def _address(array):
    """The address of a C-contiguous ``array``'s first byte: through a ctypes view of its
    buffer where it is writable (~0.7 us, against ~2.6 us for ``__array_interface__``, which
    a step over 200 fresh gradient arrays paid for each)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(array))
    except TypeError:               # (a read-only array)
        return array.__array_interface__["data"][0]


class GradientBindings:
    """The gradient arguments of a group step's own groups (one large variable each), bound
    every step (``bind``) either to the caller's array where it lies or to the group's
    staging buffer, and the VM argument list that passes them.

    An import of a caller's memory does not keep the array alive (the step is synchronous:
    the caller holds its arrays while it runs), so a new gradient array that reuses the
    memory of an earlier one, as freshly allocated gradients usually do, finds its import
    and argument list already made: kept per (address, size), the last few of each group
    and the last few lists (the array bound last is known without its address).  Every step
    binds every own group again before the step runs, so an import of memory since freed is
    never read."""

    KEEP = 4

    def __init__(self, module, buffers, arguments, fences=None, twin=None):
        self.module, self.buffers, self.fences = module, list(buffers), fences
        self.twin = twin                          # the step on the calling thread (module.StepChain)
        self.arguments = arguments                # own group -> its gradient's argument index
        self.bound = dict.fromkeys(arguments)     # own group -> the import bound now, or None
        self._last = dict.fromkeys(arguments)    # own group -> (weakref of the array bound last, its import)
        self._imports = {j: {} for j in arguments}
        self._lists = {}

    def bind(self, sources):
        """The argument list with ``sources`` ({own group: gradient array, or None for its
        staging buffer}) bound; with a ``twin``, the pair (that list, the twin's over the same
        buffers: the local drivers run on any host memory)."""
        for j, array in sources.items():
            if array is None:
                self.bound[j] = None
                continue
            last = self._last[j]
            if last is not None and last[0]() is array:     # the same array object as last time
                found = last[1]
            else:
                key = (_address(array), array.nbytes)
                imports = self._imports[j]
                found = imports.get(key)
                if found is None:
                    found = imports[key] = self._import(*key)
                    if len(imports) > self.KEEP:
                        del imports[next(iter(imports))]
                self._last[j] = (weakref.ref(array), found)
            self.bound[j] = found
        key = tuple(self.bound.values())          # (the imports themselves: alive while keyed)
        args = self._lists.get(key)
        if args is None:
            buffers = list(self.buffers)
            for j, a in self.arguments.items():
                if self.bound[j] is not None:
                    buffers[a] = self.bound[j]
            args = self.module.arguments(buffers, self.fences)
            if self.twin is not None:
                args = (args, self.twin.arguments(buffers))
            self._lists[key] = args
            if len(self._lists) > self.KEEP:
                del self._lists[next(iter(self._lists))]
        return args

    def _import(self, address, nbytes):
        region = (ctypes.c_char * nbytes).from_address(address)
        return ImportedBuffer(self.module.loaded.device, np.frombuffer(region, np.float32), "float32")


class ChainBindings:
    """``GradientBindings`` for a ``StepChain``: one per call (a call without own groups has
    none to bind); ``bind`` returns the argument list of every call."""

    def __init__(self, calls):
        self.calls = calls
        self.arguments = {j: a for b in calls for j, a in b.arguments.items()}

    @property
    def bound(self):
        return {j: found for b in self.calls for j, found in b.bound.items()}

    def bind(self, sources):
        return [b.bind({j: sources[j] for j in b.arguments}) for b in self.calls]

    def bind_each(self, gradients):
        """The argument list of each call, each made when the chain first asks for it (a
        sequence that binds on access: ``StepChain`` queues each call right after, so the
        first runs while the rest are bound, and may ask in any order); ``gradients``: {own
        group: (its gradient, its staging array)}, each bound where it lies if ``in_place``,
        else (a strided one, say) copied into its staging array first, on this thread."""
        return _BoundOnAccess(self.calls, gradients)


class _BoundOnAccess:
    """``ChainBindings.bind_each``'s sequence: call ``k``'s argument list, bound at the first
    ``[k]``."""

    def __init__(self, calls, gradients):
        self._calls, self._gradients, self._made = calls, gradients, {}

    def __len__(self):
        return len(self._calls)

    def __getitem__(self, k):
        if k not in self._made:
            b, sources = self._calls[k], {}
            for j in b.arguments:
                array, staging = self._gradients[j]
                if in_place(array):
                    sources[j] = array
                else:
                    staging[...] = array
                    sources[j] = None
            self._made[k] = b.bind(sources)
        return self._made[k]
