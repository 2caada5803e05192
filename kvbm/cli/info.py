"""``kvbm info``: the environment (torch, CUDA, native hashing, optional extras).

Works on a core install: torch and the extras' packages are looked for, not required.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from typing import Any

#: (extra, distribution, module, what it enables), in the order ``kvbm info`` lists them.
_EXTRAS = (
    ("disk", "lmdb", "lmdb", "G3 disk tier; index of the G4 tiers"),
    ("s3", "boto3", "boto3", "G4 on S3"),
    ("gcs", "google-cloud-storage", "google.cloud.storage", "G4 on GCS"),
    ("metrics", "prometheus-client", "prometheus_client", "Prometheus metrics"),
)


def _version(dist: str, module: str) -> str | None:
    """The installed version of ``dist`` if ``module`` can be imported, else ``None``."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):  # a missing parent package, or a broken module
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def _torch_lines() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["torch: not installed. Hashing, events, config and this command work without "
                "it; BlockManager and the G1/G2 tiers need it: pip install 'kvtier[engine]'"]
    cuda = torch.cuda.is_available()
    return [f"torch: {torch.__version__}",
            f"cuda: {cuda}" + (f" ({torch.cuda.get_device_name(0)})" if cuda else
                               " (G1 runs on a CPU tensor, G2 is not pinned)")]


def _run(_: argparse.Namespace) -> int:
    import numpy

    from kvbm import __version__
    from kvbm.hashing import _accel

    print(f"kvbm {__version__}")
    print(f"python {sys.version.split()[0]}, numpy {numpy.__version__}")
    print(f"native hashing: {'yes' if _accel is not None else 'no (pure-Python fallback)'}")
    for line in _torch_lines():
        print(line)
    print("extras:")
    for extra, dist, module, purpose in _EXTRAS:
        version = _version(dist, module)
        state = version if version else f"not installed (pip install 'kvtier[{extra}]')"
        print(f"  {dist}: {state}; {purpose}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="environment: torch, CUDA, native hashing, extras")
    p.set_defaults(fn=_run)
