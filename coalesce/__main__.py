"""`python -m coalesce`: the same command line as the `coalesce` console script."""

from __future__ import annotations

from coalesce.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
