"""Label stores read from URLs, against real servers on localhost: Python's http.server for
http:// and moto's S3 server (real HTTP, botocore, s3fs) for s3://."""
from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from conftest import BUCKET, SECRET, run_cli

from mealv2.common.store.cache import key_hash
from mealv2.common.store.label_store import LabelStore
from mealv2.stage1_label.config import LabelConfig
from mealv2.stage1_label.labeler import run_label

pytest.importorskip("boto3")
pytest.importorskip("s3fs")
pytest.importorskip("aiohttp")   # fsspec's HTTP filesystem

DAMAGED = "probs/c/1/0/0/0"                 # round 1's object of probs; _damage hits its shard 0
TRAIN = ["-a", "test_resnet", "--epochs", 1, "--batch-size", 8, "--device", "cpu", "--workers", 1, "--seed", 3]


@pytest.fixture(scope="module")
def store(tiny_data, tmp_path_factory):
    """tiny_data (12 images) labelled: 2 rounds x 2 crops, shards of 8 images (2 shards)."""
    work = tmp_path_factory.mktemp("remote")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), work / "teacher.pth")
    run_label(LabelConfig(data=str(tiny_data), teachers=[f"test_resnet={work / 'teacher.pth'}@32"],
                          out=str(work / "store.zarr"), rounds=2, crops_per_image=2, res=32,
                          topk=2, shard_size=8, batch_size=8, workers=1, device="cpu", teacher_check=False,
                          progress=False))
    return work / "store.zarr"


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):   # record, do not print
        self.server.requests.append((self.command, self.path))


@pytest.fixture
def http(store, tmp_path):
    """A copy of the store served at http://127.0.0.1:PORT/store.zarr; ``requests`` lists (method, path)."""
    root = tmp_path / "www"
    shutil.copytree(store, root / "store.zarr")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}/store.zarr", root=root / "store.zarr",
                          requests=server.requests)
    server.shutdown()


@pytest.fixture
def s3(store, moto_s3):
    """The store uploaded to moto's S3 server at s3://stores/store.zarr (conftest's ``moto_s3``)."""
    for f in store.rglob("*"):
        if f.is_file():
            moto_s3.client.put_object(Bucket=BUCKET, Key=f"store.zarr/{f.relative_to(store)}", Body=f.read_bytes())
    return SimpleNamespace(url=f"s3://{BUCKET}/store.zarr", env=moto_s3.env, client=moto_s3.client,
                           requests=moto_s3.requests)


def _damage(data: bytes) -> bytes:
    return data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]


def _inspect(store, env) -> dict:
    r = run_cli("inspect", store, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_inspect_and_verify_read_over_http_and_s3_as_from_disk_and_from_the_cache(store, http, s3, tmp_path):
    env = {"MEALV2_CACHE": str(tmp_path / "cache")}
    on_disk = LabelStore.open(store)
    for url in (http.url, s3.url):
        remote = LabelStore.open(url)
        assert remote.path == url and remote.digest == on_disk.digest
        for r in range(2):
            for key, value in vars(on_disk.read_round(r)).items():
                np.testing.assert_array_equal(getattr(remote.read_round(r), key), value)
    local = _inspect(store, env)
    for url, e in ((http.url, env), (s3.url, s3.env)):
        expected = {**local, "store": url}
        if url.startswith("http"):   # HTTP does not list a store's objects: its size is unknown
            expected.update(bytes_on_disk=None, bytes_per_crop=None,
                            bytes_per_crop_by_layer=dict.fromkeys(local["bytes_per_crop_by_layer"]))
        assert _inspect(url, e) == expected
        r = run_cli("verify", url, env=e)
        assert r.returncode == 0 and f"{url}: OK" in r.stdout, r.stderr
    # The cache: HTTP objects under $MEALV2_CACHE/stores/<hash>/, named by hashes of key and version, with the URL
    [folder] = [p.parent for p in (tmp_path / "cache" / "stores").glob("*/URL") if p.read_text().strip() == http.url]
    assert list(folder.glob(f"{key_hash(DAMAGED)}.*"))
    # A second verify asks the server whether each object changed (HEAD) and downloads none of them again but
    # the small metadata, which only a Last-Modified of whole seconds versions (test_cache.py says why)
    http.requests.clear()
    r = run_cli("verify", http.url, env=env)
    assert r.returncode == 0, r.stderr
    assert http.requests and {m for m, _ in http.requests} == {"HEAD", "GET"}
    assert all(p.endswith("/zarr.json") for m, p in http.requests if m == "GET"), http.requests
    # From S3, one listing gives every object's version (its ETag): no request per object
    s3.requests.clear()
    r = run_cli("verify", s3.url, env=s3.env)
    assert r.returncode == 0, r.stderr
    assert s3.requests and all(m == "GET" and "list-type=2" in p for m, p in s3.requests), s3.requests


def test_a_store_changed_on_the_server_is_read_again_and_a_damaged_remote_chunk_named(store, http, s3, tiny_data,
                                                                                     tmp_path):
    env = {"MEALV2_CACHE": str(tmp_path / "cache")}
    assert run_cli("verify", http.url, env=env).returncode == 0          # every object cached
    chunk = http.root / DAMAGED
    chunk.write_bytes(_damage(chunk.read_bytes()))                       # same size: only its date tells
    os.utime(chunk, (chunk.stat().st_mtime + 60,) * 2)
    r = run_cli("verify", http.url, env=env)
    assert r.returncode == 1
    assert f"{http.url}/{DAMAGED} changed on the remote since it was cached" in r.stderr
    assert f"PROBLEM {DAMAGED}[0]: unreadable chunk (its CRC32C does not match" in r.stderr
    # S3: training refuses the store before its first step, naming the chunk
    key = f"store.zarr/{DAMAGED}"
    body = s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=_damage(body))
    r = run_cli("train", tiny_data, "--labels", s3.url, "-o", tmp_path / "run", *TRAIN, "--dry-run", env=s3.env)
    assert r.returncode != 0
    assert f"{s3.url} is damaged or unfinished, refusing to train on it" in r.stderr and DAMAGED in r.stderr, r.stderr


