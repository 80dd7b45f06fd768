"""iree-compile flags per target (field notes §5).

``--iree-dispatch-creation-enable-aggressive-fusion`` lets IREE put a norm reduction
(clipping) and the EMA select into the same dispatch as the update.  Without it the
step stages m and v through transient buffers and copies them back (an allocation
and two extra passes over the slots every step); measured: 1 dispatch and no
transient allocation with it, 2-3 dispatches and 1-3 transient allocations without.
It is left out for steps with sparse gradients: there it fuses elementwise work into
the scatter and llvm-cpu codegen rejects the result ("write affecting operations on
global resources are restricted to workgroup distributed contexts").
"""

TARGETS = {
    "llvm-cpu": ["--iree-hal-target-device=local",
                 "--iree-hal-local-target-device-backends=llvm-cpu",
                 "--iree-llvmcpu-target-cpu=host"],
}


AGGRESSIVE_FUSION = "--iree-dispatch-creation-enable-aggressive-fusion"


def target_flags(target, spec=None):
    """The exact iree-compile flags for ``target`` (and the step structure ``spec``)."""
    if target not in TARGETS:
        raise ValueError(f"unknown compile target {target!r}; available: {sorted(TARGETS)}")
    flags = list(TARGETS[target])
    if spec is None or all(v.sparse is None for v in spec.variables):
        flags.append(AGGRESSIVE_FUSION)
    return flags
