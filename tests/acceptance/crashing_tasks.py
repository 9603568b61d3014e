"""A task module that imports in the supervisor but raises inside every worker: a crash loop."""

import sys

if sys.argv[0].endswith("workers/__main__.py"):  # `python -m workers`: a worker process
    raise RuntimeError("the task module cannot start here")
