"""Run the pool inside an application's own lifespan, configured from the environment.

    from supervisor.embed import running_pool

    with running_pool():        # a pool when TASKHERD_ENABLED=1, else nothing
        serve_forever()

The settings are the CLI's `TASKHERD_*` environment variables (and TASKHERD_CONFIG's
file), with the same precedence and validation; the application keeps its own signal
handlers and logging.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from supervisor.config import Config, resolve
from supervisor.core import Supervisor

ENABLED_ENV = "TASKHERD_ENABLED"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def build_supervisor(config: Config) -> Supervisor:
    """A Supervisor with these settings (not started)."""
    return Supervisor(**config.supervisor_kwargs())


def pool_from_environment(environ: Mapping[str, str] | None = None) -> Supervisor | None:
    """A configured Supervisor when TASKHERD_ENABLED is true-ish (1, true, yes, on), else None.

    Raises ConfigError for a bad setting, like the CLI does.
    """
    environ = os.environ if environ is None else environ
    if environ.get(ENABLED_ENV, "").strip().lower() not in TRUE_WORDS:
        return None
    return build_supervisor(resolve(environ=environ))


@contextmanager
def running_pool(environ: Mapping[str, str] | None = None) -> Iterator[Supervisor | None]:
    """start() the pool from the environment (if enabled) and stop() it on exit."""
    pool = pool_from_environment(environ)
    if pool is None:
        yield None
        return
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()
