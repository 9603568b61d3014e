"""The effective configuration: flag > environment > TOML config file > default.

One table, `OPTIONS`, describes every setting once: its flag, its environment
twin, its key in the config file, how to read it from text, and what values it
accepts. The CLI builds its flags from the table and `resolve()` merges the
sources with it, so the three spellings of an option cannot drift apart.
"""

from __future__ import annotations

import math
import os
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor import core
from workers.logs import LOG_FORMATS, LOG_LEVELS
from workers.store import BadDatabase, normalise_url

DEFAULT_DATABASE_URL = "sqlite:///taskherd.db"
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
    config_file: str | None = None  # where file values came from, if anywhere

    def validate(self) -> None:
        """Raise ConfigError unless every setting, and every pair that must agree, is usable."""
        for option in OPTIONS:
            problem = option.problem(getattr(self, option.name))
            if problem:
                raise ConfigError(f"{option.name}: {problem}")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                f"the heartbeat timeout ({self.heartbeat_timeout:g} s) must be longer than "
                f"the heartbeat interval ({self.heartbeat_interval:g} s)"
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


def _names(value: str) -> tuple[str, ...]:
    """Comma-separated names; blanks around commas are ignored."""
    return tuple(part.strip() for part in value.split(","))


def _lower(value: str) -> str:
    return value.strip().lower()


def _nonempty(value: Any) -> str | None:
    return None if value else "must not be empty"


def _at_least(low: float, unit: str = "") -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value >= low else f"must be at least {low:g}{unit}, not {value:g}"

    return check


def _positive(value: Any) -> str | None:
    if not math.isfinite(value):
        return f"must be a finite number of seconds, not {value!r}"
    return None if value > 0 else f"must be more than 0 seconds, not {value:g}"


def _not_negative(value: Any) -> str | None:
    if not math.isfinite(value):
        return f"must be a finite number of seconds, not {value!r}"
    return None if value >= 0 else f"must be 0 or more seconds, not {value:g}"


def _unless_none(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """A check for a setting that may be left unset (None)."""
    return lambda value: None if value is None else check(value)


def _positive_size(value: Any) -> str | None:
    if not math.isfinite(value) or value <= 0:
        return f"must be a positive number of megabytes, not {value!r}"
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


@dataclass(frozen=True)
class Option:
    """One setting: its flags, environment twin, file key, kind, check and default."""

    name: str  # the Config field, the key in the config file, TASKHERD_<NAME> in the environment
    flags: tuple[str, ...]  # the CLI spelling, long form last
    scope: str  # "global": before the command; "run": an option of `taskherd run`
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
        return float(value) if self.kind is SECONDS else value


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
    Option("workers", ("-w", "--workers"), "run", COUNT, _at_least(1, " worker"),
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
           _unless_none(_at_least(1, " task")), _constant(None),
           "recycle a worker after about N tasks (default: never)", "N"),
    Option("max_memory_per_worker", ("--max-memory-per-worker",), "run", MEGABYTES,
           _unless_none(_positive_size), _constant(None),
           "recycle a worker whose memory passes MB (default: never)", "MB"),
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
    for option in OPTIONS:
        value, where = _pick(option, flags, environ, table, path)
        problem = option.problem(value)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        values[option.name] = value
    config = Config(**values, config_file=path)
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
