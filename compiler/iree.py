"""Run iree-compile (the ``iree-base-compiler`` package) on StableHLO text."""
from .targets import step_flags, target_flags
from .trace import lower_step


def compile_mlir(text, flags):
    """Compile StableHLO ``text`` with iree-compile ``flags``; returns the .vmfb bytes."""
    import iree.compiler as ic

    return ic.compile_str(text, input_type="stablehlo", extra_args=list(flags))


def compile_step(spec, target, runtime=False):
    """``(vmfb bytes, stablehlo text)`` of the step described by ``spec``; ``runtime``: with
    the flags of a step the runtime compiles for itself (``targets.step_flags``)."""
    text = lower_step(spec)
    return compile_mlir(text, (step_flags if runtime else target_flags)(target, spec)), text
