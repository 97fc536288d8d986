"""The local cache of remote stores' objects (common/store/cache.py) and remote requests' bounds
(transport.py), against real servers on localhost: moto's S3 server and Python's http.server."""
from __future__ import annotations

import collections
import errno
import functools
import gc
import os
import shutil
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import BUCKET
from test_remote import DAMAGED, _damage, store  # noqa: F401  (store: the module's fixture)

from mealv2.common.store.cache import key_hash
from mealv2.common.store.label_store import LabelStore
from mealv2.common.store.objects import RemoteObjects

pytest.importorskip("s3fs")
pytest.importorskip("aiohttp")

URL = f"s3://{BUCKET}/store.zarr"


@pytest.fixture
def s3(store, moto_s3):  # noqa: F811
    for f in store.rglob("*"):
        if f.is_file():
            moto_s3.client.put_object(Bucket=BUCKET, Key=f"store.zarr/{f.relative_to(store)}", Body=f.read_bytes())
    return moto_s3


def _gets(requests) -> collections.Counter:
    """Object GETs (not listings) by path."""
    return collections.Counter(p for m, p in requests if m == "GET" and "list-type" not in p)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_keys_with_dotdot_or_absolute_paths_never_leave_the_cache_folder(s3, tmp_path):
    cache = Path(s3.env["MEALV2_CACHE"])
    outside = tmp_path / "outside"
    outside.mkdir()
    before = _files(tmp_path) - _files(cache)
    for key in ("store.zarr/../../../outside/evil", "store.zarr//abs/evil", "store.zarr/a/../../../../outside/x"):
        s3.client.put_object(Bucket=BUCKET, Key=key, Body=b"attacker bytes")
    objects = RemoteObjects(URL)
    keys = objects.keys()
    assert any(".." in k for k in keys)
    for key in keys:
        assert objects.file(key).resolve().is_relative_to(cache.resolve())
    assert LabelStore.open(URL).verify() == []
    assert _files(tmp_path) - _files(cache) == before   # nothing written outside the cache
    # A file where the old naming (key@version) put the object is never taken for a stale version
    planted = outside / "evil@0123456789abcdef"
    planted.write_bytes(b"mine")
    s3.client.put_object(Bucket=BUCKET, Key="store.zarr/../../../outside/evil", Body=b"another version")
    assert RemoteObjects(URL).file("../../../outside/evil").read_bytes() == b"another version"
    assert planted.read_bytes() == b"mine"


