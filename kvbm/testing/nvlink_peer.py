"""A transport agent holding CUDA and host regions, for the two-process nvlink tests and
bench/nvlink_check.py.

``python -m kvbm.testing.nvlink_peer CONFIG_JSON`` starts an agent named ``prefill`` with the
``[transport]`` settings CONFIG_JSON and answers one JSON command per line on stdin (one
JSON answer per line on stdout) until stdin closes::

    {"cmd": "address"}                                        -> [host, port]
    {"cmd": "register", "name", "size", "device", "seed"}     -> region id
    {"cmd": "read", "name", "offset", "length"}               -> base64 of the bytes
    {"cmd": "stats"}                                          -> the agent's event counters
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from kvbm.transports import ALL_PEERS, Agent, TransportConfig


def pattern(seed: int, size: int, device: str) -> Any:
    import torch  # lazily: kvbm's modules import without torch

    g = torch.Generator().manual_seed(seed)
    host = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)
    if device == "cuda":
        return host.to("cuda")
    return host.pin_memory() if torch.cuda.is_available() else host


def main(config_json: str) -> None:
    import torch

    torch.cuda.is_available()  # nvlink is advertised only when torch sees CUDA at start
    agent = Agent("prefill", TransportConfig.from_mapping(json.loads(config_json)))
    regions: dict[str, Any] = {}
    try:
        for line in sys.stdin:
            req = json.loads(line)
            cmd = req["cmd"]
            out: Any
            if cmd == "address":
                out = list(agent.address)
            elif cmd == "register":
                t = regions[req["name"]] = pattern(req["seed"], req["size"], req["device"])
                out = agent.register(t, name=req["name"], expose_to=ALL_PEERS).id
            elif cmd == "read":
                t = regions[req["name"]]
                torch.cuda.synchronize()
                data = t[req["offset"]:req["offset"] + req["length"]].cpu().numpy().tobytes()
                out = base64.b64encode(data).decode()
            elif cmd == "sync":  # every copy into our memory has landed
                torch.cuda.synchronize()
                out = True
            elif cmd == "stats":
                out = dict(agent.stats.snapshot().events)
            else:
                out = None
            sys.stdout.write(json.dumps({"ok": out}) + "\n")
            sys.stdout.flush()
    finally:
        agent.close()


if __name__ == "__main__":
    main(sys.argv[1])
