"""A transport agent in a process of its own, for the two-process transport tests.

``python transport_peer.py NAME CONFIG_JSON`` starts an :class:`kvbm.transports.Agent` named
NAME with the ``[transport]`` settings CONFIG_JSON and answers the commands of
:class:`kvbm.testing.transport_sides.ProcessSide` on stdin/stdout (one JSON object per line)
until stdin closes.
"""

from __future__ import annotations

import logging
import sys

from kvbm.testing.transport_sides import serve_commands

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="peer %(name)s %(levelname)s %(message)s")
    serve_commands(sys.argv[1], sys.argv[2])
