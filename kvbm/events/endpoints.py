"""ZMQ endpoints as vLLM reads them: which to bind, and the port of each data-parallel rank."""

from __future__ import annotations

from kvbm.errors import ConfigError

__all__ = ["is_bind_endpoint", "offset_endpoint"]


def is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: wildcards, ``::``, ipc and inproc endpoints are bound, others connected."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def offset_endpoint(endpoint: str, rank: int) -> str:
    """vLLM's rule for data-parallel ranks: tcp port + rank (a port 0 or ``*`` stays),
    ``_dp<rank>`` appended to ipc/inproc names; rank 0 keeps the endpoint."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        if not port.isdigit() or int(port) == 0:
            return endpoint
        if int(port) + rank > 65535:
            raise ConfigError(f"events endpoint {endpoint!r} offset by data_parallel_rank "
                              f"{rank} is past port 65535")
        return f"{base}:{int(port) + rank}"
    return f"{endpoint}_dp{rank}"
