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
from collections.abc import Iterator
from pathlib import Path

import fsspec
import zarr

from batchtopk.core import errors
from batchtopk.core.errors import PipelineError

LOCK_NAME = ".harvest.lock"


def is_lock_file(path: str) -> bool:
    """The writer lock and its companions (local mutex, temporary files): not part of a cache."""
    return path.rstrip("/").rsplit("/", 1)[-1].startswith(LOCK_NAME)
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


S3_ATTEMPTS = 6      # botocore's attempts per request (AWS_MAX_ATTEMPTS overrides), exponential backoff
S3_TIMEOUTS = {"connect_timeout": 10, "read_timeout": 30}  # a stalled store counts as a failed attempt


def storage_options(location: str) -> dict:
    """fsspec options for a location. S3: the endpoint from AWS_ENDPOINT_URL; transient failures
    (dropped connections, 5xx, throttling, stalls) retried with botocore's standard exponential backoff
    (at most S3_ATTEMPTS attempts, each at most a minute), then reported (remote_errors)."""
    if not location.startswith("s3://"):
        return {}
    retries: dict = {"mode": "standard"}
    if "AWS_MAX_ATTEMPTS" not in os.environ:
        retries["total_max_attempts"] = S3_ATTEMPTS
    opts: dict = {"config_kwargs": {"retries": retries, **S3_TIMEOUTS}}
    if os.environ.get("AWS_ENDPOINT_URL"):
        opts["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    return opts


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
                            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's "
                            "permissions") from None
    except Exception as e:  # botocore errors do not share a base class with builtins
        message = remote_failure(e, location)
        if message is None:
            raise
        raise PipelineError(message) from None


UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError")
TRANSIENT = ("ConnectionClosedError", "ReadTimeoutError", "ServerDisconnectedError", "ClientOSError",
             "ServerTimeoutError", "FSTimeoutError", "ClientPayloadError", "IncompleteRead", "ConnectionResetError",
             "ResponseStreamingError", "ProtocolError")
TRANSIENT_CODES = ("ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout", "Throttling",
                   "(500)", "(502)", "(503)", "(504)", "503 Service", "500 Internal")


def remote_failure(e: BaseException, location: str = "the object store") -> str | None:
    """A one-line message for an object-store failure (None for other errors)."""
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    names = {type(x).__name__ for x in chain}
    text = " ".join(str(x) for x in chain)
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return f"no credentials for {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
    if "NoSuchBucket" in names or "NoSuchBucket" in text:
        return f"bucket of {location} does not exist"
    if names & set(UNREACHABLE) or ("ConnectionError" in names and "refused" in text.lower()):
        return f"cannot reach {location} ({_first_line(e)}); check the URL and AWS_ENDPOINT_URL"
    store_error = "ClientError" in names or any(isinstance(x, OSError) for x in chain)
    if names & set(TRANSIENT) or (store_error and any(c in text for c in TRANSIENT_CODES)):
        return (f"the object store at {location} kept failing after retries ({_first_line(e)}); nothing already "
                "written was lost: run the same command again once it answers")
    return None


errors.explain_with(remote_failure)  # the CLIs' one-line errors name object-store failures


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
class LostLock(PipelineError):
    """Another process took the writer lock over (this one was presumed dead)."""


def _precondition_failed(e: BaseException) -> bool:
    """A conditional write lost its race (S3 412: If-Match / If-None-Match not met; locally, O_EXCL)."""
    if isinstance(e, FileExistsError):
        return True
    text = f"{e} {getattr(e, '__cause__', '')}"
    return "PreconditionFailed" in text or "Precondition Failed" in text or "(412)" in text


class WriterLock:
    """A lock object beside the cache: one writer at a time, even across machines.

    Creation is an exclusive create (O_EXCL locally, If-None-Match: * on S3). The holder refreshes a
    heartbeat; a lock whose writer process is gone (same host) or whose heartbeat is older than
    LOCK_TTL_S is stale. Taking a stale lock over is a compare-and-swap on the version that was judged
    stale (If-Match: <its ETag> on S3; locally the judgement and the replacement happen under an
    flock), so of several processes taking over the same dead lock at once exactly one wins; the
    others see a fresh lock and wait. A heartbeat is conditional on the holder's own version too, so a
    holder that was presumed dead and replaced finds out (LostLock) instead of writing on.
    """

    def __init__(self, location: str):
        self.fs, root = filesystem(location)
        self.location = location
        self.path = f"{root}/{LOCK_NAME}"
        self.remote = is_url(location)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.held = False
        self._etag: str | None = None
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

    def _took(self, response: dict | None) -> bool:
        self.held = True
        self._etag = (response or {}).get("ETag")
        self._last_beat = time.time()
        return True

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale; False if a live writer holds it."""
        with remote_errors(self.location):
            if not self.remote:
                os.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
                with self._local_mutex():
                    info = self.read()
                    if info is not None and not self._stale(info):
                        return False
                    self._replace_local()
                    return self._took(None)
            try:
                return self._took(self.fs.pipe_file(self.path, self._payload(), mode="create"))
            except OSError as e:
                if not _precondition_failed(e):
                    raise
            try:  # it exists: take it over only if the version we judge is still the one there
                etag = self.fs.info(self.path, refresh=True)["ETag"]
            except FileNotFoundError:
                return False  # released meanwhile: the next try creates it
            if not self._stale(self.read()):
                return False
            try:
                return self._took(self.fs.pipe_file(self.path, self._payload(), IfMatch=etag))
            except (OSError, FileNotFoundError) as e:
                if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                    return False  # another process took it over first, or it was released
                raise

    @contextlib.contextmanager
    def _local_mutex(self) -> Iterator[None]:
        """Serialise lock decisions among the processes of this machine (the lock file lives here)."""
        import fcntl

        with open(self.path + ".mutex", "a") as m:
            fcntl.flock(m, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(m, fcntl.LOCK_UN)

    def _replace_local(self) -> None:
        tmp = f"{self.path}.{self.owner['token']}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._payload())
        os.replace(tmp, self.path)

    def heartbeat(self, every_s: float = 30.0) -> None:
        if not self.held or time.time() - self._last_beat <= every_s:
            return
        with remote_errors(self.location):
            if self.remote:
                try:
                    self._etag = (self.fs.pipe_file(self.path, self._payload(), IfMatch=self._etag) or {}).get("ETag")
                except (OSError, FileNotFoundError) as e:
                    if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                        self.held = False
                        raise LostLock(f"another process took over the writer lock of {self.location} (this one "
                                       "was presumed dead); stopping; what was written is kept") from None
                    raise
            else:
                with self._local_mutex():
                    if (self.read() or {}).get("token") != self.owner["token"]:
                        self.held = False
                        raise LostLock(f"another process took over the writer lock of {self.location}; stopping; "
                                       "what was written is kept")
                    self._replace_local()
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
