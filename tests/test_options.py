"""The options of `cached`, written once (`coalesce.options.CachedOptions`): a name the
decorators do not take is our own error naming it, on `Cache.cached` and the module-level
`cached`, before anything is decorated."""

from __future__ import annotations

from typing import Any

import pytest

import coalesce
from coalesce import Cache, ConfigurationError
from coalesce.options import CachedOptions


@pytest.mark.parametrize("where", ["cache", "module"])
def test_an_unknown_option_is_named(where: str) -> None:
    decorator: Any = Cache().cached if where == "cache" else coalesce.cached
    with pytest.raises(ConfigurationError, match=r"cached has no option 'tll'.*ttl"):
        decorator(tll=60)


def test_every_option_of_the_typed_dict_is_accepted() -> None:
    cache = Cache()
    given: dict[str, Any] = {
        "ttl": 60,
        "key": "user:{user_id}",
        "exclude": (),
        "tags": ["users"],
        "stale_ttl": 5,
        "stale_if_error": 30,
        "cache_errors": 1,
        "timeout": 2,
        "early_refresh": True,
        "jitter": 0.1,
        "copy": False,
    }
    assert set(given) == set(CachedOptions.__annotations__)

    @cache.cached(**given)
    def load_user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    assert load_user(3) == {"id": 3}
    assert load_user.key(3) == "user:3"
