"""The `coalesce` command line: look at and clear cache entries from a shell, and run the demo.

One concern per module: `commands` (what each command does, through the public API), `main`
(the argument parser and `main`, the entry point of the console script `coalesce` and of
`python -m coalesce`), `output` (how it prints) and `remote` (how Redis and an application
are reached, and their failures named).
"""

from coalesce.cli.main import main

__all__ = ["main"]
