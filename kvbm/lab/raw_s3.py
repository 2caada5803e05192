"""The raw S3 ceiling of the bandwidth measurements (kvbm.lab.bandwidth): one large object
put and got with plain boto3 calls, what a G4 tier over the same endpoint can approach."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm.errors import StorageError

if TYPE_CHECKING:
    from kvbm.storage.s3 import S3TierConfig


@dataclass(frozen=True)
class RawThroughput:
    """Raw boto3 transfer of one large object: what a tier over this endpoint can approach."""

    nbytes: int
    put_gbps: float  # GB/s (10**9 bytes per second)
    get_gbps: float


def measure_raw_s3(config: S3TierConfig, *, nbytes: int = 64 << 20, repeats: int = 3,
                   client: Any = None) -> RawThroughput:
    """Put and get one ``nbytes`` object with plain boto3 calls (best of ``repeats``), under
    ``config``'s bucket and prefix, and delete it afterwards."""
    from kvbm.storage.s3 import make_client

    client = client if client is not None else make_client(config)
    key = f"{config.key_prefix}raw-ceiling-{uuid.uuid4().hex}"
    body = os.urandom(nbytes)
    best_put = best_get = float("inf")
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.put_object(Bucket=config.bucket, Key=key, Body=body)
            best_put = min(best_put, time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = client.get_object(Bucket=config.bucket, Key=key)["Body"].read()
            best_get = min(best_get, time.perf_counter() - t0)
            if len(got) != nbytes:
                # A short read is a broken transfer, never a figure.
                raise StorageError(f"raw get returned {len(got)} of {nbytes} bytes")
    finally:
        client.delete_object(Bucket=config.bucket, Key=key)
    return RawThroughput(nbytes, nbytes / best_put / 1e9, nbytes / best_get / 1e9)
