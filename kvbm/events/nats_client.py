"""nats-py plumbing: an event loop on a thread, connections that retry, the stream and the
pull consumers (names and limits from :class:`~kvbm.events.jetstream.NatsConfig`).

nats-py is asyncio; :class:`LoopThread` runs its client on a thread of its own so that the
synchronous callers (an engine, a CLI) never block on the network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from kvbm.deps import require
from kvbm.events.jetstream import NatsConfig, StreamStorage

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

log = logging.getLogger(__name__)
T = TypeVar("T")


class LoopThread:
    """An asyncio event loop on a daemon thread; coroutines are submitted from any thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait at most ``timeout`` seconds for its result."""
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)


async def connect(config: NatsConfig, name: str) -> NatsClient:
    """A client that reconnects forever (a restarted server is found again), logging its
    disconnects instead of printing them."""
    nats = require("nats", "nats", "NATS JetStream events")

    async def on_error(e: Exception) -> None:
        log.debug("nats %s: %s", name, e)

    async def on_disconnected() -> None:
        log.info("nats %s: disconnected from %s", name, config.url)

    async def on_reconnected() -> None:
        log.info("nats %s: reconnected", name)

    nc: NatsClient = await nats.connect(
        servers=config.servers, name=name, connect_timeout=max(1, math.ceil(config.timeout_s)),
        allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.25,
        error_cb=on_error, disconnected_cb=on_disconnected, reconnected_cb=on_reconnected)
    return nc


async def connect_until(config: NatsConfig, name: str, stop: asyncio.Event,
                        ) -> NatsClient | None:
    """:func:`connect`, tried again until it works (``None`` once ``stop`` is set): a
    publisher or consumer may start before its server."""
    while not stop.is_set():
        attempt = asyncio.ensure_future(connect(config, name))
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({attempt, stopped}, timeout=config.timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if attempt in done and attempt.exception() is None:
            return attempt.result()
        if attempt in done:
            log.debug("nats %s: connect: %s", name, attempt.exception())
            await asyncio.sleep(0.25)
        else:
            # still trying (nats-py retries an unreachable server itself): start over, so
            # that `stop` is seen
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
    return None


async def ensure_stream(js: JetStreamContext, config: NatsConfig) -> None:
    """Create the stream with ``config``'s limits, unless it exists: an existing stream is
    used as it is (its limits are the operator's, or the first creator's; every process
    enforcing its own would make them flip), with a warning where they differ."""
    api = require("nats.js.api", "nats", "NATS JetStream events")
    errors = require("nats.js.errors", "nats", "NATS JetStream events")
    try:
        info = await js.stream_info(config.stream)
    except errors.NotFoundError:
        info = None
    want = {"max_msgs": config.max_msgs or -1, "max_bytes": config.max_bytes or -1,
            "max_age": config.max_age_s, "num_replicas": config.replicas}
    if info is not None:
        have = {k: getattr(info.config, k, None) for k in want}
        if have != want:
            log.warning("nats stream %s exists with limits %s, not the configured %s: kept",
                        config.stream, have, want)
        return
    sc = api.StreamConfig(
        name=config.stream, subjects=[f"{config.subject_prefix}.*"],
        retention=api.RetentionPolicy.LIMITS, discard=api.DiscardPolicy.OLD,
        storage=(api.StorageType.FILE if config.storage is StreamStorage.FILE
                 else api.StorageType.MEMORY),
        duplicate_window=config.duplicate_window_s, **want)
    try:
        await js.add_stream(sc)
    except errors.BadRequestError:
        # made by another process meanwhile (with other settings): theirs stands
        log.info("nats stream %s was created meanwhile by another process", config.stream)


async def bind_pull_consumer(js: JetStreamContext, config: NatsConfig, name: str, *,
                             durable: bool, start_seq: int, fetch: int) -> Any:
    """Make the consumer ``name`` again, delivering every worker's subject from stream
    sequence ``start_seq``, and bind a pull subscription to it.

    Made again every time, not reused: after a restart the position to resume from is the
    router's checkpoint (which is also what the old consumer acknowledged, ack-all), after a
    reconnect it is the last message handled; a kept consumer would send the messages lost in
    flight again only after its ack wait, behind newer ones. A durable one is acknowledged
    (ack-all, after each checkpoint); one that is not needs no acks and is deleted by the
    server after 5 min without a client.
    """
    api = require("nats.js.api", "nats", "JetStream consumers")
    errors = require("nats.js.errors", "nats", "JetStream consumers")
    with contextlib.suppress(errors.NotFoundError):
        await js.delete_consumer(config.stream, name)
    cc = api.ConsumerConfig(
        name=name, durable_name=name if durable else None,
        filter_subject=f"{config.subject_prefix}.*",
        deliver_policy=(api.DeliverPolicy.BY_START_SEQUENCE if start_seq > 1
                        else api.DeliverPolicy.ALL),
        opt_start_seq=start_seq if start_seq > 1 else None,
        ack_policy=api.AckPolicy.ALL if durable else api.AckPolicy.NONE,
        ack_wait=max(30.0, 6 * config.checkpoint_interval_s),
        max_ack_pending=max(4 * config.checkpoint_every, 4 * fetch),
        inactive_threshold=None if durable else 300.0)
    await js.add_consumer(config.stream, config=cc)
    return await js.pull_subscribe_bind(durable=name, stream=config.stream)
