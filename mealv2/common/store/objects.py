"""Where a label store's objects live: files on disk (:class:`LocalObjects`), or objects at a URL
(:class:`RemoteObjects`: ``https://``, ``s3://``, any fsspec protocol whose package is installed),
read through a local cache that never serves an object the remote has changed. label_store.py
reads and writes a store only through these two, so a store is written to S3 as to disk.

Transport is fsspec (its filesystems bring the protocols, and credentials from where each one
looks: for S3, botocore's environment variables, ``~/.aws`` profiles and instance roles). zarr
reads through :class:`CachedStore`, a read-only zarr store over :class:`RemoteObjects`, rather
than zarr's own ``FsspecStore``, which reads the remote on every access: an epoch would download
its round again. fsspec's caching filesystems were not enough either: they take an HTTP file
as never changing, so a store republished under the same URL would be served stale.

Each object is cached whole (cache.py: files named by hashes, one download per machine under a
lock per object, content checked before a cached file is served), at a version that is a digest of
what the remote says identifies the object's bytes (size with ETag, generation, Last-Modified...).
A process asks the remote for each object's version once before it serves a cached copy (from one
listing on an object store, else a HEAD); another version on the remote is fetched again, and
said. An object with no such field, and a ``zarr.json`` versioned by its modification time alone
(HTTP's Last-Modified has whole seconds: a store republished within one would be served stale),
is downloaded once per process and named by its content. What is read is then checked as from
disk: zarr checks every chunk's CRC32C, ``mealv2 verify`` every trailer. Every request has a
timeout and a bounded retry (transport.py).

Writing: a file is whole or absent and durable once :meth:`write` returns (files.py's
``write_file``), or, written by zarr, once :meth:`sync` returns; a new store's files once
:meth:`publish` returns. An object is whole or absent, and durable once its PUT returns. The store
commits a shard (its done mark) only after its data is durable either way. A writer knows the
objects it wrote; those other processes (ranks) write, it sees after :meth:`refresh`.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

from ..errors import MealV2Error
from .cache import ObjectCache
from .files import PARTIAL, make_folders, publish_folder, sync_paths, write_file
from .transport import (RETRIES_VARIABLE, TIMEOUT_VARIABLE, remote_retries, remote_timeout, single_attempt,
                        storage_options, transient, with_retries)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Fields of fsspec's info() that change with an object's bytes (S3, HTTP, GCS, Azure, local), in order of
# preference: the first one present, with the size, is the object's version. An ETag comes first because
# it reads the same from a listing and from a HEAD, where a modification time may differ in precision.
VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "Last-Modified", "LastModified", "last_modified",
                  "mtime")
MODIFIED_FIELDS = VERSION_FIELDS[4:]   # times: a change within their precision goes unseen
READ_FROM = "https://, http://, s3:// or another fsspec protocol whose package is installed (gs://, az://, ...)"
READ_BY = ("`mealv2 train --labels`, `mealv2 inspect` and `mealv2 verify` read them, `mealv2 label --out` "
           "writes them to s3://")


class RemoteError(MealV2Error):
    """A URL that cannot be read as asked; the message names the URL and the fix."""


def is_url(location) -> bool:
    return isinstance(location, str) and bool(_URL.match(location))


def check_url(url: str) -> str:
    """``url`` if mealv2 can read a store there; refuses credentials in it, a ``#fragment`` and protocols
    whose fsspec package is missing, naming the fix."""
    parts = urlsplit(url)
    if "#" in url:
        base = redact(url.partition("#")[0])
        raise RemoteError(f"{base}#{parts.fragment}: a '#' in a store URL is refused: HTTP drops it and all after it "
                          f"(the store would be read from {base}) and an object store takes it as part of the "
                          f"name; pass the URL without it (rename a store whose name holds a '#')")
    if parts.username or parts.password or parts.query:
        raise RemoteError(f"{redact(url)}: credentials or a query string in a store URL are refused: the URL is "
                          f"printed and recorded in checkpoints. Give credentials where the protocol's library "
                          f"looks (S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws; fsspec: "
                          f"FSSPEC_<PROTOCOL>_<OPTION> variables) and pass the plain URL")
    try:
        fsspec.get_filesystem_class(parts.scheme)
    except ValueError:
        raise RemoteError(f"{url}: no fsspec filesystem reads '{parts.scheme}://' URLs; label stores are read "
                          f"from {READ_FROM}") from None
    except ImportError as e:
        raise RemoteError(f"{url}: reading '{parts.scheme}://' needs a package that is not installed ({e}); "
                          f"`pip install 'mealv2[remote]'` brings S3 and HTTP(S)") from None
    return url.rstrip("/")


def redact(url: str) -> str:
    """``url`` without user, password and query (its host and port as written): what may be printed."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()


