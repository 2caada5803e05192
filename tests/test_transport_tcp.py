"""The tcp transport backend: the conformance suite with the serving agent in this process
and in a process of its own, plus what is particular to tcp (splitting across connections,
CUDA staging where a GPU is present)."""

from __future__ import annotations

from pathlib import Path

from kvbm.testing.transports import PeerMode, TransportTests

PEER = Path(__file__).with_name("transport_peer.py")


class TestTcpThreads(TransportTests):
    backend = "tcp"
    mode = PeerMode.THREAD


class TestTcpProcesses(TransportTests):
    backend = "tcp"
    mode = PeerMode.PROCESS
    peer_script = PEER
