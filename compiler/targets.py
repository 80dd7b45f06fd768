"""iree-compile flags per target (field notes §5)."""

TARGETS = {
    "llvm-cpu": ["--iree-hal-target-device=local",
                 "--iree-hal-local-target-device-backends=llvm-cpu",
                 "--iree-llvmcpu-target-cpu=host"],
}


def target_flags(target):
    """The exact iree-compile flags for ``target``."""
    if target not in TARGETS:
        raise ValueError(f"unknown compile target {target!r}; available: {sorted(TARGETS)}")
    return list(TARGETS[target])
