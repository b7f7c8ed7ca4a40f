"""Locations: a local path or any fsspec URL (s3://, gs://, file://, memory://), opened as Zarr stores.

For S3 the endpoint comes from AWS_ENDPOINT_URL when set and credentials from the standard
AWS variables or profiles (botocore's own resolution). Also: the writer lock that lets two
people ask for the same cache at once without corrupting it.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

import fsspec
import zarr

from .errors import PipelineError

LOCK_NAME = ".harvest.lock"
LOCK_TTL_S = 600  # a lock whose heartbeat is older than this is stale (its writer died on another host)


def is_url(location: str) -> bool:
    return "://" in str(location)


def normalize(location: str) -> str:
    """file:// URLs become plain paths; local paths become absolute; other URLs lose a trailing slash."""
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    if is_url(location):
        return location.rstrip("/")
    return str(Path(location).expanduser().resolve())


def join(root: str, *parts: str) -> str:
    root = normalize(root)
    return "/".join([root.rstrip("/"), *parts]) if is_url(root) else str(Path(root, *parts))


def storage_options(location: str) -> dict:
    if location.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    return {}


def filesystem(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a location."""
    location = normalize(location)
    with remote_errors(location):
        fs, path = fsspec.core.url_to_fs(location, **storage_options(location))
    return fs, path


def local_copy_dir(location: str, local_copy: str) -> Path:
    """Where the read-through copy of a remote cache lives: the cache's own layout under local_copy/<name>."""
    return Path(local_copy).expanduser().resolve() / normalize(location).rstrip("/").rsplit("/", 1)[-1]


def zarr_store(location: str, read_only: bool, local_copy: str | None = None):
    """A Zarr store for a location. With `local_copy` (read-only URLs), every object read is kept in
    local_copy/<cache name>/<key> and served from there next time (zarr's CacheStore over a LocalStore):
    a read-through copy, in the cache's own layout, of the objects actually touched."""
    location = normalize(location)
    if not is_url(location):
        return zarr.storage.LocalStore(location, read_only=read_only)
    with remote_errors(location):
        remote = zarr.storage.FsspecStore.from_url(location, storage_options=storage_options(location),
                                                   read_only=read_only)
        if local_copy and read_only:
            from zarr.experimental.cache_store import CacheStore

            target = local_copy_dir(location, local_copy)
            target.mkdir(parents=True, exist_ok=True)
            return CacheStore(remote, cache_store=zarr.storage.LocalStore(target))
        return remote


@contextlib.contextmanager
def remote_errors(location: str) -> Iterator[None]:
    """Translate the many ways a remote store fails into one-line PipelineErrors."""
    try:
        yield
    except PipelineError:
        raise
    except ValueError as e:
        if "protocol" in str(e).lower():
            scheme = location.split("://")[0]
            raise PipelineError(f"unknown URL scheme {scheme!r} in {location}; use a local path, file://, s3://, "
                                "gs:// or another fsspec protocol whose package is installed") from None
        raise
    except ImportError as e:
        raise PipelineError(f"{location}: the fsspec backend for this URL is not installed ({e})") from None
    except PermissionError as e:
        raise PipelineError(f"access denied at {location} ({_first_line(e)}); check the credentials "
                            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's permissions") from None
    except Exception as e:  # botocore errors do not share a base class with builtins
        name = type(e).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            raise PipelineError(f"no credentials for {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                "or AWS_PROFILE") from None
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError",
                    "ConnectionRefusedError", "ServerDisconnectedError"):
            raise PipelineError(f"cannot reach {location} ({_first_line(e)}); check the URL and AWS_ENDPOINT_URL") from None
        if name == "NoSuchBucket" or "NoSuchBucket" in str(e):
            raise PipelineError(f"bucket of {location} does not exist") from None
        raise


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def open_group(location: str, mode: str, local_copy: str | None = None):
    """Open the Zarr group at a location (mode 'r', 'r+' or 'a')."""
    with remote_errors(location):
        return zarr.open_group(store=zarr_store(location, read_only=(mode == "r"), local_copy=local_copy),
                               mode=mode, zarr_format=3)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    with remote_errors(location):
        fs.invalidate_cache(path)  # object stores cache listings; another process may have written since
        return fs.exists(f"{path}/zarr.json")


# ---------------------------------------------------------------- writer lock
class WriterLock:
    """An exclusive-create lock file beside the cache (O_EXCL locally, If-None-Match on S3).

    The holder refreshes a heartbeat; a lock whose writer process is gone (same host) or
    whose heartbeat is older than LOCK_TTL_S is stale and may be taken over.
    """

    def __init__(self, location: str):
        self.fs, root = filesystem(location)
        self.location = location
        self.path = f"{root}/{LOCK_NAME}"
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.held = False
        self._last_beat = 0.0

    def _payload(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _stale(self, info: dict | None) -> bool:
        if info is None:
            return True
        if info.get("host") == self.owner["host"] and not _pid_alive(int(info.get("pid", -1))):
            return True
        return time.time() - float(info.get("heartbeat", 0)) > LOCK_TTL_S

    def try_acquire(self) -> bool:
        with remote_errors(self.location):
            parent = self.path.rsplit("/", 1)[0]
            if not is_url(self.location):
                os.makedirs(parent, exist_ok=True)
            for _ in range(2):
                try:
                    with self.fs.open(self.path, "xb") as f:
                        f.write(self._payload())
                    self.held = True
                    self._last_beat = time.time()
                    return True
                except (FileExistsError, OSError) as e:
                    if not isinstance(e, FileExistsError) and "PreconditionFailed" not in str(e) and "exist" not in str(e).lower():
                        raise
                    if not self._stale(self.read()):
                        return False
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(self.path)
            return False

    def heartbeat(self, every_s: float = 30.0) -> None:
        if self.held and time.time() - self._last_beat > every_s:
            self.fs.pipe_file(self.path, self._payload())
            self._last_beat = time.time()

    def release(self) -> None:
        if self.held:
            info = self.read()
            if info and info.get("token") == self.owner["token"]:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.path)
            self.held = False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
