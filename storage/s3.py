"""G4 on S3 (or any S3-compatible server) through boto3.

Endpoint, region and credentials come from boto3's usual chain unless the config names
them: ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID`` ..., shared config files,
instance roles. boto3 is imported lazily (extra ``kvtier[s3]``).

botocore's own retries are switched off (one attempt per request): retries, backoff and the
circuit breaker are kvbm's (storage/resilience.py), so that their bounds are the only ones.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from kvbm.errors import ConfigError
from kvbm.layout import KVLayout
from kvbm.storage.base import TierListener, check_store_args
from kvbm.storage.confcheck import check_choice, check_s3_bucket, check_text, check_url
from kvbm.storage.objectstore import ObjectBackend, ObjectTierConfig, PackedObjectStore
from kvbm.storage.resilience import FaultKind

if TYPE_CHECKING:
    from collections.abc import Mapping

_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_EXISTS_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                           "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "403"})
_REGION_CODES = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed",
                           "IllegalLocationConstraintException", "301"})
_TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                              "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                              "RequestLimitExceeded", "BadDigest", "XAmzContentSHA256Mismatch"})


@dataclass(frozen=True, kw_only=True)
class S3TierConfig(ObjectTierConfig):
    """Where and how the S3 tier stores its packs."""

    bucket: str
    #: ``None``: boto3 decides (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, AWS itself).
    endpoint_url: str | None = None
    #: ``None``: boto3 decides (``AWS_REGION``, ``AWS_DEFAULT_REGION``, config files).
    region: str | None = None
    #: A named profile of ~/.aws/config; ``None``: ``AWS_PROFILE`` or the default chain.
    profile: str | None = None
    #: ``"auto"``, ``"virtual"`` or ``"path"`` (S3-compatible servers often need path).
    addressing_style: str = "auto"

    section: ClassVar[str] = "s3"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_s3_bucket(self.bucket)
        check_url("s3", "endpoint_url", self.endpoint_url)
        check_text("s3", "region", self.region, optional=True, empty=False)
        check_text("s3", "profile", self.profile, optional=True, empty=False)
        check_choice("s3", "addressing_style", self.addressing_style,
                     ("auto", "virtual", "path"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> S3TierConfig:
        """``KVBM_S3_BUCKET`` and ``KVBM_S3_PREFIX`` (the rest is boto3's own environment);
        keyword arguments override."""
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        if "KVBM_S3_BUCKET" in env:
            kw["bucket"] = env["KVBM_S3_BUCKET"]
        if "KVBM_S3_PREFIX" in env:
            kw["prefix"] = env["KVBM_S3_PREFIX"]
        kw.update(overrides)
        if "bucket" not in kw:
            raise ConfigError("no S3 bucket: set KVBM_S3_BUCKET or pass bucket=")
        return cls(**kw)


# boto3 sessions by (profile, region). A session caches the parsed service model, and
# parsing it again costs ~0.2 s per new client; sessions are not thread-safe, hence the lock.
_sessions: dict[tuple[str | None, str | None], Any] = {}
_sessions_lock = threading.Lock()


def make_client(config: S3TierConfig) -> Any:
    """A boto3 S3 client for ``config``: timeouts set, botocore retries off."""
    import boto3
    from botocore.config import Config

    with _sessions_lock:
        session = _sessions.get((config.profile, config.region))
        if session is None:
            session = boto3.session.Session(profile_name=config.profile,
                                            region_name=config.region)
            _sessions[(config.profile, config.region)] = session
        return session.client("s3", endpoint_url=config.endpoint_url, config=Config(
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            retries={"total_max_attempts": 1},
            max_pool_connections=config.max_workers + 2,
            s3={"addressing_style": config.addressing_style},
            # Ranged GETs carry no checksum of their bytes; asking for one would make
            # botocore compare a part against the whole object's checksum. Pages carry
            # their own (xxh3-128), checked on every read.
            response_checksum_validation="when_required",
        ))


class S3Backend(ObjectBackend):
    def __init__(self, config: S3TierConfig, client: Any = None) -> None:
        self.config = config
        self.bucket = config.bucket
        self._client = client if client is not None else make_client(config)
        self.location = f"s3://{config.bucket} @ {self._client.meta.endpoint_url}"
        from botocore import exceptions as bex

        self._bex = bex
        # Connection-level failures worth another attempt (all botocore.exceptions).
        self._transient: tuple[type[BaseException], ...] = (
            bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError,
            bex.ResponseStreamingError, bex.ReadTimeoutError, bex.ConnectTimeoutError,
            bex.FlexibleChecksumError, ConnectionError, TimeoutError)

    def put(self, key: str, data: bytearray, *, create_only: bool) -> None:
        extra = {"IfNoneMatch": "*"} if create_only else {}
        self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)

    def read(self, key: str, offset: int, length: int, *, whole: bool) -> bytes:
        if length <= 0:
            return b""
        try:
            if whole:
                resp = self._client.get_object(Bucket=self.bucket, Key=key)
            else:
                resp = self._client.get_object(Bucket=self.bucket, Key=key,
                                               Range=f"bytes={offset}-{offset + length - 1}")
            # botocore checks the body against Content-Length: a cut transfer raises.
            data: bytes = resp["Body"].read()
        except self._bex.ClientError as e:
            if _code(e) in ("InvalidRange", "416"):
                return b""  # the object ends before offset: it is shorter than indexed
            raise
        return data[:length]

    def size(self, key: str) -> int:
        return int(self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])

    def check(self, prefix: str) -> None:
        # A listing, not HeadBucket: it needs the permission the tier needs anyway
        # (s3:ListBucket, for the index rebuild), and says NoSuchBucket in words.
        self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)

    def explain(self, exc: BaseException) -> str:
        where = f"bucket {self.bucket!r} at {self._client.meta.endpoint_url}"
        if isinstance(exc, self._bex.NoCredentialsError):
            return (f"no AWS credentials found for {where}: set AWS_ACCESS_KEY_ID and "
                    f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the tier's profile, or run with "
                    f"an instance role")
        if isinstance(exc, self._bex.ClientError):
            code = _code(exc)
            status = _status(exc)
            if code == "NoSuchBucket":
                return (f"{where} does not exist: create it, or point the tier's bucket "
                        f"(KVBM_S3_BUCKET) or endpoint_url at the right one")
            if code in _DENIED_CODES or status == 403:
                return (f"access to {where} is denied ({code}): check the credentials, and "
                        f"that they may list, read, write and delete objects in it")
            if code in _REGION_CODES or status == 301:
                return f"{where} is in another region ({code}): set the tier's region"
            return f"{where} refused the request: {code or status} {exc}"
        return f"{where}: {exc!r}"

    def bucket_missing(self, exc: BaseException) -> bool:
        return isinstance(exc, self._bex.ClientError) and _code(exc) == "NoSuchBucket"

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=key)

    def list_versions(self, prefix: str) -> list[tuple[str, int, str]]:
        # The ETag of a single-part upload is the MD5 of its bytes: it changes with them.
        out: list[tuple[str, int, str]] = []
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                         Prefix=prefix)
        for page in pages:
            out.extend((o["Key"], int(o["Size"]), str(o.get("ETag", "")))
                       for o in page.get("Contents", ()))
        return out

    def list(self, prefix: str) -> list[tuple[str, int]]:
        return [(k, n) for k, n, _ in self.list_versions(prefix)]

    def classify(self, exc: BaseException) -> FaultKind:
        if isinstance(exc, self._bex.ClientError):
            code = _code(exc)
            status = _status(exc)
            # 404 is also NoSuchBucket: a misconfiguration, not a missing pack.
            if code in _MISSING_CODES:
                return FaultKind.MISSING
            if code in _EXISTS_CODES or status == 412:
                return FaultKind.EXISTS
            if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
                return FaultKind.TRANSIENT
            return FaultKind.PERMANENT
        if isinstance(exc, self._transient):
            return FaultKind.TRANSIENT
        return FaultKind.PERMANENT

    def close(self) -> None:
        self._client.close()


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


class S3Store(PackedObjectStore):
    """The G4 tier on S3: pages packed into objects under ``s3://bucket/prefix``."""

    def __init__(self, layout: KVLayout, config: S3TierConfig, *,
                 listener: TierListener | None = None, client: Any = None) -> None:
        check_store_args(layout, listener, config, S3TierConfig)  # before any client exists
        super().__init__(layout, S3Backend(config, client), config, listener=listener)

