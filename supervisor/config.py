"""The effective configuration: flag > environment > TOML config file > default.

One table, `OPTIONS`, describes every setting once: its flag, its environment
twin, its key in the config file, how to read it from text, and what values it
accepts. The CLI builds its flags from the table and `resolve()` merges the
sources with it, so the three spellings of an option cannot drift apart.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor import core
from workers.logs import LOG_FORMATS, LOG_LEVELS
from workers.resilience import RETRY_CAP
from workers.store import BadDatabase, normalise_url
from workers.taskqueue import MAX_PAYLOAD_BYTES

DEFAULT_DATABASE_URL = "sqlite:///taskherd.db"
# Upper bounds: a value past them is a typo, and some would overflow a timer or a column.
MAX_WORKERS = 1024
MAX_SECONDS = 7 * 86400.0  # for every interval and timeout of the pool
MAX_MEGABYTES = 1024 * 1024
MAX_TASKS_PER_WORKER = 10**9
MAX_PAYLOAD_LIMIT = 256 * 2**20  # the largest --max-payload-bytes
MAX_RETENTION = 3650 * 86400.0  # the longest --purge-after: ten years
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CONFIG_ENV = "TASKHERD_CONFIG"


class ConfigError(ValueError):
    """A setting has a bad value, or the config file is unreadable: bad input, exit code 2."""


@dataclass(frozen=True)
class Config:
    """The settings a supervisor (and the CLI) runs with, once merged and validated."""

    database_url: str = DEFAULT_DATABASE_URL
    log_format: str | None = None  # None: console on a terminal, JSON otherwise
    log_level: str = "info"
    workers: int = 1
    queues: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    node: str = ""
    poll_interval: float = core.POLL_INTERVAL
    heartbeat_interval: float = core.HEARTBEAT_INTERVAL
    heartbeat_timeout: float = core.HEARTBEAT_TIMEOUT
    worker_timeout: float = core.WORKER_TIMEOUT
    graceful_timeout: float = core.GRACEFUL_TIMEOUT
    cancel_grace: float = core.CANCEL_GRACE
    max_tasks_per_worker: int | None = None
    max_memory_per_worker: float | None = None
    purge_after: float | None = None  # seconds; None: the pool never purges
    wake_up: str = "on"  # "off": idle workers find new tasks by polling only
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    pending_age_warning: float = 300.0
    pending_age_critical: float = 1800.0
    failure_rate_warning: float = 0.1
    failure_rate_critical: float = 0.5
    failure_window: float = 900.0
    config_file: str | None = None  # where file values came from, if anywhere
    # option name -> where its value came from (a flag, a variable, the file, the default)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def validate(self) -> None:
        """Raise ConfigError unless every setting, and every pair that must agree, is usable."""
        for option in OPTIONS:
            problem = option.problem(getattr(self, option.name))
            if problem:
                raise ConfigError(f"{option.name}: {problem}")
        for low, high in (
            ("pending_age_warning", "pending_age_critical"),
            ("failure_rate_warning", "failure_rate_critical"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise ConfigError(
                    f"{low} ({getattr(self, low):g}) must not be more than "
                    f"{high} ({getattr(self, high):g})"
                )
        # a heartbeat can come late by the interval plus one retry back-off after a blip
        if self.heartbeat_timeout <= self.heartbeat_interval + RETRY_CAP:
            raise ConfigError(
                f"the heartbeat timeout ({self.heartbeat_timeout:g} s) must be longer than "
                f"the heartbeat interval ({self.heartbeat_interval:g} s) plus {RETRY_CAP:g} s "
                f"of retry back-off"
            )
        try:
            normalise_url(self.database_url)
        except BadDatabase as error:
            raise ConfigError(str(error)) from error
        except ValueError:  # SQLAlchemy's parser, e.g. on a port that is not a number
            raise ConfigError(
                f"invalid database URL (check the host, port and database): "
                f"{mask_loosely(self.database_url)}"
            ) from None

    def supervisor_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `Supervisor(...)` for these settings."""
        return {
            "database_url": self.database_url,
            "workers": self.workers,
            "queues": self.queues,
            "imports": self.imports,
            "node": self.node,
            "poll_interval": self.poll_interval,
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_timeout": self.heartbeat_timeout,
            "worker_timeout": self.worker_timeout,
            "graceful_timeout": self.graceful_timeout,
            "cancel_grace": self.cancel_grace,
            "max_tasks_per_worker": self.max_tasks_per_worker,
            "max_memory_per_worker": self.max_memory_per_worker,
            "purge_after": self.purge_after,
            "wake_up": self.wake_up == "on",
            "log_format": self.log_format,
            "log_level": self.log_level,
        }


