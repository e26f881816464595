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
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs


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
    def filesystem(self) -> pafs.FileSystem:
        if self.is_local:
            return pafs.LocalFileSystem()
        endpoint = self.endpoint or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs = {"endpoint_override": parsed.netloc or parsed.path, "scheme": parsed.scheme or "https"}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)

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