class LocalObjects:
    """The files of a store on disk, with :class:`RemoteObjects`' interface."""

    def __init__(self, root):
        self.location = Path(root)

    @property
    def name(self) -> str:
        return self.location.name

    def where(self, key: str) -> str:
        return str(self.location / key)

    def file(self, key: str) -> Path:
        return self.location / key

    def exists(self, key: str) -> bool:
        return (self.location / key).is_file()

    def keys(self, prefix: str = "") -> list[str]:
        """The keys of the files under ``prefix``."""
        return [str(f.relative_to(self.location)) for f in (self.location / prefix).rglob("*") if f.is_file()]

    def size(self, prefix: str = "") -> int:
        return sum(f.stat().st_size for f in (self.location / prefix).rglob("*") if f.is_file())

    def zarr_store(self, read_only: bool) -> Store:
        return LocalStore(self.location, read_only=read_only)

    def write(self, key: str, data: bytes, fsync: bool = True) -> None:
        write_file(self.location / key, data, fsync=fsync)

    def make_parents(self, keys: list[str], fsync: bool = True) -> None:
        """Make the folders that will hold files ``keys``, durably (before zarr writes them)."""
        for folder in {(self.location / key).parent for key in keys}:
            make_folders(folder, fsync=fsync)

    def sync(self, keys: list[str]) -> None:
        """Make files ``keys`` (written by zarr, in folders :meth:`make_parents` made) durable, with
        the folder entries naming them."""
        paths = [self.location / key for key in keys]
        sync_paths([*paths, *(p.parent for p in paths)])

    def delete(self, key: str) -> None:
        (self.location / key).unlink(missing_ok=True)

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self.location / prefix, ignore_errors=True)

    def refresh(self) -> None:
        """Files are read as they are now: nothing to forget."""

    def build_folder(self) -> Path:
        """Where a new store is made before :meth:`publish`: beside the location, on its file system
        (whose missing folders are made, durably)."""
        make_folders(self.location.parent)
        return self.location.with_name(self.location.name + ".creating")

    def publish(self, built: Path) -> None:
        """Put the store made in folder ``built`` at the location, in one rename once all of it is
        durable; the location may hold only what a creation cut short left (the files ``built`` has)."""
        _refuse_foreign(self, built)
        shutil.rmtree(self.location, ignore_errors=True)
        publish_folder(built, self.location)

    def free_space(self) -> str:
        """What to say of the space left where the store is written."""
        return f"{shutil.disk_usage(self.location).free / 2**20:.1f} MiB free there"

    def remove_partials(self) -> int:
        """Delete the temporary files a killed writer left behind (zarr and :meth:`write` write
        through a temporary file and a rename); their number."""
        partials = list(self.location.rglob(f"*{PARTIAL}"))
        for f in partials:
            f.unlink(missing_ok=True)
        return len(partials)


