"""The exit flush: managers left open are flushed and closed when the interpreter exits."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvbm.manager import BlockManager

log = logging.getLogger("kvbm.manager")


class ExitFlush:
    """Flushes and closes, when the interpreter exits, the managers with tiers below host
    memory that were not closed (see "Durability" in :class:`BlockManager`). Managers are
    held weakly: registering one does not keep it alive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._managers: weakref.WeakSet[BlockManager] = weakref.WeakSet()
        self._hooked = False

    def add(self, mgr: BlockManager) -> None:
        with self._lock:
            if not self._hooked:
                self._hooked = self._hook()
            if self._hooked:
                self._managers.add(mgr)

    def discard(self, mgr: BlockManager) -> None:
        with self._lock:
            self._managers.discard(mgr)

    def managers(self) -> list[BlockManager]:
        with self._lock:
            return list(self._managers)

    def _hook(self) -> bool:
        # The tiers do blocking I/O on thread pools, and concurrent.futures shuts every pool
        # down as the interpreter starts to exit, in a threading exit hook; a pool refuses
        # work afterwards ("cannot schedule new futures after shutdown"), and a plain atexit
        # handler runs later still. Threading exit hooks run last-registered first: ours,
        # registered once concurrent.futures.thread has registered its own, runs while the
        # pools (and the offload loop, a daemon thread) still work.
        import concurrent.futures.thread  # noqa: F401 - its exit hook must come first

        register = getattr(threading, "_register_atexit", None)
        try:
            if register is not None:
                register(self._run)
            else:  # pragma: no cover - interpreters without it: best effort
                atexit.register(self._run)
        except RuntimeError:  # the interpreter is already exiting
            return False
        if hasattr(os, "register_at_fork"):
            # A forked child owns none of its parent's managers (their threads are not
            # there); it must not try to flush them when it exits.
            os.register_at_fork(after_in_child=self._forget_all)
        return True

    def _forget_all(self) -> None:
        self._lock = threading.Lock()
        self._managers = weakref.WeakSet()

    def _run(self) -> None:
        for mgr in self.managers():
            try:
                mgr._close_at_exit()
            except BaseException:  # one manager's failure must not stop the others' flush
                log.exception("kvbm: closing a BlockManager at exit failed")


exit_flush = ExitFlush()
