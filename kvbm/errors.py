"""The one error hierarchy of kvbm.

Every class also subclasses the builtin a caller would naturally catch (``ValueError`` for
bad arguments, ``KeyError`` for unknown hashes, ``MemoryError`` for exhausted pools ...), so
code that knows nothing about kvbm still handles them sensibly.
"""

from __future__ import annotations


class KvbmError(Exception):
    """Base class of every error raised on purpose by kvbm."""


class ConfigError(KvbmError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class LayoutError(KvbmError, ValueError):
    """A KV layout is invalid, or a tensor does not match the layout."""


class LayoutMismatchError(LayoutError):
    """Stored data was written under a different layout fingerprint."""


class TokenError(KvbmError, ValueError):
    """Token ids are not a 1-D sequence of unsigned 32-bit integers."""


class BlockIdError(KvbmError, IndexError):
    """A block id is outside the pool."""


class BlockStateError(KvbmError, ValueError):
    """An operation does not fit the block's state (released but not held, committed twice ...)."""


class UnknownBlockError(KvbmError, KeyError):
    """A block hash is not in the index."""


class PoolExhaustedError(KvbmError, MemoryError):
    """No free or evictable page is left in a pool."""


class PolicyError(KvbmError, ValueError):
    """Unknown policy name or invalid policy parameters."""


class StorageError(KvbmError, OSError):
    """A storage tier failed to read or write."""


class CorruptPageError(StorageError):
    """A stored page failed verification (header, length or checksum)."""


class TierUnavailableError(StorageError):
    """A tier is unreachable or its circuit breaker is open."""


class TransferError(KvbmError, RuntimeError):
    """A data movement between tiers or peers failed."""


class InvalidArgumentError(KvbmError, ValueError, TypeError):
    """An argument of a public call has the wrong type, or a value out of range or not finite.

    Subclasses both ``ValueError`` and ``TypeError``: callers that catch either see it."""


class InvalidKeyError(InvalidArgumentError):
    """A page key / block hash is not an int in ``[0, 2**64)``."""


class ClosedError(KvbmError, RuntimeError):
    """The manager, store or engine was closed; nothing was changed."""


class MissingDependencyError(KvbmError, ImportError):
    """An optional dependency (an extra of the ``kvtier`` distribution) is not installed."""


class MetricsError(KvbmError, OSError):
    """A metrics endpoint could not be reached, or did not answer Prometheus text."""


class TokenTypeError(TokenError, InvalidArgumentError):
    """Token ids (or media hashes) of the wrong kind: not a sequence, not integers. Also a
    ``TypeError``, as a caller checking argument types expects."""


class BlockIdTypeError(BlockIdError, InvalidArgumentError):
    """A block id that is not an int: also a ``TypeError`` (and a :class:`BlockIdError`)."""


class EventDecodeError(InvalidArgumentError):
    """Bytes received as a cache event (a ZMQ frame, a msgpack batch, one event in it) are not
    what the wire format (vLLM's KV events) allows."""


class TransportError(TransferError, ConnectionError):
    """A transfer between agents (:mod:`kvbm.transports`) failed on the way: the peer is
    unreachable, went away, or broke the protocol. Also a :class:`TransferError` and a
    ``ConnectionError``."""


class TransportTimeoutError(TransportError, TimeoutError):
    """A peer or a transfer did not answer within its timeout."""


class AuthenticationError(TransportError, PermissionError):
    """The control channel's handshake failed: wrong shared secret, or not the peer asked for."""


class RemoteAccessError(TransportError, PermissionError):
    """A peer refused a descriptor: region not registered, not exposed to this agent, not
    open to this operation, or a range outside it. Nothing was read or written."""


class BackendUnavailableError(TransportError):
    """No transport backend both agents support can carry the transfer (or not the one the
    caller required)."""
