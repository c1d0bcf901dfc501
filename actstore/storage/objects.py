"""The object-storage client: one store's prefix on S3 or any fsspec filesystem.

Everything :mod:`actstore.remote` sends to object storage goes through
:class:`ObjectStore`: whole-object reads and writes, downloads to a local file,
listing, and the *conditional* writes the remote lock and the commit fence need
(``If-None-Match: *`` to create an object only if it is absent, ``If-Match:
<etag>`` to replace or delete it only if nobody changed it since).

- **Filesystems.**  The URL picks an fsspec filesystem (``s3://`` → s3fs,
  ``gs://`` → gcsfs, ``memory://`` …).  S3 is the tested one (against
  SeaweedFS); on S3, conditional requests are real server-side checks.  Other
  filesystems get best-effort emulation (create-exclusive where fsspec offers
  ``mode="create"``, read-compare-write otherwise) — see docs/SCALING.md.
- **Credentials and endpoint** come from ``storage_options`` (passed to the
  filesystem, e.g. ``key``, ``secret``, ``endpoint_url``), else from the usual
  environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_ENDPOINT_URL``, ``AWS_PROFILE`` …), read by botocore.
- **Bounded failures.**  On S3 each request has a connect timeout (5 s), a read
  timeout (60 s) and at most 3 attempts in botocore and 3 in s3fs, unless
  ``storage_options`` says otherwise: wrong credentials fail on the first
  answer, an unreachable endpoint within about half a minute.  Failures raise
  :class:`~actstore.errors.RemoteError` naming the URL and what to check.
- **Processes.**  The filesystem object is made lazily in each process (fsspec's
  async filesystems are not fork-safe), so a store handle can be pickled to
  DataLoader workers.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from actstore.errors import MissingDependencyError, PreconditionFailed, RemoteError
from actstore.storage.checksum import checksum

__all__ = ["ObjectStore", "PreconditionFailed", "is_url"]

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
#: Defaults for s3fs, under what the caller passes in ``storage_options``.
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}},
}
#: s3fs's own retry loop around botocore's (an attribute, not a constructor argument).
S3_RETRIES = 3


def is_url(path: object) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (which is a local path)."""
    if not isinstance(path, str):
        return False
    m = _URL_RE.match(path)
    return m is not None and m.group(1).lower() not in ("file", "local")


def local_path(path: str) -> str:
    """``file:///x`` → ``/x``; anything else unchanged."""
    m = _URL_RE.match(path)
    return path[len(m.group(0)):] if m and m.group(1).lower() in ("file", "local") else path


