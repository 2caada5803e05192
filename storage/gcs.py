"""G4 on Google Cloud Storage through google-cloud-storage.

Credentials, project and endpoint come from the library's usual chain unless the config
names them: Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud,
metadata server), ``GOOGLE_CLOUD_PROJECT``, and ``STORAGE_EMULATOR_HOST`` for an emulator
(the library then also drops authentication). The library is imported lazily (extra
``kvtier[gcs]``).

Integrity: every pack is uploaded with its CRC32C, which GCS checks before it stores the
object, and the library compares the stored object's CRC32C after the upload. Reads that
cover a whole pack are checked against the object's CRC32C too; ranged reads get none from
GCS (it only has the whole object's), and rely on each page's own xxh3-128 (storage/page.py).
The library's own retries are off: kvbm's (storage/resilience.py) bound every call.
"""

from __future__ import annotations

import base64
import importlib
import io
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from kvbm.errors import ConfigError, TierUnavailableError
from kvbm.layout import KVLayout
from kvbm.storage.base import TierListener, check_store_args
from kvbm.storage.confcheck import check_gcs_bucket, check_path, check_text, check_url
from kvbm.storage.objectstore import ObjectBackend, ObjectTierConfig, PackedObjectStore
from kvbm.storage.resilience import FaultKind, check_bool


@dataclass(frozen=True, kw_only=True)
class GCSTierConfig(ObjectTierConfig):
    """Where and how the GCS tier stores its packs."""

    bucket: str
    #: API endpoint (``http://host:port`` of an emulator, or a private endpoint); ``None``:
    #: ``STORAGE_EMULATOR_HOST`` when set, else storage.googleapis.com.
    endpoint: str | None = None
    #: ``None``: the credentials' project or ``GOOGLE_CLOUD_PROJECT``.
    project: str | None = None
    #: A service-account JSON key file; ``None``: Application Default Credentials.
    credentials_file: str | None = None
    #: No authentication at all (emulators, public buckets).
    anonymous: bool = False

    section: ClassVar[str] = "gcs"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_gcs_bucket(self.bucket)
        check_url("gcs", "endpoint", self.endpoint)
        check_text("gcs", "project", self.project, optional=True, empty=False)
        check_path("gcs", "credentials_file", self.credentials_file, optional=True)
        check_bool("gcs", "anonymous", self.anonymous)
        if self.anonymous and self.credentials_file:
            raise ConfigError("gcs.anonymous and gcs.credentials_file exclude each other")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> GCSTierConfig:
        """``KVBM_GCS_BUCKET`` and ``KVBM_GCS_PREFIX`` (the rest is the library's own
        environment); keyword arguments override."""
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        if "KVBM_GCS_BUCKET" in env:
            kw["bucket"] = env["KVBM_GCS_BUCKET"]
        if "KVBM_GCS_PREFIX" in env:
            kw["prefix"] = env["KVBM_GCS_PREFIX"]
        kw.update(overrides)
        if "bucket" not in kw:
            raise ConfigError("no GCS bucket: set KVBM_GCS_BUCKET or pass bucket=")
        return cls(**kw)


def make_client(config: GCSTierConfig) -> Any:
    """A google-cloud-storage client for ``config``."""
    from google.cloud import storage

    credentials: Any = None
    # Modules typed Any: parts of google-auth are untyped, which strict mypy would flag.
    if config.anonymous:
        auth: Any = importlib.import_module("google.auth.credentials")
        credentials = auth.AnonymousCredentials()
    elif config.credentials_file:
        service_account: Any = importlib.import_module("google.oauth2.service_account")
        try:
            credentials = service_account.Credentials.from_service_account_file(
                config.credentials_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"gcs.credentials_file {config.credentials_file!r} is not a "
                              f"readable service-account key: {e}") from None
    options = {"api_endpoint": config.endpoint} if config.endpoint else None
    project = config.project
    if project is None and (config.anonymous or os.environ.get("STORAGE_EMULATOR_HOST")):
        project = "<none>"  # what the library itself uses without a project
    from google.auth.exceptions import DefaultCredentialsError

    try:
        client = storage.Client(project=project, credentials=credentials,
                                client_options=options)
    except DefaultCredentialsError as e:
        raise TierUnavailableError(
            f"no Google credentials for gcs bucket {config.bucket!r}: set "
            f"GOOGLE_APPLICATION_CREDENTIALS or the tier's credentials_file, run `gcloud auth "
            f"application-default login`, or set anonymous = true for an emulator ({e})"
        ) from None
    return without_bucket_lookups(client)


def without_bucket_lookups(client: Any) -> Any:
    """``client`` without google-cloud-storage 3.x's background bucket lookups.

    The library fetches the metadata of every bucket a call names in a thread of its own, to
    label tracing spans, even with tracing off: one more request per bucket, which outlives
    the call and is retried for minutes (with jitter from the global ``random``) when the
    endpoint has gone away. The tier has no use for it. Older versions have no such cache.
    """
    if getattr(client, "_bucket_metadata_cache", None) is not None:
        client._bucket_metadata_cache = None
    return client


def crc32c_b64(data: bytes) -> str:
    """CRC32C as GCS writes it: base64 of the big-endian 4 bytes."""
    crc32c: Any = importlib.import_module("google_crc32c")  # untyped
    return base64.b64encode(crc32c.Checksum(data).digest()).decode("ascii")


