"""Tiers are opened through a registry of tier kinds (kvbm/tiers.py): the built-in kinds, an
application's own kind plugged into a BlockManager, and the errors for what is not a tier."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pytest

from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, Medium
from kvbm.config import ManagerConfig
from kvbm.errors import ConfigError, InvalidArgumentError
from kvbm.layout import KVLayout
from kvbm.storage.base import PageStore
from kvbm.storage.disk import DiskStore, DiskTierConfig
from kvbm.testing.pages import TEST_LAYOUT, RecordingListener
from kvbm.tiers import open_store, register_tier, registered_tiers, tier_kind, unregister_tier

if TYPE_CHECKING:
    from typing_extensions import Buffer

BS = 4
LAYOUT = KVLayout(2, 2, 4, BS, "float32")


class MemoryStore(PageStore):
    """A minimal real page store: pages in a dict, in this process's memory."""

    medium = Medium.DISK

    def __init__(self, layout: KVLayout, config: object, *,
                 listener: RecordingListener | None = None) -> None:
        super().__init__(layout, listener=listener)
        self.config = config
        self.pages: dict[int, bytes] = {}
        self.closed = False

    async def put(self, items: Sequence[tuple[int, Buffer]], *,
                  parents: Sequence[int | None] | None = None) -> list[bool]:
        views = [(k, self._check_payload(k, b)) for k, b in items]  # all checked first
        for k, mv in views:
            self.pages.setdefault(k, mv.tobytes())
            self._stats.puts += 1
        return [True] * len(views)

    async def get(self, items: Sequence[tuple[int, Buffer]]) -> list[bool]:
        out = []
        for k, buf in items:
            mv = self._check_payload(k, buf)
            page = self.pages.get(k)
            self._stats.gets += 1
            if page is None:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
                mv[:] = page
            out.append(page is not None)
        return out

    async def exists(self, keys: Sequence[int]) -> list[bool]:
        return [k in self.pages for k in keys]

    async def delete(self, keys: Sequence[int]) -> int:
        return sum(self.pages.pop(k, None) is not None for k in keys)

    async def keys(self) -> list[int]:
        return list(self.pages)

    @property
    def capacity_bytes(self) -> int | None:
        return None

    @property
    def used_bytes(self) -> int:
        return len(self.pages) * self.page_bytes

    async def close(self) -> None:
        self.closed = True


#: Every store the test openers made, so a test can look at the one the manager opened.
OPENED: list[MemoryStore] = []


async def open_memory(layout: KVLayout, config: object, *,
                      listener: RecordingListener | None = None) -> MemoryStore:
    store = MemoryStore(layout, config, listener=listener)
    OPENED.append(store)
    return store


@dataclasses.dataclass(frozen=True)
class MemoryTierConfig:
    name: str = "mem"


@dataclasses.dataclass(frozen=True)
class MemoryDiskConfig(DiskTierConfig):
    """A config the manager takes as its disk tier (it is a DiskTierConfig), opened by the
    application's own kind: its exact type is registered, so the built-in disk kind that its
    base class belongs to does not open it."""


@pytest.fixture
def kinds() -> Iterator[list[str]]:
    """Names to unregister after the test, so no test leaks a kind into another."""
    names: list[str] = []
    OPENED.clear()
    yield names
    for n in names:
        unregister_tier(n)


def test_builtin_kinds_are_registered_lazily() -> None:
    kinds = registered_tiers()
    assert list(kinds)[:3] == ["disk", "s3", "gcs"]
    assert kinds["disk"].medium is Medium.DISK and kinds["disk"].extra == "disk"
    assert kinds["s3"].medium is Medium.OBJECT and "boto3" in kinds["s3"].requires
    assert kinds["gcs"].medium is Medium.OBJECT and kinds["gcs"].extra == "gcs"
    assert all(isinstance(k.opener, str) for k in kinds.values())  # imported on open only


def test_disk_config_opens_a_disk_store(tmp_path) -> None:
    async def main() -> None:
        cfg = DiskTierConfig(tmp_path / "g3", capacity_bytes=1 << 22, slab_bytes=1 << 20)
        store = await open_store(cfg, TEST_LAYOUT, RecordingListener())
        try:
            assert isinstance(store, DiskStore)
        finally:
            await store.close()

    asyncio.run(main())


