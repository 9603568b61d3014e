"""Everything a task touches: the store, the queue client, the @task registry, the worker."""

from workers.context import Cancelled, TaskContext
from workers.registry import InvalidPayload, task
from workers.store import LostClaim
from workers.taskqueue import InvalidTask, TaskQueue

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "InvalidPayload",
    "InvalidTask",
    "LostClaim",
    "TaskContext",
    "TaskQueue",
    "__version__",
    "task",
]