# -- how values are read and checked -------------------------------------------------


def _text(value: str) -> str:
    return value.strip()


def _integer(value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"must be a whole number, not {value!r}") from None


def _number_of(unit: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(f"must be a number of {unit}, not {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"must be a finite number of {unit}, not {value!r}")
        return number

    return parse


_seconds = _number_of("seconds")


def parse_duration(value: str) -> float:
    """90s, 30m, 12h, 7d (a bare number is seconds) -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if match is None:
        raise ConfigError(f"must be a duration like 90s, 30m, 12h or 7d, not {value!r}")
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def _ratio(value: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise ConfigError(f"must be a fraction from 0 to 1, not {value!r}") from None


def _names(value: str) -> tuple[str, ...]:
    """Comma-separated names; blanks around commas are ignored."""
    return tuple(part.strip() for part in value.split(","))


def _lower(value: str) -> str:
    return value.strip().lower()


def _nonempty(value: Any) -> str | None:
    return None if value else "must not be empty"


def _between(low: float, high: float, unit: str = "") -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if low <= value <= high:
            return None
        return f"must be from {low:g} to {high:g}{unit}, not {value:g}"

    return check


def _positive(value: Any) -> str | None:
    if not math.isfinite(value):
        return f"must be a finite number of seconds, not {value!r}"
    if value > MAX_SECONDS:
        return f"must be at most {MAX_SECONDS:g} seconds, not {value:g}"
    return None if value > 0 else f"must be more than 0 seconds, not {value:g}"


def _not_negative(value: Any) -> str | None:
    if not math.isfinite(value):
        return f"must be a finite number of seconds, not {value!r}"
    if value > MAX_SECONDS:
        return f"must be at most {MAX_SECONDS:g} seconds, not {value:g}"
    return None if value >= 0 else f"must be 0 or more seconds, not {value:g}"


def _unless_none(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """A check for a setting that may be left unset (None)."""
    return lambda value: None if value is None else check(value)


def _retention(value: Any) -> str | None:
    if not math.isfinite(value) or not 0 < value <= MAX_RETENTION:
        return f"must be more than 0 s and at most 3650d, not {value!r}"
    return None


def _fraction(value: Any) -> str | None:
    if not math.isfinite(value) or not 0 <= value <= 1:
        return f"must be a fraction from 0 to 1, not {value!r}"
    return None


def _positive_size(value: Any) -> str | None:
    if not math.isfinite(value) or not 0 < value <= MAX_MEGABYTES:
        return f"must be more than 0 and at most {MAX_MEGABYTES} megabytes, not {value!r}"
    return None


def _all_named(value: Any) -> str | None:
    return None if all(value) else "names must not be empty"


def _one_of(choices: Sequence[str]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None or value in choices:
            return None
        return f"must be one of {', '.join(choices)}, not {value!r}"

    return check


@dataclass(frozen=True)
class Kind:
    """How a setting is read from text (a flag or the environment) and what TOML must hold."""

    read: Callable[[str], Any]
    toml: type | tuple[type, ...]
    described: str  # "must be <described>" when the TOML value has the wrong type
    is_list: bool = False


TEXT = Kind(_text, str, "a string")
WORD = Kind(_lower, str, "a string")
COUNT = Kind(_integer, int, "a whole number")
SECONDS = Kind(_seconds, (int, float), "a number of seconds")
MEGABYTES = Kind(_number_of("megabytes"), (int, float), "a number of megabytes")
NAMES = Kind(_names, list, "a list of strings", is_list=True)
RATIO = Kind(_ratio, (int, float), "a fraction from 0 to 1")
DURATION = Kind(parse_duration, (int, float, str), 'a duration like "7d" or a number of seconds')


@dataclass(frozen=True)
class Option:
    """One setting: its flags, environment twin, file key, kind, check and default."""

    name: str  # the Config field, the key in the config file, TASKHERD_<NAME> in the environment
    flags: tuple[str, ...]  # the CLI spelling, long form last
    scope: str  # "global": before the command; "run", "enqueue", "health": that command's
    kind: Kind
    check: Callable[[Any], str | None]  # value -> problem, or None when fine
    default: Callable[[], Any]
    help: str
    metavar: str

    @property
    def env(self) -> str:
        return "TASKHERD_" + self.name.upper()

    @property
    def flag(self) -> str:
        return self.flags[-1]

    def problem(self, value: Any) -> str | None:
        return self.check(value)

    def from_file(self, value: Any, where: str) -> Any:
        """A value from the TOML file, type-checked (a list must hold strings only)."""
        wrong = isinstance(value, bool) or not isinstance(value, self.kind.toml)
        if self.kind.is_list and not wrong:
            wrong = not all(isinstance(item, str) for item in value)
        if wrong:
            raise ConfigError(f"{where}: must be {self.kind.described}, not {value!r}")
        if isinstance(value, str):
            return self.kind.read(value)
        if self.kind.is_list:
            return tuple(item.strip() for item in value)
        return float(value) if self.kind in (SECONDS, RATIO, DURATION) else value


def mask_loosely(url: str) -> str:
    """Enough of a URL to recognise it, never its password (it may not even parse)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}" if "@" in rest else url


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


def _cpus() -> int:
    return os.cpu_count() or 1


# fmt: off
OPTIONS: tuple[Option, ...] = (
    # name, flags, scope, kind, check, default, help, metavar
    Option("database_url", ("--db",), "global", TEXT, _nonempty,
           _constant(DEFAULT_DATABASE_URL), "the database URL",
           "URL"),
    Option("log_format", ("--log-format",), "global", WORD, _one_of(LOG_FORMATS),
           _constant(None), "console or json (default: console on a terminal, else json)",
           "FORMAT"),
    Option("log_level", ("--log-level",), "global", WORD, _one_of(LOG_LEVELS),
           _constant("info"), f"{', '.join(LOG_LEVELS)} (default info; debug shows tracebacks)",
           "LEVEL"),
    Option("workers", ("-w", "--workers"), "run", COUNT, _between(1, MAX_WORKERS, " workers"),
           _cpus, "worker processes (default: one per CPU)",
           "N"),
    Option("queues", ("-q", "--queue"), "run", NAMES, _all_named,
           _constant(()), "a queue to work on; repeat for several (default: every queue)",
           "QUEUE"),
    Option("imports", ("-i", "--import"), "run", NAMES, _all_named,
           _constant(()), "a module that registers tasks; repeat for several",
           "MODULE"),
    Option("node", ("--node",), "run", TEXT, _nonempty,
           socket.gethostname, "this host's name in the tables (default: the hostname)",
           "NAME"),
    Option("poll_interval", ("--poll-interval",), "run", SECONDS, _positive,
           _constant(core.POLL_INTERVAL), "seconds between looks at an empty queue",
           "S"),
    Option("heartbeat_interval", ("--heartbeat-interval",), "run", SECONDS, _positive,
           _constant(core.HEARTBEAT_INTERVAL), "seconds between two heartbeats",
           "S"),
    Option("heartbeat_timeout", ("--heartbeat-timeout",), "run", SECONDS, _positive,
           _constant(core.HEARTBEAT_TIMEOUT), "seconds of silence before a worker is lost",
           "S"),
    Option("worker_timeout", ("--worker-timeout",), "run", SECONDS, _positive,
           _constant(core.WORKER_TIMEOUT), "seconds before an unresponsive worker is killed",
           "S"),
    Option("graceful_timeout", ("--graceful-timeout",), "run", SECONDS, _not_negative,
           _constant(core.GRACEFUL_TIMEOUT), "seconds running tasks get to finish on SIGTERM",
           "S"),
    Option("cancel_grace", ("--cancel-grace",), "run", SECONDS, _not_negative,
           _constant(core.CANCEL_GRACE), "seconds a cancelled running task gets to stop",
           "S"),
    Option("max_tasks_per_worker", ("--max-tasks-per-worker",), "run", COUNT,
           _unless_none(_between(1, MAX_TASKS_PER_WORKER, " tasks")), _constant(None),
           "recycle a worker after about N tasks (default: never)", "N"),
    Option("max_memory_per_worker", ("--max-memory-per-worker",), "run", MEGABYTES,
           _unless_none(_positive_size), _constant(None),
           "recycle a worker whose memory passes MB (default: never)", "MB"),
    Option("purge_after", ("--purge-after",), "run", DURATION, _unless_none(_retention),
           _constant(None), "delete finished tasks and stopped process rows older than this "
           "(90s, 30m, 12h, 7d) every few minutes, one node at a time (default: never)",
           "DURATION"),
    Option("wake_up", ("--wake-up",), "run", WORD, _one_of(("on", "off")),
           _constant("on"), "on: idle workers start a task as soon as it is enqueued; "
           "off: they find it by polling", "on|off"),
    Option("max_payload_bytes", ("--max-payload-bytes",), "enqueue", COUNT,
           _between(1, MAX_PAYLOAD_LIMIT, " bytes"), _constant(MAX_PAYLOAD_BYTES),
           "the largest payload accepted, as JSON text", "N"),
    Option("pending_age_warning", ("--pending-age-warning",), "health", SECONDS, _positive,
           _constant(300.0), "WARNING when a runnable task has waited longer (seconds)",
           "S"),
    Option("pending_age_critical", ("--pending-age-critical",), "health", SECONDS, _positive,
           _constant(1800.0), "CRITICAL when a runnable task has waited longer (seconds)",
           "S"),
    Option("failure_rate_warning", ("--failure-rate-warning",), "health", RATIO, _fraction,
           _constant(0.1), "WARNING when this share of recently finished tasks failed",
           "F"),
    Option("failure_rate_critical", ("--failure-rate-critical",), "health", RATIO, _fraction,
           _constant(0.5), "CRITICAL when this share of recently finished tasks failed",
           "F"),
    Option("failure_window", ("--failure-window",), "health", SECONDS, _positive,
           _constant(900.0), "seconds of finished tasks the failure rate looks at",
           "S"),
)
# fmt: on

OPTION_NAMES = frozenset(option.name for option in OPTIONS)


def load_file(path: str) -> dict[str, Any]:
    """The TOML file's table; ConfigError if unreadable, malformed or holding an unknown key."""
    try:
        with Path(path).open("rb") as handle:
            table = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from error
    unknown = sorted(set(table) - OPTION_NAMES)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key {unknown[0]!r}")
    return table


def resolve(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Config:
    """Merge flag > environment > config file > default, check each value, then validate().

    flags maps option names to the raw text given on the command line (a list of texts
    for repeatable options); None or a missing name means "not given". config_file is the
    --config flag; without it TASKHERD_CONFIG names the file, and without that there is none.
    """
    flags = flags or {}
    environ = os.environ if environ is None else environ
    path = config_file or environ.get(CONFIG_ENV) or None
    table = load_file(path) if path else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        value, where = _pick(option, flags, environ, table, path)
        problem = option.problem(value)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        values[option.name] = value
        sources[option.name] = where
    config = Config(**values, config_file=path, sources=sources)
    config.validate()
    return config


def _pick(
    option: Option,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    table: Mapping[str, Any],
    path: str | None,
) -> tuple[Any, str]:
    """The value of one option from the strongest source that sets it, and where it came from."""
    given = flags.get(option.name)
    if given is not None and given != []:
        text = ",".join(given) if option.kind.is_list else given
        return _read(option, text, option.flag), option.flag
    if environ.get(option.env, "").strip():
        return _read(option, environ[option.env], option.env), option.env
    if option.name in table:
        where = f"{option.name} in {path}"
        return option.from_file(table[option.name], where), where
    return option.default(), f"the default {option.name}"


def _read(option: Option, text: str, where: str) -> Any:
    try:
        return option.kind.read(text)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
