"""The queue client: enqueue tasks, alone or inside the caller's own transaction."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection

from workers import registry
from workers.store import NewTask, Store

MAX_PAYLOAD_BYTES = 1024 * 1024  # the default limit on a payload's JSON text
# What the columns hold (INTEGER on both engines) and what is sane to ask for.
MIN_PRIORITY, MAX_PRIORITY = -(2**31), 2**31 - 1
MAX_RETRIES = 1000
MAX_SECONDS = 10 * 365 * 86400  # the longest delay or timeout: ten years
PAYLOAD_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))  # built once


class InvalidTask(ValueError):
    """The task cannot be enqueued as given (bad payload, bad option); nothing was written."""


class TaskQueue:
    """Enqueue tasks into the database at `database_url`.

    Defaults for queue, retries and timeout come from the task's @task registration
    when it is imported in this process, else from the module constants.
    """

    def __init__(
        self,
        database_url: str,
        *,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        store: Store | None = None,
    ) -> None:
        self.store = store or Store(database_url)
        self.max_payload_bytes = max_payload_bytes

    def enqueue(
        self,
        task_type: str,
        payload: Any = None,
        *,
        queue: str | None = None,
        priority: int = 0,
        max_retries: int | None = None,
        delay: float = 0.0,
        timeout: float | None = None,
        unique_key: str | None = None,
        connection: Connection | None = None,
    ) -> int:
        """Enqueue one task and return its id (or the id of the unfinished task with unique_key)."""
        new = self.build(
            task_type,
            payload,
            queue=queue,
            priority=priority,
            max_retries=max_retries,
            delay=delay,
            timeout=timeout,
            unique_key=unique_key,
        )
        return self.store.enqueue([new], connection=connection)[0]

    def enqueue_many(
        self,
        task_type: str,
        payloads: Iterable[Any],
        *,
        queue: str | None = None,
        priority: int = 0,
        max_retries: int | None = None,
        delay: float = 0.0,
        timeout: float | None = None,
        connection: Connection | None = None,
    ) -> list[int]:
        """Enqueue one task per payload in one transaction; all or none. Returns ids in order."""
        options = self.build(
            task_type,
            queue=queue,
            priority=priority,
            max_retries=max_retries,
            delay=delay,
            timeout=timeout,
        )  # checked once: only the payload differs from task to task
        fields = dataclasses.asdict(options)
        del fields["payload"]  # (dataclasses.replace per task would cost more than the insert)
        batch = [
            NewTask(payload=self.encode_payload({} if payload is None else payload), **fields)
            for payload in payloads
        ]
        return self.store.enqueue(batch, connection=connection)

    def build(
        self,
        task_type: str,
        payload: Any = None,
        *,
        queue: str | None = None,
        priority: int = 0,
        max_retries: int | None = None,
        delay: float = 0.0,
        timeout: float | None = None,
        unique_key: str | None = None,
    ) -> NewTask:
        """Validate one task and turn it into a row; raise InvalidTask with a one-line reason."""
        if not isinstance(task_type, str) or not task_type.strip():
            raise InvalidTask("a task type must be a non-empty string")
        spec = registry.get(task_type)
        if queue is None:
            queue = spec.queue if spec else registry.DEFAULT_QUEUE
        if max_retries is None:
            max_retries = spec.max_retries if spec else registry.DEFAULT_MAX_RETRIES
        if timeout is None and spec is not None:
            timeout = spec.timeout
        _check(bool(queue) and isinstance(queue, str), "a queue name must be a non-empty string")
        _check(
            _is_int(priority) and MIN_PRIORITY <= priority <= MAX_PRIORITY,
            f"priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}, not {priority!r}",
        )
        _check(
            _is_int(max_retries) and 0 <= max_retries <= MAX_RETRIES,
            f"max_retries must be from 0 to {MAX_RETRIES}, not {max_retries!r}",
        )
        _check(
            _is_finite(delay) and 0 <= delay <= MAX_SECONDS,
            f"delay must be from 0 to {MAX_SECONDS} seconds, not {delay!r}",
        )
        _check(
            timeout is None or (_is_finite(timeout) and 0 < timeout <= MAX_SECONDS),
            f"timeout must be more than 0 and at most {MAX_SECONDS} seconds, not {timeout!r}",
        )
        _check(
            unique_key is None or (isinstance(unique_key, str) and unique_key != ""),
            "a unique key must be a non-empty string",
        )
        return NewTask(
            task_type=task_type,
            payload=self.encode_payload({} if payload is None else payload),
            queue=queue,
            priority=int(priority),
            max_attempts=int(max_retries) + 1,
            delay=float(delay),
            timeout=None if timeout is None else float(timeout),
            unique_key=unique_key,
        )

    def encode_payload(self, payload: Any) -> str:
        """The payload as JSON text, within the size limit."""
        try:
            text = PAYLOAD_ENCODER.encode(payload)
        except (TypeError, ValueError) as error:
            raise InvalidTask(f"the payload is not JSON: {error}") from error
        except RecursionError:
            raise InvalidTask("the payload is nested too deeply") from None
        size = len(text.encode("utf-8"))
        if size > self.max_payload_bytes:
            raise InvalidTask(
                f"the payload is {size} bytes, over the limit of {self.max_payload_bytes} bytes"
            )
        return text


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidTask(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