def test_unknown_config_names_the_registered_kinds() -> None:
    with pytest.raises(ConfigError, match=r"MemoryTierConfig.*disk, s3, gcs"):
        asyncio.run(open_store(MemoryTierConfig(), TEST_LAYOUT, RecordingListener()))
    with pytest.raises(ConfigError, match="not a tier config: int"):
        tier_kind(3)


def test_a_registered_kind_opens_through_open_store(kinds: list[str]) -> None:
    register_tier("memory", MemoryTierConfig, Medium.DISK, open_memory)
    kinds.append("memory")
    cfg = MemoryTierConfig()
    store = asyncio.run(open_store(cfg, TEST_LAYOUT, RecordingListener()))
    assert isinstance(store, MemoryStore) and store.config is cfg
    assert len(OPENED) == 1 and OPENED[0] is store

    @dataclasses.dataclass(frozen=True)
    class Derived(MemoryTierConfig):
        pass

    # No kind of its own: the nearest registered base class in its MRO opens it.
    assert tier_kind(Derived()).name == "memory"


def test_a_kind_named_by_module_and_attribute_is_imported_on_open(kinds: list[str]) -> None:
    register_tier("memory", MemoryTierConfig, Medium.DISK, f"{__name__}:MemoryStore")
    kinds.append("memory")
    store = asyncio.run(open_store(MemoryTierConfig(), TEST_LAYOUT, RecordingListener()))
    assert type(store) is MemoryStore  # a class is an opener too (not awaitable)


def test_a_store_of_another_medium_is_refused_and_closed(kinds: list[str]) -> None:
    register_tier("memory", MemoryTierConfig, Medium.OBJECT, open_memory)
    kinds.append("memory")
    with pytest.raises(ConfigError, match="opened a DISK store, registered as OBJECT"):
        asyncio.run(open_store(MemoryTierConfig(), TEST_LAYOUT, RecordingListener()))
    assert [s.closed for s in OPENED] == [True]


def test_registration_is_checked_and_changes_nothing_when_refused(kinds: list[str]) -> None:
    before = registered_tiers()
    with pytest.raises(ConfigError, match="already registered"):
        register_tier("disk", MemoryTierConfig, Medium.DISK, open_memory)
    with pytest.raises(ConfigError, match="already the config of tier kind 'disk'"):
        register_tier("memory", DiskTierConfig, Medium.DISK, open_memory)
    for bad in [dict(name="no name"), dict(config_type=MemoryTierConfig()),
                dict(medium=Medium.CPU_PINNED), dict(medium="DISK"),
                dict(opener="no_colon"), dict(opener="mod:"), dict(opener=3),
                dict(extra=""), dict(requires=["lmdb"], extra="x"),
                dict(requires=("lmdb",))]:
        args = {"name": "memory", "config_type": MemoryTierConfig, "medium": Medium.DISK,
                "opener": open_memory, **bad}
        with pytest.raises(InvalidArgumentError):
            register_tier(**args)  # type: ignore[arg-type]
    assert registered_tiers() == before
    with pytest.raises(ConfigError, match="no tier kind 'memory'"):
        unregister_tier("memory")


def test_an_application_kind_serves_a_block_manager(tmp_path, kinds: list[str]) -> None:
    register_tier("memory_disk", MemoryDiskConfig, Medium.DISK, open_memory)
    kinds.append("memory_disk")
    disk = MemoryDiskConfig(tmp_path / "unused", capacity_bytes=1 << 22)
    cfg = ManagerConfig(device=DeviceTierConfig(4, device="cpu"), host=HostTierConfig(8),
                        disk=disk)
    tokens = np.arange(3 * BS, dtype=np.uint32)
    with BlockManager(LAYOUT, cfg) as mgr:
        (store,) = OPENED
        m = mgr.match_prefix(tokens)
        new = mgr.allocate(len(m.hashes))
        for i, b in enumerate(new):
            mgr.block_view(b).fill_(float(i + 1))
        mgr.release(mgr.commit(new, tokens, hashes=m.hashes))
        mgr.flush()
        assert sorted(store.pages) == sorted(m.hashes.sequence)
        for i, h in enumerate(m.hashes.sequence):
            page = np.frombuffer(store.pages[h], dtype=np.float32)
            assert (page == float(i + 1)).all()
    assert store.closed and not (tmp_path / "unused").exists()  # the disk kind never ran