def _refuse_foreign(objects, built: Path) -> None:
    """Refuse a location holding anything that making the store in ``built`` would not write (a
    creation cut short leaves only such files or objects, which publishing overwrites)."""
    keys = objects.keys()
    if "" in keys:   # listing an object's own name finds the object
        parent = objects.location.rsplit("/", 1)[0]
        raise RemoteError(f"{objects.location} is an object (a file), not a folder: --out names the folder a store "
                          f"is written into" + (f" ({parent} for the store whose zarr.json this is)"
                                                if objects.location.endswith("/zarr.json") else "")
                          + "; choose another --out")
    foreign = sorted(set(keys) - {str(f.relative_to(built)) for f in built.rglob("*") if f.is_file()})
    if foreign:
        raise RemoteError(f"{objects.location} is not empty and not a label store (no zarr.json; it holds "
                          f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose a new --out")


def open_objects(location) -> LocalObjects | RemoteObjects:
    """A store's objects: a URL's through the cache, a path's on disk."""
    return RemoteObjects(location) if is_url(location) else LocalObjects(location)


class RemoteObjects:
    """The objects of one store URL, read through the local cache (thread-safe)."""

    def __init__(self, url: str):
        self.url = self.location = check_url(url)
        protocol = urlsplit(self.url).scheme
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options(protocol))
            single_attempt(self.fs, protocol)
        except Exception as e:   # filesystems that connect as they are made (ftp://, sftp://) fail here
            raise RemoteError(f"{self.url} cannot be read over {urlsplit(self.url).scheme}:// ({type(e).__name__}: "
                              f"{e}); check the URL, the network and the credentials; label stores are read from "
                              f"{READ_FROM}") from None
        self.cache = ObjectCache(self.url)
        self._checked: dict[str, Path | None] = {}   # key -> cached file this process checked (None: absent)
        self._listed: dict[str, dict] | None = None    # path -> info, from one listing (_listing)
        # Object stores list their objects with sizes and ETags; HTTP has no listing, only some servers'
        # HTML pages (without versions, and a page per folder): it is never listed.
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        self.lists = not set(protocols) & {"http", "https"}
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}   # key -> lock: one _fetch per key in this process

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def where(self, key: str) -> str:
        return f"{self.url}/{key}"

    def zarr_store(self, read_only: bool) -> Store:
        return CachedStore(self, read_only=read_only)

    # ---- writing (what the lease in lease.py allows: s3://) ------------------------
    def write(self, key: str, data: bytes, fsync: bool = True) -> None:
        """PUT one object: whole or absent, and durable once the call returns (``fsync`` is moot)."""
        path = f"{self.root}/{key}"
        try:
            reply = with_retries(self.fs.pipe_file, path, bytes(data))
        except Exception as e:
            raise self._unwritable(key, e) from None
        tag = reply.get("ETag") if isinstance(reply, dict) else None
        with self._lock:
            if self._listed is not None:
                self._listed.pop(path, None)
        if tag is None:   # a version we cannot name: read it back from the remote when asked
            self._checked.pop(key, None)
            return
        with self.cache.locked(key):
            local = self.cache.store(key, _version(key, {"size": len(data), "ETag": tag}), data)
        self.cache.drop_versions(key, keep=local)
        self._checked[key] = local

    def make_parents(self, keys: list[str], fsync: bool = True) -> None:
        """An object store has no folders: nothing to make."""

    def sync(self, keys: list[str]) -> None:
        """Objects are durable once written: nothing to do."""

    def delete(self, key: str) -> None:
        try:
            with_retries(self.fs.rm_file, f"{self.root}/{key}")
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._unwritable(key, e) from None
        self._forget(key)

    def delete_tree(self, prefix: str) -> None:
        keys = self.keys(prefix)
        if keys:
            try:
                with_retries(self.fs.rm, [f"{self.root}/{key}" for key in keys])
            except Exception as e:
                raise self._unwritable(prefix, e) from None
        for key in keys:
            self._forget(key)

    def _forget(self, key: str) -> None:
        """``key`` was deleted from the store: absent from now on, and evicted from the cache."""
        self._checked[key] = None
        with self._lock:
            if self._listed is not None:
                self._listed.pop(f"{self.root}/{key}", None)
        self.cache.evict(key)

    def keys(self, prefix: str = "") -> list[str]:
        """The keys of the objects under ``prefix``, listed now."""
        if not self.lists:
            raise RemoteError(f"{self.url}: the objects of an {self.fs.protocol} URL cannot be listed")
        try:
            found = with_retries(self.fs.find, f"{self.root}/{prefix}".rstrip("/"))
        except FileNotFoundError:
            return []
        except Exception as e:
            raise self._unreadable(e) from None
        return [path[len(self.root) + 1:] for path in found]

    def refresh(self) -> None:
        """Forget the versions and listing read so far: see what other processes wrote since."""
        with self._lock:
            self._checked.clear()
            self._listed = None

    def build_folder(self) -> Path:
        """Where a new store is made before :meth:`publish` uploads it."""
        return Path(tempfile.mkdtemp(prefix="mealv2-store-"))

    def publish(self, built: Path) -> None:
        """Upload the store made in folder ``built``, its root ``zarr.json`` last: a store is found at the
        URL only once all of it is there. The URL may hold only what an upload cut short left (keys
        ``built`` has), which is overwritten."""
        _refuse_foreign(self, built)
        files = sorted((f for f in built.rglob("*") if f.is_file()), key=lambda f: f == built / "zarr.json")
        for f in files:
            self.write(str(f.relative_to(built)), f.read_bytes())

    def free_space(self) -> str:
        return "an object store"

    def remove_partials(self) -> int:
        """An object store has no partial objects: a PUT cut short leaves nothing."""
        return 0

    def _unwritable(self, key: str, e: Exception) -> RemoteError:
        return RemoteError(f"{self.where(key)} cannot be written ({type(e).__name__}: {e}); check the bucket, the "
                           f"network and the credentials' write permission (README: Share a store)")

    def file(self, key: str) -> Path:
        """The local file holding the remote's current bytes of ``key``; FileNotFoundError when the
        remote has no such object."""
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:   # threads asking for one object (verify's, for each chunk of a packed one) wait for one fetch
            if key not in self._checked:
                self._checked[key] = self._fetch(key)
            found = self._checked[key]
        if found is None:
            raise FileNotFoundError(2, "no such object", self.where(key))
        return found

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
            return int(with_retries(self.fs.du, f"{self.root}/{prefix}".rstrip("/")))
        except Exception:   # not allowed to list: the size is unknown, the store still readable
            return None

    def _info(self, path: str) -> dict | None:
        """fsspec's info of ``path``; None when the remote has no such object. Any other failure (host
        unreachable, access denied) is said as such, never taken as a missing object."""
        try:
            return with_retries(self.fs.info, path)
        except FileNotFoundError as e:   # fsspec's HTTP says every failure this way, the real one as its cause
            if e.__cause__ is None or isinstance(e.__cause__, FileNotFoundError):
                return None
            raise self._unreadable(e.__cause__) from None
        except Exception as e:
            raise self._unreadable(e) from None

    def _unreadable(self, e: Exception) -> RemoteError:
        waited = (f"; no reply within {remote_timeout():g} s, {remote_retries() + 1} attempts (set "
                  f"{TIMEOUT_VARIABLE} and {RETRIES_VARIABLE} to wait longer)" if transient(e) else "")
        return RemoteError(f"{self.url} cannot be read ({type(e).__name__}: {e}{waited}); check the URL, the network "
                           f"and the credentials (README: Share a store)")

    def _listing(self) -> dict[str, dict]:
        """Every object's info from one listing where the remote lists objects with their ETags (an
        object store: a request per 1,000 objects instead of a HEAD each); empty elsewhere."""
        with self._lock:
            if self._listed is None:
                self._listed = {}
                self.fs.invalidate_cache()   # s3fs answers info() from listings it keeps: see the remote now
                if self.lists:
                    try:
                        found = with_retries(lambda: self.fs.find(self.root, detail=True))
                        self._listed = {path: info for path, info in found.items() if _tag(info)}
                    except Exception:   # not allowed to list (a public bucket may not be), unreachable...: HEADs
                        pass            # say what is wrong, per object
        return self._listed

    def _fetch(self, key: str) -> Path | None:
        """The cache file of ``key`` at the remote's version, downloaded unless cached and sound; None
        (and evicted) when the remote has no such object."""
        path = f"{self.root}/{key}"
        info = self._listing().get(path) or self._info(path)
        if info is None:
            self.cache.evict(key)
            return None
        version, size = _version(key, info), info.get("size")
        with self.cache.locked(key):   # one process of the machine downloads it; the others find it cached
            if version and (local := self.cache.lookup(key, version, size)):
                return local
            data = self._get(key)
            if data is None:   # deleted since listed (a writer packing staged objects)
                self.cache.evict(key)
                return None
            if size is not None and len(data) != size:   # replaced between the HEAD and the GET
                raise RemoteError(f"{self.where(key)} changed while it was being read ({size} bytes announced, "
                                  f"{len(data)} read): the store is being replaced; run again once it is published")
            before = set(self.cache.versions(key))
            local = self.cache.store(key, version or "c" + hashlib.sha256(data).hexdigest()[:15], data)
        if local not in before and before - {local}:
            print(f"mealv2: {self.where(key)} changed on the remote since it was cached; read it again",
                  file=sys.stderr)
        self.cache.drop_versions(key, keep=local)
        return local

    def _get(self, key: str) -> bytes | None:
        """The object's bytes; None when the remote has no such object."""
        try:
            return with_retries(self.fs.cat_file, f"{self.root}/{key}")
        except FileNotFoundError as e:
            if e.__cause__ is None or isinstance(e.__cause__, FileNotFoundError):
                return None
            raise self._unreadable(e.__cause__) from None   # fsspec's HTTP says every failure this way
        except Exception as e:   # the transport's own errors (botocore's, aiohttp's) share no base class
            raise self._unreadable(e) from None


