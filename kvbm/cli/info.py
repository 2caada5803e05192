"""``kvbm info``: the environment (torch, CUDA, native hashing)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _run(_: argparse.Namespace) -> int:
    import numpy
    import torch

    from kvbm import __version__
    from kvbm.hashing import _accel

    print(f"kvbm {__version__}")
    print(f"python {sys.version.split()[0]}, numpy {numpy.__version__}, torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    print(f"cuda: {cuda}" + (f" ({torch.cuda.get_device_name(0)})" if cuda else
                            " (G1 runs on a CPU tensor, G2 is not pinned)"))
    print(f"native hashing: {'yes' if _accel is not None else 'no (pure-Python fallback)'}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="environment: torch, CUDA, native hashing")
    p.set_defaults(fn=_run)
