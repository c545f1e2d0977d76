"""A real S3 API server (moto's) on loopback, and presigned PUT URLs for its bucket."""

from __future__ import annotations

import hashlib
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from moto.server import ThreadedMotoServer

__all__ = ["S3", "running_s3"]

_REGION = "us-east-1"


@dataclass(frozen=True)
class S3:
    """One bucket on a running S3 API server, and a boto3 client for it."""

    endpoint: str
    bucket: str
    client: Any

    def presign_put(self, key: str, expires: int = 600) -> str:
        """A presigned PUT URL for ``key``, as an S3-compatible store issues them."""
        url: str = self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
        )
        return url

    def sha256(self, key: str) -> str:
        """The SHA-256 of the object stored at ``key``, read back through the S3 API."""
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return hashlib.sha256(body).hexdigest()

    def keys(self) -> list[str]:
        """The keys in the bucket."""
        listing = self.client.list_objects_v2(Bucket=self.bucket)
        return sorted(item["Key"] for item in listing.get("Contents", []))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running_s3() -> Iterator[S3]:
    """moto's S3 API server on 127.0.0.1, with a bucket of its own made; stopped after.
    (moto keeps its objects in the process, across servers: each gets a fresh bucket.)"""
    bucket = f"results-{secrets.token_hex(6)}"
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=_REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(signature_version="s3v4"),
        )
        client.create_bucket(Bucket=bucket)
        yield S3(endpoint, bucket, client)
        client.close()
    finally:
        server.stop()
