"""Path selection: which backend carries a transfer, and why not the others.

Each agent publishes the backends it runs (the ``backends`` map of its metadata). The
candidates for a transfer are the backends *both* agents run, most preferred first (by
rank: ``nvlink`` 30 > ``ucx`` 20 > ``tcp`` 10); the first one whose ``can_carry`` accepts
this transfer is chosen (nvlink: same node, GPU memory on this side; ucx: CUDA memory only
where UCX reaches it). ``require`` makes one backend the only candidate: when it cannot
carry the transfer the caller gets :class:`~kvbm.errors.BackendUnavailableError` saying
why, never a silent fallback to another.

The choice is visible: on the handle (``TransferHandle.backend``), in the agent's
counters (``Agent.stats``: transfers and bytes per backend, and ``path_fallbacks``: a
transfer that went to a lower-ranked backend because a better common one could not carry
it), in the log (INFO, once per peer and backend, and once per peer and fallback reason),
and through :func:`explain`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm.errors import BackendUnavailableError
from kvbm.transports.config import KNOWN_BACKENDS
from kvbm.transports.descriptors import Op, Segment, check_descriptors

if TYPE_CHECKING:
    from kvbm.transports.agent import Agent, Peer
    from kvbm.transports.backend import Backend
    from kvbm.transports.metadata import PeerInfo

log = logging.getLogger(__name__)

_logged: set[tuple[str, str, str]] = set()
_logged_lock = threading.Lock()
#: Distinct (peer, backend, reason) fallbacks logged per process at most (then counted only).
_MAX_LOGGED = 1024


@dataclass(frozen=True)
class PathOption:
    """One backend as a path for a transfer: chosen, usable, or why not."""

    backend: str
    usable: bool
    chosen: bool
    #: Why it cannot carry the transfer (``None`` when it can).
    reason: str | None = None


def common(local: Iterable[str], peer: PeerInfo) -> list[str]:
    """The backends both this agent (``local``) and ``peer`` run, most preferred first."""
    mine = set(local)
    return [n for n in KNOWN_BACKENDS if n in mine and n in peer.backends]


def options(backends: Mapping[str, Backend], peer: PeerInfo, op: Op,
            segments: list[Segment], require: str | None = None) -> list[PathOption]:
    """Every known backend for this transfer, most preferred first, with why it cannot
    carry it; the first usable one (or ``require``, if usable) is marked chosen."""
    out: list[PathOption] = []
    chosen = False
    for name in KNOWN_BACKENDS:  # the order of preference (their ranks agree)
        b = backends.get(name)
        if b is None:
            why: str | None = "not running on this agent"
        elif name not in peer.backends:
            why = f"{peer.name} does not run it"
        else:
            why = b.can_carry(peer, op, segments)
        pick = why is None and not chosen and require in (None, name)
        chosen = chosen or pick
        out.append(PathOption(name, why is None, pick, why))
    return out


def choose(backends: Mapping[str, Backend], peer: PeerInfo, op: Op, segments: list[Segment],
           require: str | None, *, count: Callable[[str, int], None] | None = None
           ) -> Backend:
    """The backend for a transfer (see the module); :class:`BackendUnavailableError`
    naming every candidate's reason when none can carry it. ``count(event, n)`` is told
    of fallbacks (``path_fallbacks``)."""
    names = [require] if require is not None else sorted(
        backends, key=lambda n: -backends[n].rank)
    passed: list[tuple[str, str]] = []
    for name in names:
        b = backends.get(name)
        if b is None:
            passed.append((name, "not running on this agent"))
            continue
        if name not in peer.backends:
            passed.append((name, f"{peer.name} does not run it"))
            continue
        why = b.can_carry(peer, op, segments)
        if why is None:
            if passed and require is None:
                _fallback(peer.name, name, passed, count)
            return b
        passed.append((name, why))
    what = f"backend {require!r}" if require is not None else "a backend"
    raise BackendUnavailableError(
        f"no path to {peer.name} with {what}: "
        f"{'; '.join(f'{n}: {w}' for n, w in passed) or 'none running'}")


def explain(agent: Agent, peer: Peer | str, op: Op, descs: Any,
            require: str | None = None) -> list[PathOption]:
    """What :meth:`Agent.transfer` would choose for these arguments, and why not each
    other backend (nothing is moved)."""
    name = peer if isinstance(peer, str) else peer.name
    info = next((p.info for p in agent.peers() if p.name == name), None)
    if info is None:
        raise BackendUnavailableError(f"not connected to a peer {name!r}")
    mine = {id(r) for r in agent.regions()}
    segs = check_descriptors(op, list(descs), is_local=lambda r: id(r) in mine)
    return options(agent.backends, info, op, segs, require)


def _fallback(peer: str, chosen: str, passed: list[tuple[str, str]],
              count: Callable[[str, int], None] | None) -> None:
    # Only common backends that could not carry the transfer make it a fallback: one the
    # peer does not run at all is the ordinary case of a smaller intersection.
    skipped = [(n, w) for n, w in passed if not (w.endswith("does not run it")
                                                 or w == "not running on this agent")]
    if not skipped:
        return
    if count is not None:
        count("path_fallbacks", 1)
    reason = "; ".join(f"{n}: {w}" for n, w in skipped)
    key = (peer, chosen, reason)
    with _logged_lock:
        if key in _logged or len(_logged) >= _MAX_LOGGED:
            return
        _logged.add(key)
    log.info("transfers with %s fall back to %s (%s)", peer, chosen, reason)
