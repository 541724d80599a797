"""silofed: the neutral package both roles (and task authors) import.

Rule: what the coordinator and the silo agent both need and is not protocol lives here, once:
the task API (`from silofed import Task, TrainResult`), the tensor codec (silofed.tensors), the
config schema base (silofed.config_schema), logging setup (silofed.logs), atomic file writes
(silofed.files), wire constants (silofed.wire) and the console scripts' shape (silofed.cli).
Nothing here imports `coordinator`, `silo_agent`, grpc or `protos`; it may use secagg's pure
pieces. Importing `silofed` itself loads neither torch nor any submodule but the task API;
`ProximalTerm` (FedProx, silofed.proximal, which needs torch) is loaded on first use, and so is
silofed.distributed (`from silofed import distributed`: the helpers a task's `train` uses to
run on several workers).
"""

from typing import TYPE_CHECKING, Any

from silofed.task import Task, TaskLoadError, TrainingCancelled, TrainResult

if TYPE_CHECKING:
    from silofed.proximal import ProximalTerm

__all__ = ["ProximalTerm", "Task", "TaskLoadError", "TrainResult", "TrainingCancelled"]


def __getattr__(name: str) -> Any:
    # `from silofed import ProximalTerm` imports torch only then, never at `import silofed`
    # (the operator's commands that only read a config must not pay torch's import time).
    if name == "ProximalTerm":
        from silofed.proximal import ProximalTerm

        return ProximalTerm
    raise AttributeError(f"module 'silofed' has no attribute {name!r}")
