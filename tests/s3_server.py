"""A real S3 protocol server for tests: moto's ThreadedMotoServer on a free loopback port."""
from __future__ import annotations

import socket
import uuid
from contextlib import contextmanager
from typing import Dict, Iterator, List


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """Start/stop a moto server; its objects survive a stop and restart in this process."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.secret = f"fake-secret-{uuid.uuid4().hex}"
        self._cls = ThreadedMotoServer
        self._server = None

    @property
    def env(self) -> Dict[str, str]:
        """Credentials and endpoint as the standard AWS chain reads them (a unique fake secret)."""
        return {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}

    def start(self, reset: bool = False) -> None:
        self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        if reset:  # moto keeps its state per process: begin with no buckets
            import urllib.request

            urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST"),
                                   timeout=10).read()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing-key-id",
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def objects(self, bucket: str, prefix: str = "") -> List[dict]:
        """Every object under ``prefix``, counted on the server side."""
        out, token = [], None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self.client().list_objects_v2(**kwargs)
            out += page.get("Contents", [])
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]


@contextmanager
def s3_server(monkeypatch=None) -> Iterator[S3Server]:
    server = S3Server()
    server.start(reset=True)
    if monkeypatch is not None:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        server.stop()
