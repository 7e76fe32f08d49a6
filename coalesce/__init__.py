"""coalesce: share one computation among identical concurrent calls, and cache the result.

The public names, nothing else: see the README for the guide.
"""

from coalesce.batch import CachedMany
from coalesce.cache import Cache, cached, coalesced, configure, get_cache
from coalesce.decorators import CachedFunction, Decorator
from coalesce.entry import Entry
from coalesce.errors import (
    BackendError,
    CachedError,
    CoalesceError,
    CoalesceTimeout,
    ConfigurationError,
    KeyBuildError,
    KeyTemplateError,
    LeaderFailedError,
    MissingDependencyError,
    ReentrantCallError,
    SerializationError,
)
from coalesce.serialization import MsgpackSerializer, PickleSerializer, Serializer
from coalesce.stats import Stats
from coalesce.stores.base import KeyList

__all__ = [
    "BackendError",
    "Cache",
    "CachedError",
    "CachedFunction",
    "CachedMany",
    "CoalesceError",
    "CoalesceTimeout",
    "ConfigurationError",
    "Decorator",
    "Entry",
    "KeyBuildError",
    "KeyList",
    "KeyTemplateError",
    "LeaderFailedError",
    "MissingDependencyError",
    "MsgpackSerializer",
    "PickleSerializer",
    "ReentrantCallError",
    "SerializationError",
    "Serializer",
    "Stats",
    "cached",
    "coalesced",
    "configure",
    "get_cache",
]

__version__ = "0.2.0"
