"""The one thing the core reads of `coalesce.otel`: `tracing`, None until `instrument()`.

A leaf module (it imports nothing at run time), so that the core (`coalesce.flight`,
`coalesce.decorators`, `coalesce.stores.redis.lease`) can read it without depending on the
rest of `coalesce.otel`, which depends on the core. Written only by `coalesce.otel.instrument`
and `uninstrument`; read once per flight, leader step and Redis lease, never on a hit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coalesce.otel.instruments import Tracing

#: The active instrumentation, or None.
tracing: Tracing | None = None