def _version(key: str, info: dict) -> str | None:
    """A digest of what identifies ``key``'s bytes in ``info`` (fsspec's, or a PUT's reply): its size
    and the first of VERSION_FIELDS present; None when none may be trusted: no such field, or a
    ``zarr.json`` (small, rewritten in place) known only by a modification time."""
    field = next((k for k in VERSION_FIELDS if info.get(k) is not None), None)
    if field is None or (field in MODIFIED_FIELDS and key.rsplit("/", 1)[-1] == "zarr.json"):
        return None
    return hashlib.sha256(f"{info.get('size')} {info[field]}".encode()).hexdigest()[:16]


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
    """zarr store over :class:`RemoteObjects`: zarr's reads come from the local cache, its writes
    are PUTs (which also fill the cache)."""

    supports_writes = True
    supports_deletes = True
    supports_partial_writes = False

    def __init__(self, objects: RemoteObjects, read_only: bool = True):
        super().__init__(read_only=read_only)
        self.objects = objects

    @property
    def supports_listing(self) -> bool:
        return self.objects.lists

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
        await asyncio.to_thread(self.objects.write, key, value.to_bytes())

    async def delete(self, key):
        self._check_writable()
        await asyncio.to_thread(self.objects.delete, key)

    async def list(self):
        for key in await asyncio.to_thread(self.objects.keys):
            yield key

    async def list_prefix(self, prefix: str):
        for key in await asyncio.to_thread(self.objects.keys, prefix.rstrip("/")):
            yield key

    async def list_dir(self, prefix: str):
        prefix = prefix.rstrip("/")
        seen = set()
        for key in await asyncio.to_thread(self.objects.keys, prefix):
            child = key[len(prefix):].lstrip("/").split("/", 1)[0]
            if child not in seen:
                seen.add(child)
                yield child
