"""silofed: the neutral package both roles (and task authors) import.

Rule: what the coordinator and the silo agent both need and is not protocol lives here, once:
the task API (`from silofed import Task, TrainResult`), the tensor codec (silofed.tensors), the
config schema base (silofed.config_schema), logging setup (silofed.logs), atomic file writes
(silofed.files), wire constants (silofed.wire) and the console scripts' shape (silofed.cli).
Nothing here imports `coordinator`, `silo_agent`, grpc or `protos`; it may use secagg's pure
pieces. Importing `silofed` itself loads neither torch nor any submodule but the task API.
"""

from silofed.task import Task, TaskLoadError, TrainingCancelled, TrainResult

__all__ = ["Task", "TaskLoadError", "TrainResult", "TrainingCancelled"]
