"""Host-side float32 constants, rounded the way the spec (and tf_keras) rounds them."""
import numpy as np

f32 = np.float32


def one_minus(x):
    """``1 - x`` computed in float64 on the host, then rounded to float32 (spec §2)."""
    return f32(1.0 - float(x))


def power(base, t):
    """``pow(f32(base), f32(t))`` correctly rounded: computed in float64 from the float32
    operands, then rounded once (numpy's float32 ``power`` is off by one ulp for some t)."""
    return f32(float(f32(base)) ** float(f32(t)))
