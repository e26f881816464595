"""The one storage factory: every reader and writer gets its filesystem here.

``--storage`` is a local directory or ``s3://bucket/prefix``.  For S3 the
endpoint comes from an explicit option or ``AWS_ENDPOINT_URL`` and is passed
to pyarrow explicitly: a directly built ``S3FileSystem()`` ignores the
variable (apache/arrow#49643), so no raw ``s3://`` string is ever handed to
pyarrow or Ray.  Credentials come from the standard AWS chain and are never
recorded.  This module imports no Ray.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs


S3_URI = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[^\s]*)?")


class StorageError(ValueError):
    """Storage that is malformed, unreachable or missing; the message is one line."""


def check_s3_uri(uri: str) -> None:
    """Raise StorageError unless ``uri`` is ``s3://bucket[/prefix]`` with a valid bucket name."""
    if not S3_URI.fullmatch(uri) or "//" in uri[5:] or ".." in uri:
        raise StorageError(f"invalid S3 storage {uri!r}; expected s3://bucket/prefix with a bucket name "
                           f"of 3-63 lowercase letters, digits, '.' or '-'")


@dataclass(frozen=True)
class Storage:
    """A filesystem and a root path inside it; ``uri`` is what the user gave."""

    uri: str
    endpoint: Optional[str] = None

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3://")

    @property
    def root(self) -> str:
        """The root as a path inside :attr:`filesystem` (absolute for local storage)."""
        if self.is_local:
            return os.path.abspath(os.path.expanduser(self.uri))
        parsed = urlparse(self.uri)
        return f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")

    @property
    def bucket(self) -> str:
        return urlparse(self.uri).netloc

    @property
    def endpoint_url(self) -> Optional[str]:
        return self.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None

    @cached_property
    def filesystem(self) -> pafs.FileSystem:
        """The filesystem, built once per Storage (an S3 client is not free to create)."""
        return self.make_filesystem()

    def make_filesystem(self, attempts: int = 5, timeout_s: Optional[float] = None) -> pafs.FileSystem:
        """The filesystem; for S3, ``attempts`` tries per request with AWS's standard
        backoff, and connect/request timeouts of ``timeout_s`` when given."""
        if self.is_local:
            return pafs.LocalFileSystem()
        endpoint = self.endpoint_url
        kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
        if timeout_s is not None:
            kwargs.update(connect_timeout=timeout_s, request_timeout=timeout_s)
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)

    def check(self) -> None:
        """Raise StorageError (one line) unless the storage can be used: a local path
        that is or can become a writable directory, or an S3 URI whose endpoint answers
        and whose bucket exists.  Writes nothing."""
        if self.is_local:
            try:
                check_local_creatable(self.uri)
            except ValueError as err:
                raise StorageError(str(err)) from None
            return
        check_s3_uri(self.uri)
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        try:
            info = self.make_filesystem(attempts=2, timeout_s=5).get_file_info(self.bucket)
        except OSError as err:
            reason = " ".join(str(err).split())[:200]
            raise StorageError(f"S3 storage {self.uri} is not reachable{where}: {reason}") from None
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"S3 bucket {self.bucket!r} does not exist{where}; create it first "
                               f"(e.g. aws s3 mb s3://{self.bucket})")

    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def experiment(self, name: str) -> str:
        return f"{self.root}/{name}"

    def display(self, path: str) -> str:
        """A path as the user would write it (s3://... for object storage)."""
        return path if self.is_local else f"s3://{path}"


def check_local_creatable(path: str) -> None:
    """Raise ValueError unless ``path`` is a directory or could be created as one.

    Writes nothing: it walks up to the first existing ancestor, which must be a
    writable directory.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"storage path {path} exists and is not a directory")
        if not os.access(path, os.W_OK):
            raise ValueError(f"storage path {path} is not writable")
        return
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"storage path {path} cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"storage path {path} cannot be created: {parent} is not writable")
