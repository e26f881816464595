"""Push a local experiment to S3: idempotent, retried, never a partial object.

Every local file of the experiment is compared with the object of the same
relative key:

* an object that is missing, or whose size differs, is uploaded;
* an object of the same size is unchanged when its content hash says so: for
  files below pyarrow's multipart part size, the object's ETag is the
  single-part multipart ETag, md5(md5(data)) + "-1", which we compute locally;
  for larger files, the SHA-256 recorded in the destination's sync record
  (``.sync/files.json``, written after every successful sync) must match.
  Anything else is uploaded again (re-uploading is always safe).

Uploads read the whole file first and go through the one storage factory
(:class:`cluster.storage.Storage`).  Small files are one buffered upload that
the server commits only when it completes.  Large files are uploaded to a
hidden temporary key and then copied to their name in one server-side
operation, so a reader never sees a partial object under the real name.  Each
object is tried ``attempts`` times with exponential backoff; when an object
still fails, :class:`SyncError` names it and the reason, and the local files are
never modified (sync only reads them).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pyarrow.fs as pafs

from cluster.storage import Storage

#: pyarrow's S3 output stream sends one part for payloads below this size
SINGLE_PART_LIMIT = 5 * 1024 * 1024
SYNC_RECORD = ".sync/files.json"


class SyncError(RuntimeError):
    """An object could not be uploaded after every retry; the message is one line."""


@dataclass
class SyncReport:
    uploaded: List[str] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)
    retries: int = 0


def single_part_etag(data: bytes) -> str:
    """The ETag S3 gives an object uploaded as a one-part multipart upload."""
    return hashlib.md5(hashlib.md5(data).digest()).hexdigest() + "-1"


def local_files(root: str) -> List[str]:
    """Relative paths of the regular files under ``root``, sorted; hidden temporaries
    of our atomic writer (``.tmp-*``) are skipped."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.startswith(".tmp-"):
                continue
            out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def _remote_record(fs: pafs.FileSystem, dest: str) -> Dict[str, str]:
    path = f"{dest}/{SYNC_RECORD}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return {}
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _unchanged(fs: pafs.FileSystem, key: str, data: bytes, info: pafs.FileInfo,
               record: Dict[str, str]) -> bool:
    if info.type != pafs.FileType.File or info.size != len(data):
        return False
    if len(data) < SINGLE_PART_LIMIT:
        with fs.open_input_stream(key) as f:  # a HEAD request: the object's ETag
            etag = (f.metadata() or {}).get("ETag", b"").decode().strip('"')
        if etag == single_part_etag(data):
            return True
    return record.get(key) == hashlib.sha256(data).hexdigest()


def _upload(fs: pafs.FileSystem, key: str, data: bytes) -> None:
    if len(data) < SINGLE_PART_LIMIT:
        with fs.open_output_stream(key) as f:
            f.write(data)
        return
    parent, name = key.rsplit("/", 1)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.copy_file(tmp, key)  # server-side copy: the real name appears complete or not at all
    finally:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass


def sync_experiment(local_root: str, storage: Storage, *, attempts: int = 4, backoff_s: float = 0.5,
                    timeout_s: float = 10.0, log: Optional[Callable[[str], None]] = None,
                    sleep: Callable[[float], None] = time.sleep) -> SyncReport:
    """Upload what is missing or changed under ``local_root`` to ``storage.root``."""
    if storage.is_local:
        raise ValueError("sync pushes to object storage; the destination must be s3://bucket/prefix")
    if not os.path.isdir(local_root):
        raise ValueError(f"local experiment {local_root} is not a directory")
    fs = storage.make_filesystem(attempts=2, timeout_s=timeout_s)
    dest = storage.root
    report = SyncReport()
    record = _retry(lambda: _remote_record(fs, dest), "reading the sync record", attempts, backoff_s,
                    sleep, report)
    new_record = dict(record)
    files = local_files(local_root)
    keys = [f"{dest}/{rel}" for rel in files]
    infos = _retry(lambda: fs.get_file_info(keys), "listing the destination", attempts, backoff_s,
                   sleep, report) if keys else []
    for rel, key, info in zip(files, keys, infos):
        with open(os.path.join(local_root, rel), "rb") as f:
            data = f.read()
        if _retry(lambda: _unchanged(fs, key, data, info, record), f"checking {rel}", attempts,
                  backoff_s, sleep, report):
            report.unchanged.append(rel)
        else:
            _retry(lambda: _upload(fs, key, data), f"uploading {rel}", attempts, backoff_s, sleep, report)
            report.uploaded.append(rel)
            if log:
                log(f"uploaded {rel} ({len(data)} bytes)")
        new_record[key] = hashlib.sha256(data).hexdigest()
    if new_record != record:
        payload = json.dumps(new_record, indent=1, sort_keys=True).encode()
        _retry(lambda: _upload(fs, f"{dest}/{SYNC_RECORD}", payload), "writing the sync record",
               attempts, backoff_s, sleep, report)
    return report


def _retry(fn, what: str, attempts: int, backoff_s: float, sleep, report: SyncReport):
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as err:
            if attempt == attempts:
                reason = " ".join(str(err).split())[:200]
                raise SyncError(f"sync failed {what} after {attempts} attempts: {reason}") from None
            report.retries += 1
            sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
