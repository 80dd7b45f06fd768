"""Run iree-compile (the ``iree-base-compiler`` package) on StableHLO text."""


def compile_mlir(text, flags):
    """Compile StableHLO ``text`` with iree-compile ``flags``; returns the .vmfb bytes."""
    import iree.compiler as ic

    return ic.compile_str(text, input_type="stablehlo", extra_args=list(flags))
