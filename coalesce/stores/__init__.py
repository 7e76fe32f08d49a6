"""Stores keep entries under full keys (namespace included) behind one small interface."""

from coalesce.stores.base import Fence, Store

__all__ = ["Fence", "Store"]
