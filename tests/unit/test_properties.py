"""Property-based tests (hypothesis) of what users type: payloads and option values.

Whatever the input, parsing ends in a value or in the one error type the CLI turns into a
one-line message with exit code 2, never in another exception (a traceback), and a value
that is accepted comes back unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from supervisor import cli
from supervisor.config import MAX_SECONDS, MAX_WORKERS, OPTIONS, ConfigError, resolve
from workers.resilience import RETRY_CAP
from workers.store import Store
from workers.taskqueue import (
    MAX_PRIORITY,
    MAX_RETRIES,
    MIN_PRIORITY,
    InvalidTask,
    TaskQueue,
)
from workers.taskqueue import MAX_SECONDS as MAX_TASK_SECONDS

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
SMALL_LIMIT = 200


@pytest.fixture(scope="module")
def queue() -> Iterator[TaskQueue]:
    """A queue client with a small payload limit (its database is never written here)."""
    with tempfile.TemporaryDirectory() as directory:
        store = Store(f"sqlite:///{Path(directory) / 'p.db'}", create=True)
        try:
            yield TaskQueue("unused", store=store, max_payload_bytes=SMALL_LIMIT)
        finally:
            store.dispose()


# -- payloads --------------------------------------------------------------------------


@given(payload=JSON_VALUES)
def test_a_payload_is_stored_exactly_or_refused_for_its_size(
    queue: TaskQueue, payload: Any
) -> None:
    try:
        text = queue.encode_payload(payload)
    except InvalidTask as error:
        assert "over the limit" in str(error)
        compact = json.dumps(payload, separators=(",", ":"))
        assert len(compact.encode("utf-8")) > SMALL_LIMIT
        return
    assert len(text.encode("utf-8")) <= SMALL_LIMIT
    assert json.loads(text) == payload


@given(value=st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text())
def test_a_payload_that_is_not_json_is_refused_with_invalid_task(
    queue: TaskQueue, value: Any
) -> None:
    payload = {"x": value, "y": {1, 2}}  # a set is never JSON
    with pytest.raises(InvalidTask):
        queue.encode_payload(payload)


@given(text=st.text(max_size=200))
def test_the_cli_reads_any_text_as_json_or_refuses_it_with_invalid_task(text: str) -> None:
    try:
        value = cli._json(text, "the payload")
    except InvalidTask as error:
        assert str(error).startswith("the payload ")
        return
    assert json.loads(text) == value


@given(payload=JSON_VALUES)
def test_the_cli_reads_back_any_json_it_is_given(payload: Any) -> None:
    assert cli._json(json.dumps(payload), "the payload") == payload


@given(
    priority=st.integers(),
    retries=st.integers(),
    delay=st.floats(allow_nan=True, allow_infinity=True),
    timeout=st.none() | st.floats(allow_nan=True, allow_infinity=True),
)
def test_task_options_are_accepted_exactly_within_their_ranges(
    queue: TaskQueue, priority: int, retries: int, delay: float, timeout: float | None
) -> None:
    valid = (
        MIN_PRIORITY <= priority <= MAX_PRIORITY
        and 0 <= retries <= MAX_RETRIES
        and math.isfinite(delay)
        and 0 <= delay <= MAX_TASK_SECONDS
        and (timeout is None or (math.isfinite(timeout) and 0 < timeout <= MAX_TASK_SECONDS))
    )
    try:
        new = queue.build(
            "job", {}, priority=priority, max_retries=retries, delay=delay, timeout=timeout
        )
    except InvalidTask:
        assert not valid
        return
    assert valid
    assert (new.priority, new.max_attempts, new.delay, new.timeout) == (
        priority,
        retries + 1,
        delay,
        timeout,
    )


# -- options ---------------------------------------------------------------------------

SECONDS_OPTIONS = [o.name for o in OPTIONS if o.kind.toml == (int, float) and o.metavar == "S"]


@settings(max_examples=300)
@given(name=st.sampled_from([o.name for o in OPTIONS]), text=st.text(max_size=30))
def test_any_text_for_any_option_gives_a_config_or_a_config_error(name: str, text: str) -> None:
    try:
        config = resolve({name: [text] if _is_list(name) else text}, environ={})
    except ConfigError as error:
        assert str(error).strip() and "\n" not in str(error)
        return
    assert getattr(config, name) is not None or name in ("log_format",)


@given(
    name=st.sampled_from(SECONDS_OPTIONS),
    seconds=st.floats(min_value=0.001, max_value=MAX_SECONDS),
)
def test_seconds_within_range_come_back_unchanged(name: str, seconds: float) -> None:
    flags: dict[str, Any] = {name: repr(seconds)}
    # the heartbeat timeout must pass the interval plus the retry back-off
    if name == "heartbeat_timeout":
        assume(seconds > RETRY_CAP + 0.01)
        flags["heartbeat_interval"] = repr((seconds - RETRY_CAP) / 2)
    if name == "heartbeat_interval":
        assume(seconds + RETRY_CAP + 1 <= MAX_SECONDS)
        flags["heartbeat_timeout"] = repr(seconds + RETRY_CAP + 1)
    if name.endswith("_warning"):
        flags[name.replace("warning", "critical")] = repr(MAX_SECONDS)
    if name.endswith("_critical"):
        flags[name.replace("critical", "warning")] = repr(seconds)
    config = resolve(flags, environ={})
    assert getattr(config, name) == seconds


@given(workers=st.integers())
def test_worker_counts_are_accepted_exactly_from_1_to_the_maximum(workers: int) -> None:
    try:
        config = resolve({"workers": str(workers)}, environ={})
    except ConfigError as error:
        assert not 1 <= workers <= MAX_WORKERS
        assert "workers" in str(error)
        return
    assert config.workers == workers


@given(text=st.text(max_size=30))
def test_cli_argument_types_give_a_value_or_an_argument_type_error(text: str) -> None:
    for parse in (cli._priority, cli._retries, cli._limit, cli._task_id, cli._duration):
        with contextlib.suppress(argparse.ArgumentTypeError):
            parse(text)
    for seconds in (cli._seconds(0.0, "0 or more"), cli._seconds(0.0, "more than 0")):
        try:
            value = seconds(text)
        except argparse.ArgumentTypeError:
            continue
        assert math.isfinite(value) and 0 <= value <= MAX_TASK_SECONDS


def _is_list(name: str) -> bool:
    return next(o for o in OPTIONS if o.name == name).kind.is_list
