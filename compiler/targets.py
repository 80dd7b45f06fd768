"""iree-compile flags per target (field notes §5).

``--iree-dispatch-creation-enable-aggressive-fusion`` lets IREE put a norm reduction
(clipping) and the EMA select into the same dispatch as the update.  Without it the
step stages m and v through transient buffers and copies them back (an allocation
and two extra passes over the slots every step); measured: 1 dispatch and no
transient allocation with it, 2-3 dispatches and 1-3 transient allocations without.
"""

TARGETS = {
    "llvm-cpu": ["--iree-hal-target-device=local",
                 "--iree-hal-local-target-device-backends=llvm-cpu",
                 "--iree-llvmcpu-target-cpu=host",
                 "--iree-dispatch-creation-enable-aggressive-fusion"],
}


def target_flags(target):
    """The exact iree-compile flags for ``target``."""
    if target not in TARGETS:
        raise ValueError(f"unknown compile target {target!r}; available: {sorted(TARGETS)}")
    return list(TARGETS[target])
