"""The exceptions coalesce raises: all under `CoalesceError`, each saying what to do."""

from __future__ import annotations


class CoalesceError(Exception):
    """Base class of every error raised by coalesce itself."""


class ConfigurationError(CoalesceError, ValueError):
    """A cache URL, option or decorator argument is invalid."""


class MissingDependencyError(CoalesceError, ImportError):
    """An optional part of coalesce needs a package that is not installed; the message names
    the extra that installs it (`pip install 'coalesce-cache[fastapi]'`)."""


class KeyTemplateError(ConfigurationError):
    """A key template names a parameter the function does not have, or cannot be parsed."""


class KeyBuildError(CoalesceError, TypeError):
    """An argument cannot be turned into a stable cache key (give a key template or exclude it)."""


class SerializationError(CoalesceError, TypeError):
    """A value cannot be encoded or decoded by the configured serializer."""


class BackendError(CoalesceError):
    """The store (Redis) failed and the cache was configured to fail closed."""


class CachedError(CoalesceError):
    """A failure cached with `cache_errors=...` whose exception class is not importable here."""

    def __init__(self, exc_type: str, message: str) -> None:
        self.exc_type = exc_type
        self.message = message
        super().__init__(f"cached failure: {exc_type}: {message}")


class LeaderFailedError(CoalesceError):
    """The process that computed a shared value raised; carries the original type and message.

    Raised in waiters of another process, where the original exception object does not exist.
    """

    def __init__(self, key: str, exc_type: str, message: str) -> None:
        self.key = key
        self.exc_type = exc_type
        self.message = message
        super().__init__(
            f"the computation of {key!r} failed in another process: {exc_type}: {message}"
        )


class CoalesceTimeout(CoalesceError, TimeoutError):
    """A caller waited `timeout` seconds for a computation and no stale value could be
    served; the computation goes on, and its result is stored when it lands."""

    def __init__(self, key: str, timeout: float) -> None:
        self.key = key
        self.timeout = timeout
        super().__init__(
            f"waited {timeout:g} s for the computation of {key!r} (timeout={timeout:g}); it "
            "goes on and its result will be cached; no stale value was there to serve "
            "(stale_ttl / stale_if_error)"
        )


class ReentrantCallError(CoalesceError, RuntimeError):
    """A computation asked for its own key: waiting for itself would never end."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"{key!r} was requested while this same call was computing it (the function "
            "calls itself, or another function sharing its key, with the same key): "
            "waiting for itself would never end; give the inner call a key of its own"
        )
