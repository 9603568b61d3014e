"""The handler registry: @task("name", ...) and what the worker needs to run one."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_QUEUE = "default"
DEFAULT_MAX_RETRIES = 3
DEFAULT_RETRY_BACKOFF = 1.0  # seconds before the first retry; doubles each attempt

Handler = Callable[[Any, Any], Any]


class InvalidPayload(Exception):
    """Raised by a handler for a payload it cannot accept: the task fails at once, no retry."""


class TaskModuleError(Exception):
    """A task module could not be imported."""


@dataclass(frozen=True)
class TaskSpec:
    """A registered handler and its defaults."""

    name: str
    handler: Handler
    queue: str = DEFAULT_QUEUE
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout: float | None = None
    retry_backoff: float = DEFAULT_RETRY_BACKOFF
    is_async: bool = field(init=False)  # an `async def` handler (known once, not per task)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(self.handler))


_registry: dict[str, TaskSpec] = {}


def task(
    name: str,
    *,
    queue: str = DEFAULT_QUEUE,
    max_retries: int = DEFAULT_MAX_RETRIES,
    timeout: float | None = None,
    retry_backoff: float = DEFAULT_RETRY_BACKOFF,
) -> Callable[[Handler], Handler]:
    """Register a handler `(ctx, payload)` for tasks of type `name`; plain or async def."""
    if not name or not isinstance(name, str):
        raise ValueError("a task needs a non-empty name")
    if max_retries < 0:
        raise ValueError("max_retries must be 0 or more")
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be more than 0 seconds")

    def register(handler: Handler) -> Handler:
        existing = _registry.get(name)
        if existing is not None and _origin(existing.handler) != _origin(handler):
            raise ValueError(f"task {name!r} is already registered by {_origin(existing.handler)}")
        _registry[name] = TaskSpec(name, handler, queue, max_retries, timeout, retry_backoff)
        return handler

    return register


def _origin(handler: Handler) -> str:
    return f"{handler.__module__}.{getattr(handler, '__qualname__', handler)}"


def get(name: str) -> TaskSpec | None:
    return _registry.get(name)


def names() -> list[str]:
    return sorted(_registry)


def import_modules(modules: Sequence[str]) -> None:
    """Import the task modules; any failure becomes one TaskModuleError naming the module."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            raise TaskModuleError(
                f"cannot import task module {module!r}: {type(error).__name__}: {error}"
            ) from error
