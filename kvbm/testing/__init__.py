"""Test helpers shipped with kvbm, for kvbm's own tests and for third-party tiers.

``kvbm.testing.PageStoreTests`` is the conformance suite of the :class:`kvbm.storage.PageStore`
contract: a tier's test module subclasses it and supplies a factory (see its docstring).
The suite needs ``pytest`` (a dev dependency); it is imported on first use, so the
pytest-free helpers (``page_payload``, ``make_keys``, ``RecordingListener``) stay cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvbm.testing.pages import TEST_LAYOUT, RecordingListener, make_keys, page_payload

if TYPE_CHECKING:
    from kvbm.testing.store import PageStoreTests

__all__ = ["TEST_LAYOUT", "PageStoreTests", "RecordingListener", "make_keys", "page_payload"]


def __getattr__(name: str) -> Any:
    if name == "PageStoreTests":
        from kvbm.testing.store import PageStoreTests

        return PageStoreTests
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
