"""Shared fixtures: a real S3 endpoint over HTTP (moto's server) and a local Ray instance."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

# Fake credentials from the start, so that Ray workers started by any fixture inherit the same
# environment as the moto S3 server's clients.
os.environ.update(AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY="testing-secret-value",
                  AWS_DEFAULT_REGION="us-east-1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # the server answers, if only with an error status
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up within {timeout_s:.0f} s")
            time.sleep(0.2)


@contextlib.contextmanager
def moto_server(**env: str):
    """moto's S3 server on a free loopback port, with `env` added to its environment."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server (the test credentials are set above)."""
    with moto_server() as url:
        yield url


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint):
    """A fresh bucket on the moto server; returns (endpoint_url, bucket)."""
    import boto3

    bucket = "uniformer-test"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return s3_endpoint, bucket


@pytest.fixture(scope="session")
def ray_local():
    """A Ray instance of its own for this test session (never attaches to a running cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()
