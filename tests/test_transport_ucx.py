"""The ucx transport backend (ucxx): the conformance suite with the serving agent in this
process and in a process of its own, over UCX's default transports (shared memory and
cross-memory attach on one host) and over its tcp on loopback, plus what is particular to
ucx. Skipped where ucxx is not installed (``pip install 'kvtier[ucx]'``)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvbm.testing.transports import PeerMode, TransportTests

# Not importorskip: importing ucxx here would load UCX before the backend sets its log
# destination (stderr, not stdout).
if importlib.util.find_spec("ucxx") is None:
    pytest.skip("the ucx backend needs ucxx (kvtier[ucx])", allow_module_level=True)

PEER = Path(__file__).with_name("transport_peer.py")


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing but 127.0.0.1 in tests (peer processes inherit the environment).
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    monkeypatch.setenv("UCX_WARN_UNUSED_ENV_VARS", "n")


class TestUcxThreads(TransportTests):
    backend = "ucx"
    mode = PeerMode.THREAD


class TestUcxProcesses(TransportTests):
    backend = "ucx"
    mode = PeerMode.PROCESS
    peer_script = PEER


class TestUcxTcpProcesses(TransportTests):
    """UCX held to its tcp transport on loopback (what it uses between hosts without
    RDMA)."""

    backend = "ucx"
    mode = PeerMode.PROCESS
    peer_script = PEER

    @pytest.fixture(autouse=True)
    def _tcp_only(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        monkeypatch.setenv("UCX_TLS", "tcp")
        yield
        assert os.environ["UCX_TLS"] == "tcp"
