"""pipeline.data.storage on local paths, file:// and a real S3 endpoint over HTTP (moto's server)."""

import contextlib
import http.client
import http.server
import os
import threading
from urllib.parse import urlsplit

import pytest

from pipeline.config import StorageConfig
from pipeline.data import storage as st
from tests.conftest import free_port, moto_server

DATA = bytes(range(256)) * 40  # 10 KiB


@pytest.fixture(params=["local", "file"])
def local_root(request, tmp_path):
    root = tmp_path / "root"
    return str(root) if request.param == "local" else f"file://{root}"


@pytest.fixture
def s3_root(s3_bucket, request):
    endpoint, bucket = s3_bucket
    return f"s3://{bucket}/storage-test/{request.node.name}", StorageConfig(endpoint_url=endpoint)


def check_round_trip(root: str, cfg: StorageConfig, tmp_path) -> None:
    uri = st.join(root, "a/b/data.bin")
    st.write_bytes(uri, DATA, storage=cfg)
    assert st.read_bytes(uri, storage=cfg) == DATA
    assert st.exists(uri, storage=cfg) and st.stat_size(uri, storage=cfg) == len(DATA)
    assert not st.exists(st.join(root, "a/b/nope.bin"), storage=cfg)
    assert st.stat_size(st.join(root, "a/b/nope.bin"), storage=cfg) is None

    with st.open_input(uri, storage=cfg) as f:  # range reads: seek, read, tell
        f.seek(1000)
        assert f.read(16) == DATA[1000:1016]
        assert f.tell() == 1016
        f.seek(-8, os.SEEK_END)
        assert f.read() == DATA[-8:]

    local = tmp_path / "up.mp4"
    local.write_bytes(b"video")
    st.upload_file(str(local), st.join(root, "videos/x.mp4"), storage=cfg)
    st.write_bytes(st.join(root, "videos2/y.mp4"), b"not under videos/", storage=cfg)
    st.write_bytes(st.join(root, "videos/sub/z.MP4"), b"zz", storage=cfg)
    st.write_bytes(st.join(root, "videos/notes.txt"), b"t", storage=cfg)
    assert st.list_files(st.join(root, "videos"), storage=cfg) == [
        (st.join(root, "videos/notes.txt"), 1), (st.join(root, "videos/sub/z.MP4"), 2),
        (st.join(root, "videos/x.mp4"), 5)]
    assert [u for u, _ in st.list_files(st.join(root, "videos/"), storage=cfg, suffixes=[".mp4"])] == [
        st.join(root, "videos/sub/z.MP4"), st.join(root, "videos/x.mp4")]
    assert st.list_files(st.join(root, "nothing-here"), storage=cfg) == []

    st.download_file(st.join(root, "videos/x.mp4"), str(tmp_path / "down/x.mp4"), storage=cfg)
    assert (tmp_path / "down/x.mp4").read_bytes() == b"video"
    st.remove(st.join(root, "videos/x.mp4"), storage=cfg)
    st.remove(st.join(root, "videos/x.mp4"), storage=cfg)  # a missing one is fine
    assert not st.exists(st.join(root, "videos/x.mp4"), storage=cfg)

    missing = st.join(root, "no/such.mp4")
    for op in (lambda: st.read_bytes(missing, storage=cfg), lambda: st.open_input(missing, storage=cfg),
               lambda: st.download_file(missing, str(tmp_path / "m"), storage=cfg)):
        with pytest.raises(st.NotFoundError, match=f"^{missing}: no such"):
            op()


def test_local_round_trip(local_root, tmp_path):
    check_round_trip(local_root, StorageConfig(), tmp_path)


def test_s3_round_trip(s3_root, tmp_path):
    root, cfg = s3_root
    check_round_trip(root, cfg, tmp_path)


