"""Opening the page stores of the tiers below host memory from their configs, through a
registry of tier kinds.

Each kind is a :class:`TierKind` record: the config type it opens, the medium its stores
serve, the extra that installs its dependencies, the modules to import (``require``) before
its own, and an opener. An opener named as ``"module:attribute"`` is imported only when a
store of that kind is opened, so registering the built-in kinds imports none of lmdb, boto3
or the GCS client. An embedding application adds its own kind with :func:`register_tier`.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm.deps import require
from kvbm.errors import ConfigError, InvalidArgumentError
from kvbm.layout import KVLayout
from kvbm.medium import Medium
from kvbm.storage.disk.config import DiskTierConfig
from kvbm.storage.gcs import GCSTierConfig
from kvbm.storage.s3 import S3TierConfig

if TYPE_CHECKING:
    from kvbm.storage.base import PageStore, TierListener

#: Called as ``opener(layout, config, listener=listener)``; returns the store or an
#: awaitable of it (a class, or an async factory such as ``DiskStore.open``).
Opener = Callable[..., "PageStore | Awaitable[PageStore]"]


@dataclass(frozen=True)
class TierKind:
    """One kind of tier below host memory, as registered."""

    name: str
    config_type: type
    medium: Medium
    #: ``"module:attribute"`` (imported on first open; the attribute may be dotted, as in
    #: ``"pkg.mod:Store.open"``) or the opener itself.
    opener: str | Opener
    #: The extra that installs ``requires`` (named in MissingDependencyError); ``None`` for a
    #: kind with no optional dependencies.
    extra: str | None = None
    #: Modules imported, in order, before the opener: a missing one raises
    #: MissingDependencyError naming ``extra`` rather than a bare ImportError from deep inside.
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise InvalidArgumentError(f"a tier kind's name is an identifier, got {self.name!r}")
        if not isinstance(self.config_type, type):
            raise InvalidArgumentError(f"tier kind {self.name!r}: config_type must be a class, "
                                       f"got {self.config_type!r}")
        if not isinstance(self.medium, Medium) or self.medium.tier < 3:
            raise InvalidArgumentError(f"tier kind {self.name!r}: medium must be a Medium below "
                                       f"host memory (DISK or OBJECT), got {self.medium!r}")
        if isinstance(self.opener, str):
            _check_reference(self.name, self.opener)
        elif not callable(self.opener):
            raise InvalidArgumentError(f"tier kind {self.name!r}: opener must be callable or "
                                       f"'module:attribute', got {self.opener!r}")
        if self.extra is not None and (not isinstance(self.extra, str) or not self.extra):
            raise InvalidArgumentError(f"tier kind {self.name!r}: extra must be a non-empty "
                                       f"string or None, got {self.extra!r}")
        if not isinstance(self.requires, tuple) or not all(
                isinstance(m, str) and _is_dotted(m) for m in self.requires):
            raise InvalidArgumentError(f"tier kind {self.name!r}: requires must be a tuple of "
                                       f"module names, got {self.requires!r}")
        if self.requires and self.extra is None:
            raise InvalidArgumentError(f"tier kind {self.name!r}: requires needs the extra "
                                       f"that installs it")

    def resolve_opener(self) -> Opener:
        """The opener, imported if it was given by name."""
        if not isinstance(self.opener, str):
            return self.opener
        module, _, attr = self.opener.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj  # type: ignore[no-any-return]


def _is_dotted(name: str) -> bool:
    return bool(name) and all(p.isidentifier() for p in name.split("."))


def _check_reference(kind: str, ref: str) -> None:
    module, sep, attr = ref.partition(":")
    if not (sep and _is_dotted(module) and _is_dotted(attr)):
        raise InvalidArgumentError(f"tier kind {kind!r}: opener must be 'module:attribute', "
                                   f"got {ref!r}")


_lock = threading.Lock()
#: Kinds by name, in registration order (the order ConfigError lists them in).
_by_name: dict[str, TierKind] = {}


def register_tier(name: str, config_type: type, medium: Medium, opener: str | Opener, *,
                  extra: str | None = None, requires: tuple[str, ...] = ()) -> TierKind:
    """Register a tier kind: configs of ``config_type`` (or a subclass of it that no other
    kind claims) are opened by ``opener``. A name or a config type already registered is a
    :class:`ConfigError`; nothing changes then."""
    kind = TierKind(name, config_type, medium, opener, extra, requires)
    with _lock:
        if name in _by_name:
            raise ConfigError(f"tier kind {name!r} is already registered")
        for other in _by_name.values():
            if other.config_type is config_type:
                raise ConfigError(f"{config_type.__name__} is already the config of tier kind "
                                  f"{other.name!r}")
        _by_name[name] = kind
    return kind


def unregister_tier(name: str) -> TierKind:
    """Remove a registered kind (an application's own, when it shuts down); returns it."""
    with _lock:
        try:
            return _by_name.pop(name)
        except KeyError:
            raise ConfigError(f"no tier kind {name!r}; registered: {_names()}") from None


def registered_tiers() -> dict[str, TierKind]:
    """The registered kinds by name (a copy)."""
    with _lock:
        return dict(_by_name)


def _names() -> str:
    return ", ".join(_by_name) or "none"


def tier_kind(config: object) -> TierKind:
    """The kind that opens ``config``: the one registered for its exact type, else for the
    nearest base class in its MRO. :class:`ConfigError` naming the registered kinds if none."""
    with _lock:
        by_type = {k.config_type: k for k in _by_name.values()}
        for cls in type(config).__mro__:
            if cls in by_type:
                return by_type[cls]
        raise ConfigError(f"not a tier config: {type(config).__name__} (registered tier "
                          f"kinds: {_names()})")


async def open_store(config: Any, layout: KVLayout, listener: TierListener) -> PageStore:
    """The store a tier config describes, opened. Client libraries are imported here, lazily:
    they are extras."""
    kind = tier_kind(config)
    for module in kind.requires:
        assert kind.extra is not None  # TierKind checks it
        require(module, kind.extra, f"the {kind.name} tier")
    store = kind.resolve_opener()(layout, config, listener=listener)
    if inspect.isawaitable(store):
        store = await store
    if store.medium is not kind.medium:
        # The manager files a store's pages under its medium: one serving another medium
        # than registered would be counted and onboarded as the wrong tier.
        await store.close()
        raise ConfigError(f"tier kind {kind.name!r} opened a {store.medium.value} store, "
                          f"registered as {kind.medium.value}")
    return store


# Each tier keeps an lmdb index; the object tiers also need their client library. The extras
# of the object tiers install lmdb too, so a missing lmdb names the tier's own extra.
register_tier("disk", DiskTierConfig, Medium.DISK, "kvbm.storage.disk:DiskStore.open",
              extra="disk", requires=("lmdb",))
register_tier("s3", S3TierConfig, Medium.OBJECT, "kvbm.storage.s3:S3Store",
              extra="s3", requires=("lmdb", "boto3"))
register_tier("gcs", GCSTierConfig, Medium.OBJECT, "kvbm.storage.gcs:GCSStore",
              extra="gcs", requires=("lmdb", "google.cloud.storage"))
