"""Shared fixtures: local S3 (moto) and GCS (gcp-storage-emulator) servers, one per session.

Each server starts on a free port of 127.0.0.1 the first time a test asks for it and stops
when the session ends. Tests that kill or break a server start their own (see
tests/objstore_servers.py), so the shared ones stay healthy.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from objstore_servers import AWS_TEST_ENV, ServerProcess, gcs_emulator, moto_server


@pytest.fixture(scope="session")
def aws_test_env() -> Iterator[None]:
    """Fake credentials and region for boto3, so no real account or profile is ever used."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_TEST_ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        yield


@pytest.fixture(scope="session")
def moto_endpoint(aws_test_env: None) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server for the whole session."""
    pytest.importorskip("boto3")
    server = moto_server()
    server.start()
    try:
        yield server.endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_bucket(moto_endpoint: str) -> str:
    """A bucket on the session's moto server."""
    import boto3

    name = "kvbm-test"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of an in-memory gcp-storage-emulator, also exported as
    ``STORAGE_EMULATOR_HOST`` (how google-cloud-storage finds an emulator)."""
    pytest.importorskip("google.cloud.storage")
    server: ServerProcess = gcs_emulator()
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", server.endpoint)
            yield server.endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_bucket(gcs_endpoint: str) -> str:
    """A bucket on the session's GCS emulator."""
    from google.cloud import storage

    from kvbm.storage.gcs import without_bucket_lookups

    name = "kvbm-test"
    without_bucket_lookups(storage.Client()).create_bucket(name)
    return name
