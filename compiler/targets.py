"""iree-compile flags per target (field notes §3, §5).

| target | what | runs on (IREE drivers) |
|---|---|---|
| ``llvm-cpu`` | this machine's CPU (``-target-cpu=host``) | local-sync, local-task |
| ``llvm-cpu:generic`` | portable x86-64 (no host-specific ISA extensions) | local-sync, local-task |
| ``llvm-cpu:aarch64`` | cross-compiled for 64-bit Arm Linux | local-sync, local-task (on Arm) |
| ``vulkan-spirv`` | the Vulkan baseline profile ``vp_android_baseline_2022``: Mesa lavapipe and real GPUs | vulkan |
| ``cuda`` | ``sm_80`` PTX; the driver JIT-compiles it for newer GPUs (Hopper included: IREE 3.13 has no sm_90 entry) | cuda |

``--iree-dispatch-creation-enable-aggressive-fusion`` (llvm-cpu, dense steps) lets IREE put
a norm reduction (clipping) and the EMA select into the same dispatch as the update.
Without it the step stages m and v through transient buffers and copies them back (an
allocation and two extra passes over the slots every step); measured: 1 dispatch and no
transient allocation with it, 2-3 dispatches and 1-3 transient allocations without.
It is left out for steps with sparse gradients: there llvm-cpu codegen rejects the
fused scatter ("write affecting operations on global resources are restricted to
workgroup distributed contexts"), and for the GPU targets, where IREE does not promise it.
"""

#: llvm-cpu steps assume their bindings are 4-byte aligned, not 64 (IREE's default): the
#: runtime then binds a caller's float32 gradient where it lies, whatever its address
#: (runtime/flat.py).  The dispatches use unaligned vector loads and stores (``vmovups``),
#: as fast as aligned ones on aligned data on current x86-64 and Arm cores.
BINDING_ALIGNMENT = "--iree-stream-resource-min-offset-alignment=4"

_LOCAL = ["--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu", BINDING_ALIGNMENT]

TARGETS = {
    "llvm-cpu": _LOCAL + ["--iree-llvmcpu-target-cpu=host"],
    "llvm-cpu:generic": _LOCAL + ["--iree-llvmcpu-target-triple=x86_64-unknown-linux-gnu",
                                  "--iree-llvmcpu-target-cpu=generic"],
    "llvm-cpu:aarch64": _LOCAL + ["--iree-llvmcpu-target-triple=aarch64-unknown-linux-gnu",
                                  "--iree-llvmcpu-target-cpu=generic"],
    "vulkan-spirv": ["--iree-hal-target-device=vulkan", "--iree-vulkan-target=vp_android_baseline_2022"],
    "cuda": ["--iree-hal-target-device=cuda", "--iree-cuda-target=sm_80"],
}

#: IREE runtime drivers that can run a module compiled for each target
DRIVERS = {"llvm-cpu": ("local-sync", "local-task"), "llvm-cpu:generic": ("local-sync", "local-task"),
           "llvm-cpu:aarch64": ("local-sync", "local-task"), "vulkan-spirv": ("vulkan",), "cuda": ("cuda",)}

AGGRESSIVE_FUSION = "--iree-dispatch-creation-enable-aggressive-fusion"


#: the runtime's own llvm-cpu steps (not artifacts, whose ABI stays synchronous) take a wait
#: and a signal fence ("coarse-fences"): the call returns once the step is queued, and the
#: runtime waits for the signal by sleeping instead of in IREE's wait, which spins the
#: calling thread on a core the task workers need (runtime/module.py)
FENCED = "--iree-execution-model=async-external"


def step_flags(target, spec):
    """The flags of a step the runtime compiles for itself (``target_flags`` plus, for
    llvm-cpu, the fenced ABI)."""
    return target_flags(target, spec) + ([FENCED] if target.startswith("llvm-cpu") else [])


def target_flags(target, spec=None, text=None):
    """The exact iree-compile flags for ``target`` (and the step structure ``spec``; with
    ``spec=None``, for a module that may hold sparse steps).  ``text``: the StableHLO, when
    it is more than an optimizer step (a train step): one with any scatter (the gradient of
    a gather) is compiled without aggressive fusion, which fails on it for llvm-cpu
    ("exceeded stack allocation limit")."""
    if target not in TARGETS:
        raise ValueError(f"unknown compile target {target!r}; available: {sorted(TARGETS)}")
    flags = list(TARGETS[target])
    dense = spec is not None and all(v.sparse is None for v in spec.variables)
    if text is not None and "stablehlo.scatter" in text:
        dense = False
    if target.startswith("llvm-cpu") and dense:
        flags.append(AGGRESSIVE_FUSION)
    return flags