class GCSBackend(ObjectBackend):
    def __init__(self, config: GCSTierConfig) -> None:
        self.config = config
        from google.api_core import exceptions as gexc

        self._gexc = gexc
        # One client per transfer thread: the library does not promise thread safety.
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()
        client = self._client()
        self.location = f"gs://{config.bucket} @ {client._connection.API_BASE_URL}"
        self._timeout = (config.connect_timeout_s, config.read_timeout_s)
        self._transient = self._transient_types()

    @staticmethod
    def _transient_types() -> tuple[type[BaseException], ...]:
        import requests
        from google.auth.exceptions import TransportError
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

        return (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError, TransportError, DataCorruption,
                InvalidResponse, ConnectionError, TimeoutError)

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = make_client(self.config)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _blob(self, key: str) -> Any:
        return self._client().bucket(self.config.bucket).blob(key)

    def put(self, key: str, data: bytearray, *, create_only: bool) -> None:
        # The CRC32C travels as object metadata: GCS refuses to store bytes that do not
        # match it, so a pack damaged on the way up never lands. (google_crc32c takes only
        # bytes; BytesIO over bytes shares the buffer, so this is the one copy.)
        body = bytes(data)
        self._blob(key).upload_from_file(
            io.BytesIO(body), size=len(body), content_type="application/octet-stream",
            if_generation_match=0 if create_only else None, checksum="crc32c",
            crc32c_checksum_value=crc32c_b64(body), timeout=self._timeout, retry=None)

    def read(self, key: str, offset: int, length: int, *, whole: bool) -> bytes:
        if length <= 0:
            return b""
        blob = self._blob(key)
        try:
            if whole:
                # The response carries the object's CRC32C; the library checks it and
                # raises DataCorruption on a mismatch (a transient fault: read again).
                data: bytes = blob.download_as_bytes(checksum="crc32c", timeout=self._timeout,
                                                     retry=None)
            else:
                data = blob.download_as_bytes(start=offset, end=offset + length - 1,
                                              checksum=None, timeout=self._timeout,
                                              retry=None)
        except self._gexc.RequestRangeNotSatisfiable:
            return b""  # the object ends before offset: shorter than indexed
        return data[:length]

    def size(self, key: str) -> int:
        blob = self._blob(key)
        blob.reload(timeout=self._timeout, retry=None)  # NotFound when absent
        return int(blob.size or 0)

    def check(self, prefix: str) -> None:
        # A listing, not a bucket lookup: it needs only the permission the tier needs
        # anyway (storage.objects.list, for the index rebuild).
        blobs = self._client().list_blobs(self.config.bucket, prefix=prefix, max_results=1,
                                          timeout=self._timeout, retry=None)
        for _ in blobs:
            break

    def explain(self, exc: BaseException) -> str:
        g = self._gexc
        where = f"bucket {self.config.bucket!r} at {self.location.split(' @ ')[-1]}"
        if isinstance(exc, g.NotFound):
            return (f"{where} does not exist: create it, or point the tier's bucket "
                    f"(KVBM_GCS_BUCKET) or endpoint at the right one")
        if isinstance(exc, g.Forbidden | g.Unauthorized):
            return (f"access to {where} is denied ({exc.code}): check the credentials, and "
                    f"that they may list, read, write and delete objects in it")
        return f"{where}: {exc!r}"

    def bucket_missing(self, exc: BaseException) -> bool:
        # A 404 on an upload or a listing can only be the bucket (objects are not needed);
        # on a read it may be the object, whose message does not name a bucket.
        return isinstance(exc, self._gexc.NotFound) and "bucket" in str(exc).lower()

    def delete(self, key: str) -> None:
        self._blob(key).delete(timeout=self._timeout, retry=None)

    def list_versions(self, prefix: str) -> list[tuple[str, int, str]]:
        # Every write of an object makes a new generation.
        blobs = self._client().list_blobs(self.config.bucket, prefix=prefix,
                                          timeout=self._timeout, retry=None)
        return [(b.name, int(b.size or 0), f"{b.generation or ''}:{b.crc32c or ''}")
                for b in blobs]

    def list(self, prefix: str) -> list[tuple[str, int]]:
        return [(k, n) for k, n, _ in self.list_versions(prefix)]

    def classify(self, exc: BaseException) -> FaultKind:
        g = self._gexc
        if isinstance(exc, g.NotFound):
            return FaultKind.MISSING
        if isinstance(exc, g.PreconditionFailed):
            return FaultKind.EXISTS
        if isinstance(exc, g.GoogleAPICallError):
            code = int(exc.code or 0)
            # 408 request timeout, 429 rate limit, 5xx: the server may do better next time.
            return FaultKind.TRANSIENT if code >= 500 or code in (408, 429) \
                else FaultKind.PERMANENT
        if isinstance(exc, self._transient):
            return FaultKind.TRANSIENT
        return FaultKind.PERMANENT

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for c in clients:
            c.close()


class GCSStore(PackedObjectStore):
    """The G4 tier on GCS: pages packed into objects under ``gs://bucket/prefix``."""

    def __init__(self, layout: KVLayout, config: GCSTierConfig, *,
                 listener: TierListener | None = None) -> None:
        check_store_args(layout, listener, config, GCSTierConfig)  # before any client exists
        super().__init__(layout, GCSBackend(config), config, listener=listener)