def _precondition(e: BaseException) -> bool:
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, FileExistsError):
            return True
        code = getattr(cause, "response", {}).get("Error", {}).get("Code") if hasattr(cause, "response") else None
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or "PreconditionFailed" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class ObjectStore:
    """The objects under one URL prefix (``s3://bucket/store``), through fsspec.

    Relative names (``"zarr.json"``, ``"segments/<id>/keys/c/0/0"``) always use
    ``/``.  Methods raise ``FileNotFoundError`` for a missing object,
    :class:`PreconditionFailed` for a failed condition, and
    :class:`~actstore.errors.RemoteError` for anything else the storage refuses
    (credentials, network, timeouts).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if not is_url(url):
            raise ValueError(f"url: expected scheme://..., got {url!r}")
        self.url = url.rstrip("/")
        self.scheme = url.split("://", 1)[0].lower()
        self.storage_options = dict(storage_options or {})
        self.is_s3 = self.scheme in ("s3", "s3a")
        self._fs: Any = None
        self._pid = -1
        self._mutex = threading.Lock()
        self.root = ""
        self.fs  # noqa: B018 - fail now on an unknown scheme or a missing package

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    @property
    def endpoint(self) -> str | None:
        """The endpoint URL (from ``storage_options`` or ``AWS_ENDPOINT_URL``), for naming the cache."""
        ep = self.storage_options.get("endpoint_url") or self.storage_options.get("client_kwargs", {}).get("endpoint_url")
        return ep or (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") if self.is_s3 else None)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem of this process (made again after a fork)."""
        if self._fs is None or self._pid != os.getpid():
            with self._mutex:
                if self._fs is None or self._pid != os.getpid():
                    self._fs, self.root = self._connect()
                    self._pid = os.getpid()
        return self._fs

    def _connect(self) -> tuple[Any, str]:
        try:
            import fsspec
            from fsspec.registry import known_implementations
        except ImportError as e:
            raise MissingDependencyError(
                f"{self.url}: reading stores from URLs needs fsspec; pip install 'actstore[s3]'") from e
        opts = dict(self.storage_options)
        if self.is_s3:
            config = {**S3_DEFAULTS["config_kwargs"], **opts.get("config_kwargs", {})}
            opts["config_kwargs"] = config
        try:
            fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **opts)
        except ImportError as e:
            known = known_implementations.get(self.scheme, {})
            hint = known.get("err") or f"install the fsspec filesystem for {self.scheme}://"
            pkg = "s3fs (pip install 'actstore[s3]')" if self.is_s3 else hint
            raise MissingDependencyError(f"{self.url}: no filesystem for {self.scheme}:// is installed; install {pkg}") from e
        except ValueError as e:
            if "Protocol not known" in str(e) or self.scheme not in known_implementations:
                raise MissingDependencyError(
                    f"{self.url}: no fsspec filesystem knows the scheme {self.scheme}:// (use s3:// for S3-compatible "
                    "storage, gs://, az://, ... with their fsspec package installed)") from e
            raise
        if self.is_s3 and "retries" not in self.storage_options:
            fs.retries = S3_RETRIES
        return fs, root.rstrip("/")

    def path(self, rel: str) -> str:
        self.fs  # noqa: B018 - sets self.root
        return f"{self.root}/{rel}" if rel else self.root

    def where(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    # -- error translation -----------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, what: str, rel: str) -> Any:
        try:
            yield
        except (FileNotFoundError, PreconditionFailed):
            raise
        except MissingDependencyError:
            raise
        except Exception as e:
            if _precondition(e):
                raise PreconditionFailed(f"{self.where(rel)}: {what}: the object was changed by someone else") from e
            raise self._remote_error(what, rel, e) from e

    def _remote_error(self, what: str, rel: str, e: BaseException) -> RemoteError:
        text = f"{type(e).__name__}: {e}"
        if isinstance(e, PermissionError) or any(
                s in text for s in ("Forbidden", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
            hint = ("access denied: check the credentials (storage_options key/secret, or AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY) and the bucket's permissions")
        elif any(s in text for s in ("NoSuchBucket", "bucket does not exist")):
            hint = "the bucket does not exist: create it first"
        else:
            ep = self.endpoint
            hint = (f"cannot reach the storage{f' at {ep}' if ep else ''}: check the endpoint (storage_options "
                    "endpoint_url or AWS_ENDPOINT_URL) and the network")
        return RemoteError(f"{self.where(rel)}: {what} failed: {hint} ({text[:300]})")

    # -- reads ------------------------------------------------------------------------
    def read(self, rel: str) -> bytes:
        """The whole object."""
        with self._errors("read", rel):
            data = self.fs.cat_file(self.path(rel))
        return bytes(data)

    def read_tagged(self, rel: str) -> tuple[bytes, str, float, float]:
        """(bytes, etag, modified, now): the object, its ETag and mtime, and the server's clock (epoch seconds).

        On S3 the three come from one GET (the ``Date`` header is the server's
        clock), so a lease's age is measured on one clock.  Elsewhere the etag is
        the BLAKE3 of the bytes and ``now`` is this machine's clock.
        """
        if self.is_s3:
            bucket, key = self._bucket_key(rel)
            with self._errors("read", rel):
                return self._sync(self._s3_get(bucket, key))  # type: ignore[no-any-return]
        with self._errors("read", rel):
            data = bytes(self.fs.cat_file(self.path(rel)))
            info = self.fs.info(self.path(rel))
        modified = _mtime(info)
        return data, checksum(data), modified, time.time()

    async def _s3_get(self, bucket: str, key: str) -> tuple[bytes, str, float, float]:
        r = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with r["Body"] as body:
            data = await body.read()
        return bytes(data), r["ETag"], r["LastModified"].timestamp(), _date(r)

    def download(self, rel: str, local: str) -> None:
        """Copy the object to the local file ``local`` (streamed, not held in memory)."""
        with self._errors("download", rel):
            self.fs.get_file(self.path(rel), local)

    def exists(self, rel: str) -> bool:
        with self._errors("check", rel):
            self.fs.invalidate_cache(self.path(rel))  # never answer from a stale listing
            return bool(self.fs.exists(self.path(rel)))

    def listdir(self, rel: str) -> list[str]:
        """Names directly under ``rel/`` (objects and prefixes); empty if there are none."""
        with self._errors("list", rel):
            try:
                entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
            except FileNotFoundError:
                return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def du(self) -> int:
        """Total bytes under the prefix."""
        with self._errors("list", ""):
            return int(self.fs.du(self.path(""), total=True))

    # -- writes -----------------------------------------------------------------------
    def upload(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Upload local files: ``(local path, relative name)`` pairs, concurrently."""
        pairs = list(pairs)
        if not pairs:
            return
        with self._errors("upload", pairs[0][1]):
            self.fs.put([p for p, _ in pairs], [self.path(r) for _, r in pairs])

    def put(self, rel: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Write a whole object, optionally conditional; returns its new ETag.

        ``if_none_match``: only if no object exists (``If-None-Match: *``).
        ``if_match``: only if the object still has this ETag (``If-Match``).
        Raises :class:`PreconditionFailed` when the condition does not hold.
        """
        if self.is_s3:
            bucket, key = self._bucket_key(rel)
            cond = {"IfNoneMatch": "*"} if if_none_match else ({"IfMatch": if_match} if if_match else {})
            with self._errors("write", rel):
                r = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
            self.fs.invalidate_cache(self.path(rel))
            return str(r["ETag"])
        with self._errors("write", rel):  # best effort elsewhere: see the module docstring
            if if_match is not None:
                try:
                    current = bytes(self.fs.cat_file(self.path(rel)))
                except FileNotFoundError as e:
                    raise PreconditionFailed(f"{self.where(rel)}: gone") from e
                if checksum(current) != if_match:
                    raise PreconditionFailed(f"{self.where(rel)}: changed")
            if if_none_match:
                try:
                    self.fs.pipe_file(self.path(rel), data, mode="create")
                except TypeError:  # an fsspec filesystem without mode=
                    if self.fs.exists(self.path(rel)):
                        raise PreconditionFailed(f"{self.where(rel)}: exists") from None
                    self.fs.pipe_file(self.path(rel), data)
            else:
                self.fs.pipe_file(self.path(rel), data)
        return checksum(data)

    def delete(self, rel: str, *, if_match: str | None = None) -> None:
        """Delete one object (optionally only if it still has ETag ``if_match``); absent is fine."""
        if self.is_s3 and if_match is not None:
            bucket, key = self._bucket_key(rel)
            try:
                with self._errors("delete", rel):
                    self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=if_match)
            except FileNotFoundError:
                pass
            except RemoteError as e:
                if "NotImplemented" not in str(e):
                    raise
                self._delete_if_same(rel, if_match)  # a server without conditional deletes
            self.fs.invalidate_cache(self.path(rel))
            return
        if if_match is not None:
            self._delete_if_same(rel, if_match)
            return
        with self._errors("delete", rel), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))

    def _delete_if_same(self, rel: str, tag: str) -> None:
        try:
            _, now_tag, _, _ = self.read_tagged(rel)
        except FileNotFoundError:
            return
        if now_tag != tag:
            raise PreconditionFailed(f"{self.where(rel)}: changed")
        with self._errors("delete", rel), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))

    def delete_tree(self, rel: str) -> None:
        """Delete every object under ``rel/``."""
        with self._errors("delete", rel), contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(rel), recursive=True)

    # -- helpers -------------------------------------------------------------------------
    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, _, key = self.path(rel).partition("/")
        return bucket, key

    def _sync(self, coro: Any) -> Any:
        from fsspec.asyn import sync

        async def run() -> Any:
            return await coro

        return sync(self.fs.loop, run)


def _date(response: Mapping[str, Any]) -> float:
    try:
        return email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return time.time()


def _mtime(info: Mapping[str, Any]) -> float:
    for k in ("LastModified", "mtime", "last_modified", "updated", "created"):
        v = info.get(k)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        with contextlib.suppress(TypeError, ValueError):
            return float(v)
    return time.time()
