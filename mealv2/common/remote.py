"""Label stores read from URLs (``https://``, ``s3://``, any fsspec protocol whose package is
installed), through a local cache that never serves an object the remote has changed.

Transport is fsspec (its filesystems bring the protocols, and credentials from where each one
looks: for S3, botocore's environment variables, ``~/.aws`` profiles and instance roles). zarr
reads through :class:`CachedStore`, a read-only zarr store over :class:`RemoteObjects`, rather
than zarr's own ``FsspecStore``, which reads the remote on every access: an epoch would download
its round again. fsspec's caching filesystems were not enough either: they take an HTTP file
as never changing, so a store republished under the same URL would be served stale.

Each object is cached whole, as ``$MEALV2_CACHE/stores/<sha256(url)>/<key>@<version>``, where
the version is a digest of what the remote says identifies the object's bytes (size with ETag,
Last-Modified, generation...). A process asks the remote for each object's version once
before it serves a cached copy (from one listing on an object store, else a HEAD); another
version on the remote is fetched again, and said. What is read is
then checked as from disk: zarr checks every chunk's CRC32C, ``mealv2 verify`` every trailer.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

from .errors import MealV2Error

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Fields of fsspec's info() that change with an object's bytes (S3, HTTP, GCS, Azure, local), in order of
# preference: the first one present, with the size, is the object's version. An ETag comes first because
# it reads the same from a listing and from a HEAD, where a modification time may differ in precision.
VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "Last-Modified", "LastModified", "last_modified",
                  "mtime")
READ_BY = "`mealv2 train --labels`, `mealv2 inspect` and `mealv2 verify` (label stores)"


class RemoteError(MealV2Error):
    """A URL that cannot be read as asked; the message names the URL and the fix."""


def is_url(location) -> bool:
    return isinstance(location, str) and bool(_URL.match(location))


def check_url(url: str) -> str:
    """``url`` if mealv2 can read a store there; refuses credentials in it and protocols whose fsspec
    package is missing, naming the fix."""
    parts = urlsplit(url)
    if parts.username or parts.password or parts.query:
        raise RemoteError(f"{redact(url)}: credentials or a query string in a store URL are refused: the URL is "
                          f"printed and recorded in checkpoints. Give credentials where the protocol's library "
                          f"looks (S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws; fsspec: "
                          f"FSSPEC_<PROTOCOL>_<OPTION> variables) and pass the plain URL")
    try:
        fsspec.get_filesystem_class(parts.scheme)
    except ValueError:
        raise RemoteError(f"{url}: no fsspec filesystem reads '{parts.scheme}://' URLs; label stores are read "
                          f"from https://, http://, s3:// or another fsspec protocol (gs://, az://, ...)") from None
    except ImportError as e:
        raise RemoteError(f"{url}: reading '{parts.scheme}://' needs a package that is not installed ({e}); "
                          f"`pip install 'mealv2[remote]'` brings S3 and HTTP(S)") from None
    return url.rstrip("/")


def redact(url: str) -> str:
    """``url`` without user, password and query: what may be printed."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.hostname or "", query="").geturl()


