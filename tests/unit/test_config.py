"""The effective configuration: flag > environment > config file > default, and validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisor import core
from supervisor.config import DEFAULT_DATABASE_URL, OPTIONS, Config, ConfigError, resolve
from supervisor.embed import pool_from_environment


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "taskherd.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_are_the_supervisor_constants() -> None:
    config = resolve({}, {})
    assert config.database_url == DEFAULT_DATABASE_URL
    assert config.workers == (os.cpu_count() or 1)
    assert config.poll_interval == core.POLL_INTERVAL
    assert config.heartbeat_interval == core.HEARTBEAT_INTERVAL
    assert config.heartbeat_timeout == core.HEARTBEAT_TIMEOUT
    assert config.worker_timeout == core.WORKER_TIMEOUT
    assert config.graceful_timeout == core.GRACEFUL_TIMEOUT
    assert config.queues == () and config.imports == ()
    assert config.log_format is None and config.log_level == "info"
    assert config.node  # the hostname
    assert config.config_file is None


@pytest.mark.parametrize(
    ("name", "flag", "env", "file", "expected"),
    [
        ("workers", "7", "5", "workers = 3", (7, 5, 3)),
        ("poll_interval", "0.5", "0.25", "poll_interval = 2", (0.5, 0.25, 2.0)),
        ("graceful_timeout", "0", "4", "graceful_timeout = 9.5", (0.0, 4.0, 9.5)),
        ("node", "a", "b", 'node = "c"', ("a", "b", "c")),
        ("purge_after", "7d", "90m", 'purge_after = "12h"', (604800.0, 5400.0, 43200.0)),
        ("purge_after", "30", "1.5s", "purge_after = 60", (30.0, 1.5, 60.0)),
        ("log_level", "debug", "WARNING", 'log_level = "error"', ("debug", "warning", "error")),
        (
            "database_url",
            "sqlite:///flag.db",
            "sqlite:///env.db",
            'database_url = "sqlite:///file.db"',
            ("sqlite:///flag.db", "sqlite:///env.db", "sqlite:///file.db"),
        ),
        (
            "queues",
            ["a", "b,c"],
            "x, y",
            'queues = ["f"]',
            (("a", "b", "c"), ("x", "y"), ("f",)),
        ),
    ],
)
def test_flag_beats_environment_beats_file_beats_default(
    tmp_path: Path, name: str, flag: object, env: str, file: str, expected: tuple[object, ...]
) -> None:
    option = next(option for option in OPTIONS if option.name == name)
    path = write_config(tmp_path, file + "\n")
    environ = {option.env: env}
    from_flag, from_env, from_file = expected

    assert getattr(resolve({name: flag}, environ, path), name) == from_flag
    assert getattr(resolve({name: None}, environ, path), name) == from_env
    assert getattr(resolve({}, {}, path), name) == from_file
    assert getattr(resolve({}, {option.env: "  "}, path), name) == from_file  # blank means unset
    assert getattr(resolve({}, {}), name) == option.default()


def test_environment_names_the_config_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "workers = 2\nimports = ['app.tasks']\n")
    config = resolve({}, {"TASKHERD_CONFIG": path})
    assert (config.workers, config.imports, config.config_file) == (2, ("app.tasks",), path)
    flagged = tmp_path / "flagged.toml"
    flagged.write_text("workers = 5\n", encoding="utf-8")
    assert resolve({}, {"TASKHERD_CONFIG": path}, str(flagged)).workers == 5  # --config wins


def test_environment_twins_follow_the_documented_names() -> None:
    assert {option.env for option in OPTIONS} == {
        "TASKHERD_DATABASE_URL",
        "TASKHERD_LOG_FORMAT",
        "TASKHERD_LOG_LEVEL",
        "TASKHERD_WORKERS",
        "TASKHERD_QUEUES",
        "TASKHERD_IMPORTS",
        "TASKHERD_NODE",
        "TASKHERD_POLL_INTERVAL",
        "TASKHERD_HEARTBEAT_INTERVAL",
        "TASKHERD_HEARTBEAT_TIMEOUT",
        "TASKHERD_WORKER_TIMEOUT",
        "TASKHERD_GRACEFUL_TIMEOUT",
        "TASKHERD_CANCEL_GRACE",
        "TASKHERD_MAX_TASKS_PER_WORKER",
        "TASKHERD_MAX_MEMORY_PER_WORKER",
        "TASKHERD_WAKE_UP",
        "TASKHERD_MAX_PAYLOAD_BYTES",
        "TASKHERD_PENDING_AGE_WARNING",
        "TASKHERD_PENDING_AGE_CRITICAL",
        "TASKHERD_FAILURE_RATE_WARNING",
        "TASKHERD_FAILURE_RATE_CRITICAL",
        "TASKHERD_FAILURE_WINDOW",
        "TASKHERD_PURGE_AFTER",
    }


@pytest.mark.parametrize(
    ("flags", "environ", "message"),
    [
        ({"workers": "0"}, {}, "--workers: must be from 1 to 1024 workers"),
        ({"workers": "two"}, {}, "--workers: must be a whole number"),
        ({}, {"TASKHERD_WORKERS": "-3"}, "TASKHERD_WORKERS: must be from 1 to 1024"),
        ({"poll_interval": "-1"}, {}, "--poll-interval: must be more than 0"),
        ({}, {"TASKHERD_HEARTBEAT_TIMEOUT": "soon"}, "must be a number of seconds"),
        ({"worker_timeout": "nan"}, {}, "must be a finite number"),
        ({"graceful_timeout": "-0.5"}, {}, "must be 0 or more"),
        ({"log_format": "xml"}, {}, "must be one of console, json"),
        ({"purge_after": "soon"}, {}, "--purge-after: must be a duration like 90s"),
        ({}, {"TASKHERD_PURGE_AFTER": "0d"}, "TASKHERD_PURGE_AFTER: must be more than 0"),
        ({}, {"TASKHERD_LOG_LEVEL": "loud"}, "must be one of debug"),
        ({"queues": ["a,,b"]}, {}, "names must not be empty"),
        ({"database_url": "mysql://u:pw@h/db"}, {}, "unsupported database URL scheme"),
        ({"database_url": "postgresql://u:pw@h:port/db"}, {}, "invalid database URL"),
        (
            {"heartbeat_interval": "5", "heartbeat_timeout": "5"},
            {},
            "must be longer than the heartbeat interval",
        ),
    ],
)
def test_bad_values_are_refused_naming_their_source(
    flags: dict[str, object], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        resolve(flags, environ)
    assert ":pw@" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workers = 0\n", "workers in .*: must be from 1 to 1024"),
        ('workers = "4"\n', "workers in .*: must be a whole number"),
        ("workers = 2.5\n", "must be a whole number"),
        ("poll_interval = true\n", "must be a number of seconds"),
        ('queues = "a"\n', "must be a list of strings"),
        ("imports = [1]\n", "must be a list of strings"),
        ("colour = 'blue'\n", "unknown key 'colour'"),
        ("workers = \n", "is not valid TOML"),
        ("[run]\nworkers = 2\n", "unknown key 'run'"),
    ],
)
def test_a_malformed_config_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        resolve({}, {}, path)


def test_a_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve({}, {}, str(tmp_path / "absent.toml"))


def test_validate_checks_a_config_built_directly() -> None:
    Config(workers=2, node="n").validate()
    with pytest.raises(ConfigError, match="workers"):
        Config(workers=0, node="n").validate()
    with pytest.raises(ConfigError, match="node"):
        Config(node="").validate()


def test_supervisor_kwargs_carry_every_setting() -> None:
    config = resolve({"workers": "3", "imports": ["m"], "node": "n1"}, {})
    pool = core.Supervisor(**config.supervisor_kwargs())
    assert (pool.desired, pool.imports, pool.node) == (3, ("m",), "n1")


def test_the_embedded_pool_is_off_unless_enabled() -> None:
    assert pool_from_environment({}) is None
    assert pool_from_environment({"TASKHERD_ENABLED": "0", "TASKHERD_WORKERS": "2"}) is None
    pool = pool_from_environment(
        {"TASKHERD_ENABLED": "yes", "TASKHERD_WORKERS": "2", "TASKHERD_QUEUES": "a,b"}
    )
    assert pool is not None
    assert (pool.desired, pool.queues) == (2, ("a", "b"))
    with pytest.raises(ConfigError, match="TASKHERD_WORKERS"):
        pool_from_environment({"TASKHERD_ENABLED": "true", "TASKHERD_WORKERS": "none"})
