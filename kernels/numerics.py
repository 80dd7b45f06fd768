"""Host-side float32 constants, rounded the way the spec (and tf_keras) rounds them.

``r32`` rounds a Python float to the nearest float32 (returned as a Python float).  A
float32 ``+ - * /`` or ``sqrt`` equals the same operation on those doubles rounded once
by ``r32`` (double has more than 2·24 + 2 bits), which is how the per-step constants are
computed cheaply on the host.
"""
import struct

import numpy as np

f32 = np.float32
_F32 = struct.Struct("f")
_F32S = {n: struct.Struct(f"{n}f") for n in range(2, 5)}      # (``r32s``)


def r32(x):
    """``x`` rounded to the nearest float32, as a Python float."""
    return _F32.unpack(_F32.pack(x))[0]


def r32s(*values):
    """``r32`` of two to four values at once (a tuple): one pass in C."""
    packing = _F32S[len(values)]
    return packing.unpack(packing.pack(*values))


def one_minus(x):
    """``1 - x`` computed in float64 on the host, then rounded to float32 (spec §2)."""
    return f32(1.0 - float(x))


def power(base, t):
    """``pow(f32(base), f32(t))`` correctly rounded: computed in float64 from the float32
    operands, then rounded once (numpy's float32 ``power`` is off by one ulp for some t)."""
    return f32(float(f32(base)) ** float(f32(t)))
