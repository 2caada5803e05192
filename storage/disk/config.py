"""Configuration of the G3 local-disk tier."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from kvbm.errors import ConfigError
from kvbm.storage.confcheck import check_choice, check_path

#: Same default as every other tier (kvbm.config.DEFAULT_EVICTION); repeated here so that
#: this module does not import the manager's config.
DEFAULT_EVICTION = "lineage"


class Durability(enum.Enum):
    """What "``put`` returned" promises about a page."""

    #: Pages and index are fsync'ed before ``put`` returns: they survive power loss.
    POWER_LOSS = "power_loss"
    #: Written to the kernel (page cache or device) but not flushed: they survive
    #: ``kill -9`` of the process, not a crash of the machine. Faster on slow-fsync disks.
    PROCESS_CRASH = "process_crash"


@dataclass(frozen=True)
class DiskTierConfig:
    """G3: pages in preallocated slab files on a local disk, indexed in lmdb."""

    #: Directory of the store (created if missing; must be empty or a kvbm disk store).
    path: Path | str
    #: Disk space the slab files may take, headers and alignment included. The store's
    #: ``capacity_bytes`` (payload bytes) is a little less: see ``DiskStore.capacity_bytes``.
    capacity_bytes: int
    #: Size of one slab file. Slabs are created (and preallocated) as the store fills.
    slab_bytes: int = 1 << 30
    #: Eviction policy name (``kvbm.policies.make_eviction``).
    eviction: str = DEFAULT_EVICTION
    #: Admission policy name (``kvbm.policies.make_admission``); ``None`` admits every page.
    admission: str | None = None
    #: ``None``: use O_DIRECT where the filesystem accepts it, buffered I/O elsewhere.
    #: ``True``: require O_DIRECT (an error where unsupported). ``False``: buffered I/O.
    direct_io: bool | None = None
    durability: Durability = Durability.POWER_LOSS
    #: Threads doing blocking I/O (reads, writes, fsync, index commits).
    io_threads: int = 4
    #: Largest single read or write (a run of adjacent slots); bigger batches are split
    #: into chunks that run in parallel on the I/O threads.
    io_chunk_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)):
            raise ConfigError(f"disk.path must be a non-empty path, got {self.path!r}")
        check_path("disk", "path", self.path)  # opening it would raise UnicodeEncodeError
        for name in ("capacity_bytes", "slab_bytes", "io_threads", "io_chunk_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"disk.{name} must be an int > 0, got {value!r}")
        if not isinstance(self.eviction, str):
            raise ConfigError(f"disk.eviction must be a policy name, got {self.eviction!r}")
        if self.admission is not None and not isinstance(self.admission, str):
            raise ConfigError(f"disk.admission must be a policy name or None, "
                              f"got {self.admission!r}")
        if isinstance(self.admission, str) and self.admission.strip().lower() in ("", "none"):
            # One spelling of "admit everything", as for host.admission (kvbm.config).
            object.__setattr__(self, "admission", None)
        if self.direct_io not in (None, True, False):
            raise ConfigError(f"disk.direct_io must be true, false or unset, "
                              f"got {self.direct_io!r}")
        if isinstance(self.durability, str):
            check_choice("disk", "durability", self.durability, [d.value for d in Durability])
            object.__setattr__(self, "durability", Durability(self.durability))
        if not isinstance(self.durability, Durability):
            raise ConfigError(f"disk.durability must be a Durability, got {self.durability!r}")

    @property
    def root(self) -> Path:
        return Path(self.path)
