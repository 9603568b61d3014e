"""The supervisor process and everything operational: pool, liveness, rescue, CLI."""

from supervisor.core import Supervisor

__all__ = ["Supervisor"]