@pytest.mark.slow
def test_students_trained_from_s3_and_http_equal_the_one_from_the_local_copy_and_no_secret_is_written(
        store, http, s3, tiny_data, tmp_path, in_process):
    runs, outputs = {}, []   # s3.env (the credentials, the endpoint, the cache) is this process's environment
    for name, labels in (("local", store), ("http", http.url), ("s3", s3.url)):
        runs[name] = tmp_path / name
        r = in_process("train", tiny_data, "--labels", labels, "-o", runs[name], *TRAIN)
        assert r.returncode == 0, r.stderr
        outputs += [r.stdout, r.stderr]
    weights = {name: torch.load(run / "last.pt", map_location="cpu", weights_only=False)["model"]
               for name, run in runs.items()}
    for name in ("http", "s3"):
        assert weights[name].keys() == weights["local"].keys()
        for key, value in weights["local"].items():
            assert torch.equal(weights[name][key], value), (name, key)
    # The credentials came from the environment; none is in a checkpoint, a log, a metric or the cache
    files = [f for folder in (*runs.values(), tmp_path / "cache") for f in folder.rglob("*") if f.is_file()]
    assert any(f.name == "last.pt" for f in files) and any("stores" in f.parts for f in files)
    assert not [f for f in files if SECRET.encode() in f.read_bytes()]
    assert not [o for o in outputs if SECRET in o]


def test_store_urls_with_credentials_or_unknown_protocols_or_no_server_are_refused_naming_the_fix(tmp_path):
    # (URLs given where no store is read: tests/test_bad_input.py)
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli("inspect", f"http://127.0.0.1:{port}/x.zarr", env={"MEALV2_CACHE": str(tmp_path)})
    assert r.returncode == 2 and f"http://127.0.0.1:{port}/x.zarr cannot be read (ClientConnectorError" in r.stderr
    assert "not a label store" not in r.stderr and "Traceback" not in r.stderr
    r = run_cli("inspect", f"https://someone:{SECRET}@example.com/x.zarr")
    assert r.returncode == 2 and "credentials or a query string in a store URL are refused" in r.stderr
    assert "AWS_SECRET_ACCESS_KEY" in r.stderr and SECRET not in r.stderr
    r = run_cli("verify", "nosuchprotocol://x/y.zarr")
    assert r.returncode == 2 and "no fsspec filesystem reads 'nosuchprotocol://' URLs" in r.stderr
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        r = run_cli("verify", "gs://bucket/y.zarr")
        assert r.returncode == 2 and "reading 'gs://' needs a package that is not installed" in r.stderr


def test_a_fragment_a_protocol_that_cannot_connect_and_credentials_are_refused_naming_url_scheme_and_port(
        tmp_path, in_process):
    """Once: "unreadable metadata (Expecting value...)" for a '#'; only "Connection refused" for ftp://;
    the URL printed without its port."""
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = in_process("inspect", f"http://127.0.0.1:{port}/x.zarr#v2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (f"http://127.0.0.1:{port}/x.zarr#v2: a '#' in a store URL is refused" in r.stderr
            and f"read from http://127.0.0.1:{port}/x.zarr)" in r.stderr), r.stderr
    r = in_process("verify", f"ftp://127.0.0.1:{port}/x.zarr")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (f"ftp://127.0.0.1:{port}/x.zarr cannot be read over ftp:// (ConnectionRefusedError" in r.stderr
            and "label stores are read from https://, http://, s3://" in r.stderr), r.stderr
    r = in_process("inspect", f"https://someone:{SECRET}@example.com:8443/x.zarr")
    assert r.returncode == 2 and SECRET not in r.stderr
    assert "https://example.com:8443/x.zarr: credentials or a query string" in r.stderr, r.stderr
