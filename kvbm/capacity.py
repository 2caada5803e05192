"""Will a pool fit? What this machine can still give, checked before G1/G2 are allocated.

A pool too big for the machine used to die inside ``mmap`` or torch with ``ENOMEM`` and no
sizes, or worse, be overcommitted and killed by the OOM killer at its first touch. The pools
call :func:`check_pool_fits` first and wrap their allocation in :func:`allocation_errors`,
so the error says what was asked, what is available, and which setting to lower.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvbm.errors import ConfigError

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
#: cgroup v1 reports "no limit" as a huge number (a page-rounded 2**63 - 1).
_NO_LIMIT = 1 << 60


def format_bytes(n: int | float) -> str:
    """``512 B``, ``4 MiB``, ``20.1 GiB``: binary units, one decimal unless whole."""
    value, unit = float(n), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text} {_UNITS[unit]}"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, *keys: str) -> int:
    """Sum of ``keys`` in a cgroup ``memory.stat`` (0 where absent)."""
    total = 0
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name in keys and value.strip().isdigit():
                total += int(value)
    except OSError:
        pass
    return total


def _cgroup_dirs() -> Iterator[tuple[Path, bool]]:
    """This process's memory cgroup and its ancestors, each with ``True`` for cgroup v2."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            root, v2 = Path("/sys/fs/cgroup"), True
        elif "memory" in controllers.split(","):
            root, v2 = Path("/sys/fs/cgroup/memory"), False
        else:
            continue
        d = root / rel.lstrip("/")
        while True:
            yield d, v2
            if d == root:
                break
            d = d.parent


def _cgroup_room() -> int | None:
    """The least room left under any memory limit of this process's cgroups, counting page
    cache as reclaimable (it is given back before the limit is enforced); ``None``: no limit."""
    room: int | None = None
    for d, v2 in _cgroup_dirs():
        if v2:
            limit, usage = _read_int(d / "memory.max"), _read_int(d / "memory.current")
            cache = _stat(d / "memory.stat", "file")
        else:
            limit = _read_int(d / "memory.limit_in_bytes")
            usage = _read_int(d / "memory.usage_in_bytes")
            cache = _stat(d / "memory.stat", "total_cache")
        if limit is None or usage is None or limit >= _NO_LIMIT:
            continue
        left = max(0, limit - max(0, usage - cache))
        room = left if room is None else min(room, left)
    return room


def host_available_bytes() -> int | None:
    """Host memory this process can still allocate without swapping: ``MemAvailable``
    (Linux), else the free physical pages, capped by a cgroup (container) memory limit;
    ``None`` when the system does not say."""
    avail: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def device_available_bytes(device: Any) -> int | None:
    """Free memory of a CUDA ``torch.device`` (``None`` for other devices)."""
    import torch

    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _asked(tier: str, num_blocks: int, page_bytes: int) -> str:
    return (f"{tier}: {num_blocks} blocks × {format_bytes(page_bytes)} = "
            f"{format_bytes(num_blocks * page_bytes)} asked")


def check_pool_fits(tier: str, num_blocks: int, page_bytes: int, available: int | None,
                    setting: str) -> None:
    """Raise :class:`ConfigError` when ``num_blocks`` pages of ``page_bytes`` exceed
    ``available`` bytes (``None``: unknown, not checked)."""
    if available is not None and num_blocks * page_bytes > available:
        raise ConfigError(f"{_asked(tier, num_blocks, page_bytes)}, "
                          f"{format_bytes(available)} available; lower {setting}")


@contextlib.contextmanager
def allocation_errors(tier: str, num_blocks: int, page_bytes: int, setting: str
                      ) -> Iterator[None]:
    """Turn an allocator's out-of-memory error (``mmap`` ENOMEM, torch's "out of memory",
    ``MemoryError``) into a :class:`ConfigError` with the sizes and the setting to lower."""
    try:
        yield
    except (MemoryError, OSError, RuntimeError) as e:
        raise ConfigError(f"{_asked(tier, num_blocks, page_bytes)} and the allocation failed "
                          f"({type(e).__name__}: {e}); lower {setting}") from e