def test_a_cold_verify_downloads_each_object_once_also_with_two_readers_at_once(s3, in_process):
    r = in_process("verify", URL)
    assert r.returncode == 0, r.stderr
    gets = _gets(s3.requests)
    assert gets and max(gets.values()) == 1, [p for p, n in gets.items() if n > 1]
    # Two readers of a cold cache at once (each its own locks, as two processes): still one download each
    shutil.rmtree(Path(s3.env["MEALV2_CACHE"]) / "stores")
    s3.requests.clear()
    threads = [threading.Thread(target=lambda: LabelStore.open(URL).verify()) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gets = _gets(s3.requests)
    assert gets and max(gets.values()) == 1, [p for p, n in gets.items() if n > 1]


def test_a_version_another_reader_holds_is_kept_and_deleted_objects_are_evicted(s3, capsys):
    key = "labels/c/0"
    reader = RemoteObjects(URL)            # a running `train`: checked version 1 and reads it for days
    old = reader.file(key)
    body = s3.client.get_object(Bucket=BUCKET, Key=f"store.zarr/{key}")["Body"].read()
    s3.client.put_object(Bucket=BUCKET, Key=f"store.zarr/{key}", Body=body + b"v2")
    other = RemoteObjects(URL)
    new = other.file(key)
    assert new != old and new.read_bytes() == body + b"v2"
    assert f"{URL}/{key} changed on the remote since it was cached" in capsys.readouterr().err
    assert old.read_bytes() == body         # kept: the reader may read it again
    del reader, other
    gc.collect()
    alone = RemoteObjects(URL)
    assert alone.file(key) == new
    assert not old.exists()                 # the only user deletes what nobody may read any more
    # Objects the store deletes are evicted, by the deleting process and by one finding them gone
    staged = alone.file("crc32c/c/0")
    alone.delete("crc32c/c/0")
    assert not staged.exists()
    cached = alone.file("paths/c/0")
    s3.client.delete_object(Bucket=BUCKET, Key="store.zarr/paths/c/0")
    assert not RemoteObjects(URL).exists("paths/c/0") and not cached.exists()


def test_a_damaged_or_swapped_cache_file_is_dropped_and_downloaded_again(s3, in_process):
    assert in_process("verify", URL).returncode == 0
    folder = next((Path(s3.env["MEALV2_CACHE"]) / "stores").glob("*/URL")).parent
    [damaged] = folder.glob(f"{key_hash(DAMAGED)}.*")
    damaged.write_bytes(_damage(damaged.read_bytes()))
    r = in_process("verify", URL)
    assert r.returncode == 0 and "PROBLEM" not in r.stderr and "re-label" not in r.stderr, r.stderr
    assert f"the cached copy of {URL}/{DAMAGED}" in r.stderr and "not on the remote" in r.stderr
    # Another valid object put in its place (a different size) is told apart by the remote's size
    [swapped] = folder.glob(f"{key_hash(DAMAGED)}.*")
    [other] = folder.glob(f"{key_hash('labels/c/0')}.*")
    shutil.copyfile(other, swapped)
    r = in_process("verify", URL)
    assert r.returncode == 0 and "bytes, the remote's object" in r.stderr, r.stderr
    assert LabelStore.open(URL).verify() == []


class _Handler(SimpleHTTPRequestHandler):
    no_dates = False

    def send_header(self, keyword, value):
        if not (self.no_dates and keyword == "Last-Modified"):
            super().send_header(keyword, value)

    def log_message(self, *args):
        pass


@pytest.fixture
def http(store, tmp_path):  # noqa: F811
    root = tmp_path / "www"
    shutil.copytree(store, root / "store.zarr")
    handler = type("Handler", (_Handler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_port}/store.zarr", root / "store.zarr"
    server.shutdown()


@pytest.mark.parametrize("key, no_dates", [("zarr.json", False), ("zarr.json", True), (DAMAGED, True)])
def test_an_object_republished_with_its_size_and_second_is_not_served_stale(http, tmp_path, monkeypatch, key,
                                                                           no_dates):
    """Over HTTP a zarr.json has only a Last-Modified of whole seconds; a server may send no version at all."""
    monkeypatch.setenv("MEALV2_CACHE", str(tmp_path / "cache"))
    handler, url, root = http
    handler.no_dates = no_dates
    first = RemoteObjects(url).file(key).read_bytes()
    stat = (root / key).stat()
    changed = _damage(first)
    (root / key).write_bytes(changed)                     # same size, same second
    os.utime(root / key, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert RemoteObjects(url).file(key).read_bytes() == changed


def test_a_full_or_unwritable_cache_is_named_as_the_cache_and_leaves_no_partial_file(s3, in_process, monkeypatch,
                                                                                    tmp_path):
    cache = Path(s3.env["MEALV2_CACHE"])
    fsync = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)
    monkeypatch.setattr(os, "fsync", full)
    r = in_process("verify", URL)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"the local cache {cache}/stores/" in r.stderr and "No space left on device" in r.stderr, r.stderr
    assert "MiB free there" in r.stderr and "MEALV2_CACHE" in r.stderr and "re-label" not in r.stderr
    assert not list(cache.rglob("*.partial"))
    monkeypatch.setattr(os, "fsync", fsync)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MEALV2_CACHE", str(blocker))
    r = in_process("inspect", URL)
    assert r.returncode == 2 and f"the local cache {blocker}/stores/" in r.stderr and "MEALV2_CACHE" in r.stderr


def _silent_server():
    """A socket that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    return server


def test_a_server_that_never_answers_fails_within_timeout_and_retries_naming_the_url(monkeypatch, tmp_path,
                                                                                     in_process):
    server = _silent_server()
    port = server.getsockname()[1]
    monkeypatch.setenv("MEALV2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEALV2_REMOTE_TIMEOUT", "0.5")
    monkeypatch.setenv("MEALV2_REMOTE_RETRIES", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    for url in (f"http://127.0.0.1:{port}/x.zarr", f"s3://{BUCKET}/x.zarr"):
        start = time.monotonic()
        r = in_process("inspect", url)
        assert time.monotonic() - start < 15, url
        assert r.returncode == 2 and f"{url} cannot be read" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "no reply within 0.5 s, 2 attempts" in r.stderr, r.stderr
    server.close()
    for value in ("0", "1e9", "soon"):
        monkeypatch.setenv("MEALV2_REMOTE_TIMEOUT", value)
        r = in_process("inspect", f"http://127.0.0.1:{port}/x.zarr")
        assert r.returncode == 2 and f"MEALV2_REMOTE_TIMEOUT={value!r} is refused" in r.stderr, r.stderr


def test_cache_ls_shows_and_clear_frees_a_store_skipping_one_being_read(s3, in_process):
    assert in_process("verify", URL).returncode == 0
    r = in_process("cache", "ls")
    assert r.returncode == 0 and f"{URL}: " in r.stdout and " objects, " in r.stdout and "last used" in r.stdout
    reading = LabelStore.open(URL)
    reading.verify()
    r = in_process("cache", "clear", URL)
    assert r.returncode == 1 and f"skipped {URL}: a process is reading it now" in r.stderr, r.stderr
    assert reading.verify() == []           # its files are still there
    del reading
    gc.collect()
    r = in_process("cache", "clear", URL + "/")
    assert r.returncode == 0 and f"cleared {URL}: " in r.stdout, r.stdout
    assert not list((Path(s3.env["MEALV2_CACHE"]) / "stores").glob("*/URL"))
    assert "0 store(s)" in in_process("cache", "ls").stdout
    r = in_process("cache", "clear", "not/a/url")
    assert r.returncode == 2 and "the cache holds stores read from URLs" in r.stderr