def test_s3_missing_bucket_names_the_uri(s3_bucket):
    cfg = StorageConfig(endpoint_url=s3_bucket[0])
    uri = "s3://no-such-bucket-here/x/y.mp4"
    for op in (st.read_bytes, st.open_input):
        with pytest.raises(st.NotFoundError,
                           match=r"^s3://no-such-bucket-here/x/y.mp4: no such bucket 'no-such-bucket-here'$"):
            op(uri, storage=cfg)
    with pytest.raises(st.NotFoundError, match="no such bucket"):
        st.list_files("s3://no-such-bucket-here/x", storage=cfg)
    with pytest.raises(st.NotFoundError, match="no such bucket"):
        st.write_bytes(uri, b"1", storage=cfg)
    assert not st.exists(uri, storage=cfg)


def test_endpoint_from_environment(s3_bucket, monkeypatch):
    """An empty `storage.endpoint_url` falls back to AWS_ENDPOINT_URL, for boto3 and pyarrow alike."""
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    uri = f"s3://{bucket}/storage-test/env-endpoint.bin"
    st.write_bytes(uri, b"abc")  # boto3
    assert st.read_bytes(uri) == b"abc"  # boto3 too
    with st.open_input(uri) as f:  # pyarrow
        assert f.read() == b"abc"


@pytest.fixture(scope="module")
def strict_s3_endpoint():
    """A moto server that checks credentials (and knows none), so every request is refused."""
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as url:
        yield url


def test_bad_credentials_message_names_uri_not_secret(strict_s3_endpoint, monkeypatch, tmp_path):
    key_id, secret = "AKIAFAKEKEYID0000000", "do-not-print-this-secret-0123456789"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    cfg = StorageConfig(endpoint_url=strict_s3_endpoint)
    uri = "s3://some-bucket/some/key.mp4"
    local = tmp_path / "f.bin"
    local.write_bytes(b"x")
    ops = {"read_bytes": lambda: st.read_bytes(uri, storage=cfg),
           "open_input": lambda: st.open_input(uri, storage=cfg),
           "exists": lambda: st.exists(uri, storage=cfg),
           "list_files": lambda: st.list_files(uri, storage=cfg),
           "write_bytes": lambda: st.write_bytes(uri, b"x", storage=cfg),
           "upload_file": lambda: st.upload_file(str(local), uri, storage=cfg),
           "download_file": lambda: st.download_file(uri, str(tmp_path / "d"), storage=cfg)}
    for name, op in ops.items():
        with pytest.raises(st.StorageError) as info:
            op()
        message = str(info.value)
        assert message.startswith(uri) and "access denied or bad credentials" in message, (name, message)
        assert "\n" not in message and secret not in message and key_id not in message, (name, message)


