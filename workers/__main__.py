"""`python -m workers`: one worker process, started by its supervisor (arguments on stdin)."""

from workers.worker import run_from_stdin

run_from_stdin()