def cache_root() -> Path:
    """``$MEALV2_CACHE``, else ``$XDG_CACHE_HOME/mealv2``, else ``~/.cache/mealv2``."""
    if os.environ.get("MEALV2_CACHE"):
        return Path(os.environ["MEALV2_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mealv2"


class LocalObjects:
    """The files of a store on disk, with :class:`RemoteObjects`' interface."""

    def __init__(self, root):
        self.location = Path(root)

    def where(self, key: str) -> str:
        return str(self.location / key)

    def file(self, key: str) -> Path:
        return self.location / key

    def exists(self, key: str) -> bool:
        return (self.location / key).is_file()

    def size(self, prefix: str = "") -> int:
        return sum(f.stat().st_size for f in (self.location / prefix).rglob("*") if f.is_file())

    def zarr_store(self, read_only: bool) -> Store:
        return LocalStore(self.location, read_only=read_only)


def open_objects(location) -> LocalObjects | RemoteObjects:
    """A store's objects: a URL's through the cache, a path's on disk."""
    return RemoteObjects(location) if is_url(location) else LocalObjects(location)


class RemoteObjects:
    """The objects of one store URL, read through the local cache (thread-safe)."""

    def __init__(self, url: str):
        self.url = self.location = check_url(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.cache = cache_root() / "stores" / hashlib.sha256(self.url.encode()).hexdigest()[:24]
        self._checked: dict[str, Path | None] = {}   # key -> cached file this process checked (None: absent)
        self._listed: dict[str, dict] | None = None    # path -> info, from one listing (_listing)
        # Object stores list their objects with sizes and ETags; HTTP has no listing, only some servers'
        # HTML pages (without versions, and a page per folder): it is never listed.
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        self.lists = not set(protocols) & {"http", "https"}
        self._lock = threading.Lock()

    def where(self, key: str) -> str:
        return f"{self.url}/{key}"

    def zarr_store(self, read_only: bool) -> Store:
        if not read_only:
            raise RemoteError(f"{self.url}: stores at a URL are read only; write the store to a local path")
        return CachedStore(self)

    def file(self, key: str) -> Path:
        """The local file holding the remote's current bytes of ``key``; FileNotFoundError when the
        remote has no such object."""
        if key not in self._checked:
            self._checked[key] = self._fetch(key)
        if self._checked[key] is None:
            raise FileNotFoundError(2, "no such object", self.where(key))
        return self._checked[key]

    def exists(self, key: str) -> bool:
        try:
            self.file(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, prefix: str = "") -> int | None:
        """Bytes of the objects under ``prefix`` on the remote; None where it is not listed (HTTP) or
        may not be."""
        if not self.lists:
            return None
        try:
            return int(self.fs.du(f"{self.root}/{prefix}".rstrip("/"), total=True))
        except Exception:   # not allowed to list: the size is unknown, the store still readable
            return None

    def _info(self, path: str) -> dict | None:
        """fsspec's info of ``path``; None when the remote has no such object. Any other failure (host
        unreachable, access denied) is said as such, never taken as a missing object."""
        try:
            return self.fs.info(path)
        except FileNotFoundError as e:   # fsspec's HTTP says every failure this way, the real one as its cause
            if e.__cause__ is None or isinstance(e.__cause__, FileNotFoundError):
                return None
            raise self._unreadable(e.__cause__) from None
        except Exception as e:
            raise self._unreadable(e) from None

    def _unreadable(self, e: Exception) -> RemoteError:
        return RemoteError(f"{self.url} cannot be read ({type(e).__name__}: {e}); check the URL, the network and "
                           f"the credentials (README: Share a store)")

    def _listing(self) -> dict[str, dict]:
        """Every object's info from one listing where the remote lists objects with their ETags (an
        object store: a request per 1,000 objects instead of a HEAD each); empty elsewhere."""
        with self._lock:
            if self._listed is None:
                self._listed = {}
                if self.lists:
                    try:
                        self._listed = {path: info for path, info in self.fs.find(self.root, detail=True).items()
                                        if _tag(info)}
                    except Exception:   # not allowed to list (a public bucket may not be), unreachable...: HEADs
                        pass            # say what is wrong, per object
        return self._listed

    def _fetch(self, key: str) -> Path | None:
        path = f"{self.root}/{key}"
        info = self._listing().get(path) or self._info(path)
        if info is None:
            return None
        version = hashlib.sha256(f"{info.get('size')} {_tag(info)}".encode()).hexdigest()[:16]
        local = self.cache / f"{key}@{version}"
        if local.is_file():
            return local
        # Other versions of the object; not this one (another rank may have written it meanwhile), nor
        # another process's file still being written.
        stale = [p for p in local.parent.glob(f"{Path(key).name}@*") if p != local and not p.name.endswith(".partial")]
        try:
            data = self.fs.cat_file(path)
        except Exception as e:   # the transport's own errors (botocore's, aiohttp's) share no base class
            raise self._unreadable(e) from None
        if info.get("size") is not None and len(data) != info["size"]:   # replaced between the HEAD and the GET
            raise RemoteError(f"{self.where(key)} changed while it was being read ({info['size']} bytes announced, "
                              f"{len(data)} read): the store is being replaced; run again once it is published")
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}.{os.getpid()}.{threading.get_ident()}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, local)
        if stale:
            print(f"mealv2: {self.where(key)} changed on the remote since it was cached; read it again",
                  file=sys.stderr)
            for old in stale:
                old.unlink(missing_ok=True)
        if not (self.cache / "URL").is_file():   # says whose objects a cache folder holds
            (self.cache / "URL").write_text(self.url + "\n")
        return local


def _tag(info: dict) -> str:
    """The first of VERSION_FIELDS that ``info`` (fsspec's) holds, as a string; "" when none."""
    return next((str(info[k]) for k in VERSION_FIELDS if info.get(k) is not None), "")


def _byte_range(size: int, request: ByteRequest | None) -> tuple[int, int]:
    if request is None:
        return 0, size
    if isinstance(request, RangeByteRequest):
        return request.start, min(request.end, size)
    if isinstance(request, OffsetByteRequest):
        return request.offset, size
    if isinstance(request, SuffixByteRequest):
        return max(0, size - request.suffix), size
    raise TypeError(f"unexpected byte range request {request!r}")


class CachedStore(Store):
    """Read-only zarr store over :class:`RemoteObjects`: zarr's reads come from the local cache."""

    supports_writes = False
    supports_deletes = False
    supports_partial_writes = False
    supports_listing = False

    def __init__(self, objects: RemoteObjects):
        super().__init__(read_only=True)
        self.objects = objects

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CachedStore) and other.objects.url == self.objects.url

    def _read(self, key: str, request: ByteRequest | None) -> bytes | None:
        try:
            file = self.objects.file(key)
        except FileNotFoundError:
            return None
        with open(file, "rb") as f:
            start, stop = _byte_range(os.fstat(f.fileno()).st_size, request)
            f.seek(start)
            return f.read(max(0, stop - start))

    async def get(self, key, prototype=None, byte_range=None):
        data = await asyncio.to_thread(self._read, key, byte_range)
        return None if data is None else (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    async def get_partial_values(self, prototype, key_ranges):
        return await asyncio.gather(*(self.get(key, prototype, r) for key, r in key_ranges))

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.objects.exists, key)

    async def set(self, key, value):
        self._check_writable()

    async def delete(self, key):
        self._check_writable()

    def list(self, *_):
        raise NotImplementedError("a store read from a URL is not listed")

    list_prefix = list_dir = list