def test_transient_read_errors_are_retried(monkeypatch):
    monkeypatch.setattr(st, "_BACKOFF_S", 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset")
        return b"ok"

    assert st._with_retries("s3://b/k", StorageConfig(), flaky) == b"ok" and len(calls) == 3

    def down():
        raise OSError("AWS Error NETWORK_CONNECTION: connection refused")

    with pytest.raises(st.StorageError, match=r"^s3://b/k: read failed after 4 attempts"):
        st._with_retries("s3://b/k", StorageConfig(), down)


@contextlib.contextmanager
def request_log(upstream: str, *, cut_bodies: int = 0):
    """An HTTP proxy in front of `upstream` that records (method, path) of every request it
    forwards; the first `cut_bodies` GET responses lose the second half of their body."""
    target = urlsplit(upstream)
    log: list[tuple[str, str]] = []

    class Forward(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def forward(self):
            log.append((self.command, self.path))
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            upstream_conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
            response = upstream_conn.getresponse()
            data = response.read()
            upstream_conn.close()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("connection", "transfer-encoding"):
                    self.send_header(name, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            cut = self.command == "GET" and sum(method == "GET" for method, _ in log) <= cut_bodies
            self.wfile.write(data[: len(data) // 2] if cut else data)
            self.close_connection = cut

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def test_s3_read_bytes_is_one_get(s3_bucket):
    """pyarrow's readers sent a HEAD for the size, then the GET: two round trips per video."""
    endpoint, bucket = s3_bucket
    uri = f"s3://{bucket}/storage-test/one-get.bin"
    st.write_bytes(uri, DATA, storage=StorageConfig(endpoint_url=endpoint))
    with request_log(endpoint) as (proxy, log):
        cfg = StorageConfig(endpoint_url=proxy)
        assert st.read_bytes(uri, storage=cfg) == DATA
        assert log == [("GET", f"/{bucket}/storage-test/one-get.bin")]
        log.clear()
        missing = f"s3://{bucket}/storage-test/no-such.bin"
        with pytest.raises(st.NotFoundError, match=f"^{missing}: no such object$"):
            st.read_bytes(missing, storage=cfg)
        assert [method for method, _ in log] == ["GET"]


def test_s3_read_bytes_retries_a_body_cut_short(s3_bucket, monkeypatch):
    monkeypatch.setattr(st, "_BACKOFF_S", 0.0)
    endpoint, bucket = s3_bucket
    uri = f"s3://{bucket}/storage-test/cut-short.bin"
    st.write_bytes(uri, DATA, storage=StorageConfig(endpoint_url=endpoint))
    with request_log(endpoint, cut_bodies=2) as (proxy, log):
        assert st.read_bytes(uri, storage=StorageConfig(endpoint_url=proxy)) == DATA
        assert [method for method, _ in log] == ["GET"] * 3
    with request_log(endpoint, cut_bodies=4) as (proxy, log):
        with pytest.raises(st.StorageError, match=f"^{uri}: read failed after 4 attempts .*cut short"):
            st.read_bytes(uri, storage=StorageConfig(endpoint_url=proxy))


def test_s3_unreachable_endpoint_is_one_line():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    uri = "s3://some-bucket/some/key.mp4"
    with pytest.raises(st.StorageError) as info:
        st.read_bytes(uri, storage=StorageConfig(endpoint_url=endpoint))
    assert str(info.value) == f"{uri}: cannot reach the S3 endpoint {endpoint} after retries (EndpointConnectionError)"


def test_ray_storage(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    path, fs = st.ray_storage(f"s3://{bucket}/runs/", storage=StorageConfig(endpoint_url=endpoint))
    assert path == f"{bucket}/runs"
    with fs.open_output_stream(f"{path}/marker.txt") as f:  # what Ray Train does with it
        f.write(b"checkpoint")
    assert st.read_bytes(f"s3://{bucket}/runs/marker.txt", storage=StorageConfig(endpoint_url=endpoint)) == \
        b"checkpoint"
    assert st.ray_storage(f"file://{tmp_path}/runs") == (f"{tmp_path}/runs", None)


def test_storage_uri_puts_the_scheme_back_on_ray_paths(tmp_path):
    from pyarrow import fs as pafs

    # Constructing these makes no request (the endpoint is never contacted).
    s3 = pafs.S3FileSystem(region="us-east-1", endpoint_override="127.0.0.1:1", scheme="http")
    assert st.storage_uri("bucket/runs/demo/checkpoint_000003", s3) == "s3://bucket/runs/demo/checkpoint_000003"
    assert st.storage_uri(f"{tmp_path}/checkpoint_000003", pafs.LocalFileSystem()) == f"{tmp_path}/checkpoint_000003"
    assert st.storage_uri(f"{tmp_path}/checkpoint_000003", None) == f"{tmp_path}/checkpoint_000003"
    # What ray_storage hands Ray comes back as the URI it was made from.
    path, fs = st.ray_storage("s3://bucket/runs/", storage=StorageConfig(endpoint_url="http://127.0.0.1:1"))
    assert st.storage_uri(f"{path}/demo", fs) == "s3://bucket/runs/demo"


def test_join_and_uri_errors():
    assert st.join("s3://b/p/", "/x/", "y.mp4") == "s3://b/p/x/y.mp4"
    assert st.join("/data", "a") == "/data/a"
    assert st.join("file:///data", "a/b") == "file:///data/a/b"
    with pytest.raises(st.StorageError, match="^gs://b/x: unsupported URI scheme"):
        st.read_bytes("gs://b/x")
    with pytest.raises(st.StorageError, match="needs a bucket"):
        st.read_bytes("s3:///x")
