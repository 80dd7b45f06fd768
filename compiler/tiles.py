"""Workgroup tiles of a llvm-cpu step, set by an IREE tuning spec.

IREE gives an elementwise dispatch tiles of 4,096 elements, which the local-task workers take
from a shared counter, so each worker's memory runs are 16 KB an array.  ``tile_flags(tile)``
makes every ``linalg.generic`` of the step's dispatches take ``tile`` elements a workgroup
instead (IREE's ``DoubleTilingExpert`` pipeline with loop peeling, its default for these
dispatches, vectors of 16); the runtime gives a one-variable step of a few million
parameters one tile a worker: each streams one half of the arrays, as an OpenMP loop's
static schedule does (runtime/groups.py ``halves_tile``).  The tile changes no result:
every element is updated by the same code, the last tile of a length that is not a
multiple of it is peeled.
"""
import atexit
import os
import tempfile

_SPEC = """module @ireeopt_tile attributes {{ transform.with_named_sequence }} {{
  transform.named_sequence @__kernel_config(%root: !transform.any_op {{transform.readonly}}) -> !transform.any_op
      attributes {{ iree_codegen.tuning_spec_entrypoint }} {{
    %generics = transform.structured.match ops{{["linalg.generic"]}} in %root : (!transform.any_op) -> !transform.any_op
    %config = transform.param.constant #iree_codegen.compilation_info<
      lowering_config = #iree_cpu.lowering_config<distribution = [{tile}], vector_common_parallel = [16]>,
      translation_info = #iree_codegen.translation_info<pipeline = #iree_cpu.pipeline<DoubleTilingExpert>,
                                                         {{enable_loop_peeling}}>> -> !transform.any_param
    transform.annotate %generics "compilation_info" = %config : !transform.any_op, !transform.any_param
    transform.yield %root : !transform.any_op
  }}
}}
"""

_files = {}          # tile -> the path of its tuning spec, written once a process


def tuning_spec(tile):
    """The tuning spec (transform dialect) that gives every ``linalg.generic`` of a step
    tiles of ``tile`` elements: for a step whose dispatches are each one 1-D elementwise
    generic (a dense update; IREE rejects two configured ops in one dispatch, as a norm summed
    in the step has: the runtime tiles only steps of any length, which sum none)."""
    if not isinstance(tile, int) or tile < 16 or tile % 16:
        raise ValueError(f"a workgroup tile is a positive multiple of 16 elements, got {tile!r}")
    return _SPEC.format(tile=tile)


def tile_flags(tile):
    """The iree-compile flags that give a step tiles of ``tile`` elements (none for None)."""
    if tile is None:
        return []
    path = _files.get(tile)
    if path is None or not os.path.exists(path):
        fd, path = tempfile.mkstemp(prefix=f"ireeopt-tile-{tile}-", suffix=".mlir")
        with os.fdopen(fd, "w") as f:
            f.write(tuning_spec(tile))
        _files[tile] = path
    return [f"--iree-codegen-tuning-spec-path={path}"]


@atexit.register
def _remove():
    for path in _files.values():
        try:
            os.unlink(path)
        except OSError:
            pass
