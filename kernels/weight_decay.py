"""Decoupled weight decay (spec §3), applied before the update with this step's lr:

    var -= (var * wd) * lr
"""


def apply(var, wd, lr):
    return var - (var * wd) * lr
