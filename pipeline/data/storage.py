"""Every read and write of the project goes through here: local paths, `file://` and `s3://`.

S3 means AWS or any S3-compatible server (MinIO, Ceph, moto). boto3 lists, uploads, downloads
and reads whole objects (one GET each); `pyarrow.fs` streams reads (seekable files with range
requests). Credentials come from the standard AWS chain (environment, config files, instance
roles); the endpoint from `StorageConfig.endpoint_url`, else `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`. Transient errors are retried with backoff; anything else becomes a
`StorageError` whose one line names the URI (never a secret).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, Callable, Iterable, TypeVar

from pipeline.config import StorageConfig

T = TypeVar("T")

_DEFAULT = StorageConfig()
_READ_ATTEMPTS = 4  # pyarrow reads and boto3 bodies cut short; boto3 requests retry inside botocore
_BACKOFF_S = 0.25
_DENIED_MARKERS = ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId",
                   "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                   "InvalidClientTokenId", "Forbidden", "HTTP status 403")
_DENIED_HINT = "access denied or bad credentials (check the AWS credential chain: environment, profile, role)"


class StorageError(RuntimeError):
    """A storage operation failed; the message is one line naming the URI."""


class NotFoundError(StorageError):
    """The object, file or bucket does not exist."""


class ObjectTooLarge(StorageError):
    """The object or file is larger than the reader allows; nothing of it was read."""

    reason = "video too large"


def _check_size(uri: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ObjectTooLarge(f"{uri}: {size} bytes, over the limit of {max_bytes} bytes")


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    version: str  # S3 ETag or local mtime in ns: changes when the content changes


# ---------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket, as in s3://bucket/prefix/key")
    return bucket, key


def local_path(uri: str) -> str:
    """The filesystem path of a local path or `file://` URI."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported URI scheme; use a local path, file:// or s3://")
    return uri


def absolute(uri: str) -> str:
    """`uri` with a local path made absolute, since Ray workers run in other folders; S3 and "" unchanged."""
    return uri if not uri or is_s3(uri) else os.path.abspath(local_path(uri))


def join(uri: str, *parts: str) -> str:
    """Join with '/' whatever the scheme: `join("s3://b/p", "x/y.mp4")` -> `s3://b/p/x/y.mp4`."""
    out = uri
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = f"{out.rstrip('/')}/{part}" if out else part
    return out


# ---------------------------------------------------------------------------------------------
# S3 clients, cached per (endpoint, region, credentials) in the process


def _endpoint(storage: StorageConfig) -> str:
    return (storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or "")


def _region(storage: StorageConfig) -> str:
    return storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""


def _cache_key(storage: StorageConfig) -> tuple[str, str, str]:
    # Credentials from the environment are part of the key (hashed: the key is never shown), so
    # that a changed identity gets a fresh client.
    creds = "\0".join(os.environ.get(k, "") for k in
                      ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"))
    return _endpoint(storage), _region(storage), hashlib.sha256(creds.encode()).hexdigest()


_lock = threading.Lock()
_boto_clients: dict[tuple[str, str, str], object] = {}
_arrow_filesystems: dict[tuple[str, str, str], object] = {}


def _boto(storage: StorageConfig):
    key = _cache_key(storage)
    with _lock:
        client = _boto_clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config as BotoConfig

            config = BotoConfig(retries={"max_attempts": 6, "mode": "standard"},
                                connect_timeout=10, read_timeout=60)
            client = boto3.session.Session().client(
                "s3", endpoint_url=key[0] or None, region_name=key[1] or None, config=config)
            _boto_clients[key] = client
    return client


def _arrow(storage: StorageConfig):
    key = _cache_key(storage)
    with _lock:
        fs = _arrow_filesystems.get(key)
        if fs is None:
            from pyarrow import fs as pafs

            endpoint, region, _ = key
            kwargs: dict = {"region": region or "us-east-1",
                            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=6)}
            if endpoint:
                # pyarrow ignores AWS_ENDPOINT_URL and wants host:port plus a scheme.
                scheme, sep, rest = endpoint.partition("://")
                kwargs["endpoint_override"] = rest.rstrip("/") if sep else endpoint
                kwargs["scheme"] = scheme if sep else "https"
            fs = pafs.S3FileSystem(**kwargs)
            _arrow_filesystems[key] = fs
    return fs


def clear_cache() -> None:
    """Forget cached clients (tests that change credentials or endpoints)."""
    with _lock:
        _boto_clients.clear()
        _arrow_filesystems.clear()


# ---------------------------------------------------------------------------------------------
# Error translation and retries


def _bucket_exists(bucket: str, storage: StorageConfig) -> bool | None:
    try:
        _boto(storage).head_bucket(Bucket=bucket)
        return True
    except Exception as err:  # noqa: BLE001 - any failure here only refines a message
        code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
        return False if code in ("404", "NoSuchBucket") else None


def _not_found(uri: str, storage: StorageConfig) -> NotFoundError:
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        if _bucket_exists(bucket, storage) is False:
            return NotFoundError(f"{uri}: no such bucket {bucket!r}")
        return NotFoundError(f"{uri}: no such object")
    return NotFoundError(f"{uri}: no such file")


def _from_boto(uri: str, err: Exception, storage: StorageConfig) -> StorageError:
    """One line for a boto3/botocore exception; credentials are never echoed."""
    from botocore import exceptions as bex

    if isinstance(err, StorageError):
        return err
    if isinstance(err, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return StorageError(f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                            "a profile or an instance role)")
    if isinstance(err, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
                        bex.ConnectionClosedError)):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {_endpoint(storage) or '(AWS default)'} "
                            f"after retries ({type(err).__name__})")
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            bucket = split_s3(uri)[0] if is_s3(uri) else "?"
            return NotFoundError(f"{uri}: no such bucket {bucket!r}")
        if code == "NoSuchKey":  # a GET's answer, which S3 gives only in an existing bucket
            return NotFoundError(f"{uri}: no such object")
        if code in ("404", "NotFound") or status == 404:
            return _not_found(uri, storage)
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                    "InvalidToken", "403", "Forbidden", "InvalidClientTokenId") or status == 403:
            return StorageError(f"{uri}: {_DENIED_HINT}")
        return StorageError(f"{uri}: S3 error {code or status}")
    # S3UploadFailedError and friends wrap the real error in their message only.
    text = str(err)
    if any(m in text for m in _DENIED_MARKERS):
        return StorageError(f"{uri}: {_DENIED_HINT}")
    if "NoSuchBucket" in text:
        return NotFoundError(f"{uri}: no such bucket {split_s3(uri)[0]!r}")
    return StorageError(f"{uri}: {type(err).__name__}")


def _from_arrow(uri: str, err: OSError, storage: StorageConfig) -> StorageError | None:
    """Map a pyarrow error to a permanent StorageError, or None when it may be transient."""
    text = str(err)
    if isinstance(err, FileNotFoundError) or "NO_SUCH_KEY" in text or "NoSuchKey" in text \
            or "Path does not exist" in text:
        return _not_found(uri, storage)
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return NotFoundError(f"{uri}: no such bucket {split_s3(uri)[0]!r}")
    if any(m in text for m in _DENIED_MARKERS):
        return StorageError(f"{uri}: {_DENIED_HINT}")
    if isinstance(err, (IsADirectoryError, NotADirectoryError)):
        return StorageError(f"{uri}: not a file")
    return None


def _with_retries(uri: str, storage: StorageConfig, fn: Callable[[], T]) -> T:
    """Run an S3 read, retrying an OSError that looks transient with exponential backoff."""
    for attempt in range(_READ_ATTEMPTS):
        try:
            return fn()
        except OSError as err:
            permanent = _from_arrow(uri, err, storage)
            if permanent is not None:
                raise permanent from None
            if attempt == _READ_ATTEMPTS - 1:
                raise StorageError(f"{uri}: read failed after {_READ_ATTEMPTS} attempts "
                                   f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
            time.sleep(_BACKOFF_S * 2 ** attempt * (1 + random.random()))
    raise AssertionError("unreachable")


def _local_error(uri: str, err: OSError) -> StorageError:
    if isinstance(err, FileNotFoundError):
        return NotFoundError(f"{uri}: no such file")
    if isinstance(err, PermissionError):
        return StorageError(f"{uri}: permission denied")
    if isinstance(err, IsADirectoryError):
        return StorageError(f"{uri}: is a directory, not a file")
    return StorageError(f"{uri}: {type(err).__name__}: {err.strerror or err}")


# ---------------------------------------------------------------------------------------------
# Reads


def open_input(uri: str, *, storage: StorageConfig = _DEFAULT) -> IO[bytes]:
    """A seekable binary file (read/seek/tell); S3 objects are read with range requests."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        fs = _arrow(storage)
        return _with_retries(uri, storage, lambda: fs.open_input_file(f"{bucket}/{key}"))
    try:
        return open(local_path(uri), "rb")
    except OSError as err:
        raise _local_error(uri, err) from None


def read_bytes(uri: str, *, storage: StorageConfig = _DEFAULT, max_bytes: int | None = None) -> bytes:
    """The whole object or file; an S3 object in one GET request. With `max_bytes`, a larger one is
    refused (ObjectTooLarge) from the response's Content-Length or the file's size, before its body is read."""
    if is_s3(uri):
        from botocore import exceptions as bex

        bucket, key = split_s3(uri)
        client = _boto(storage)

        # boto3, not pyarrow: pyarrow's readers send a HEAD for the size before their GET.
        def read() -> bytes:
            try:
                response = client.get_object(Bucket=bucket, Key=key)
                try:
                    _check_size(uri, int(response["ContentLength"]), max_bytes)
                except ObjectTooLarge:
                    response["Body"].close()  # drop the connection rather than read the body
                    raise
                return response["Body"].read()
            except ObjectTooLarge:
                raise
            except (bex.ResponseStreamingError, bex.IncompleteReadError, bex.FlexibleChecksumError) as err:
                # The body came damaged or cut short; botocore retries requests, not bodies: read again.
                raise ConnectionError(f"the response body came damaged or cut short ({type(err).__name__})") from None
            except Exception as err:  # noqa: BLE001 - translated into one line, not retried
                raise _from_boto(uri, err, storage) from None

        return _with_retries(uri, storage, read)
    try:
        with open(local_path(uri), "rb") as f:
            _check_size(uri, os.fstat(f.fileno()).st_size, max_bytes)
            return f.read()
    except OSError as err:
        raise _local_error(uri, err) from None


def download_file(uri: str, local: str, *, storage: StorageConfig = _DEFAULT) -> None:
    """Copy an object or file to a local path (parents created)."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            _boto(storage).download_file(bucket, key, local)
        except Exception as err:  # noqa: BLE001 - translated into one line
            raise _from_boto(uri, err, storage) from None
        return
    try:
        shutil.copyfile(local_path(uri), local)
    except OSError as err:
        raise _local_error(uri, err) from None


def stat(uri: str, *, storage: StorageConfig = _DEFAULT) -> ObjectInfo | None:
    """Size and version of an object or file; None when it does not exist."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            head = _boto(storage).head_object(Bucket=bucket, Key=key)
        except Exception as err:  # noqa: BLE001
            mapped = _from_boto(uri, err, storage)
            if isinstance(mapped, NotFoundError):
                return None
            raise mapped from None
        return ObjectInfo(uri, int(head["ContentLength"]), str(head.get("ETag", "")).strip('"'))
    try:
        st = os.stat(local_path(uri))
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _local_error(uri, err) from None
    if not os.path.isfile(local_path(uri)):
        return None
    return ObjectInfo(uri, st.st_size, str(st.st_mtime_ns))


def stat_size(uri: str, *, storage: StorageConfig = _DEFAULT) -> int | None:
    info = stat(uri, storage=storage)
    return None if info is None else info.size


def exists(uri: str, *, storage: StorageConfig = _DEFAULT) -> bool:
    return stat(uri, storage=storage) is not None


def _match(name: str, suffixes: tuple[str, ...] | None) -> bool:
    return suffixes is None or name.lower().endswith(suffixes)


def list_objects(uri_prefix: str, *, storage: StorageConfig = _DEFAULT,
                 suffixes: Iterable[str] | None = None) -> list[ObjectInfo]:
    """Every file under a folder URI (recursively), sorted by URI; [] when there is none.

    `uri_prefix` is a folder: `s3://b/videos` lists keys under `videos/`, not `videos2/`.
    `suffixes` (e.g. `(".mp4", ".webm")`) filters names case-insensitively.
    """
    sfx = None if suffixes is None else tuple(s.lower() for s in suffixes)
    out: list[ObjectInfo] = []
    if is_s3(uri_prefix):
        bucket, key = split_s3(uri_prefix)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        base = f"s3://{bucket}/"
        try:
            pages = _boto(storage).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"]
                    if name.endswith("/") or not _match(name, sfx):
                        continue
                    out.append(ObjectInfo(base + name, int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
        except Exception as err:  # noqa: BLE001
            raise _from_boto(uri_prefix, err, storage) from None
        return sorted(out, key=lambda o: o.uri)
    root = local_path(uri_prefix)
    if not os.path.isdir(root):
        return []
    for folder, _, files in os.walk(root):
        for name in files:
            if not _match(name, sfx):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:  # removed while listing
                continue
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            out.append(ObjectInfo(join(uri_prefix, rel), st.st_size, str(st.st_mtime_ns)))
    return sorted(out, key=lambda o: o.uri)


def list_files(uri_prefix: str, *, storage: StorageConfig = _DEFAULT,
               suffixes: Iterable[str] | None = None) -> list[tuple[str, int]]:
    """(uri, size) of every file under a folder URI, sorted; see `list_objects`."""
    return [(o.uri, o.size) for o in list_objects(uri_prefix, storage=storage, suffixes=suffixes)]


def ray_storage(uri: str, *, storage: StorageConfig = _DEFAULT) -> tuple[str, object | None]:
    """`(storage_path, storage_filesystem)` for Ray Train's `RunConfig`.

    S3 gets this module's pyarrow filesystem (endpoint override, retries) and a `bucket/prefix`
    path, as Ray wants with an explicit filesystem; a local folder becomes an absolute path.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"{bucket}/{key}".rstrip("/"), _arrow(storage)
    return os.path.abspath(local_path(uri)), None


def storage_uri(path: str, filesystem: object | None) -> str:
    """The URI of a path that Ray gives with its pyarrow filesystem (a checkpoint's `.path` and
    `.filesystem`): `s3://bucket/key` on S3, where Ray's path has no scheme; the path itself
    on local disk or any other filesystem."""
    if getattr(filesystem, "type_name", None) == "s3" and "://" not in path:
        return f"s3://{path.lstrip('/')}"
    return path


# ---------------------------------------------------------------------------------------------
# Writes (local writes are atomic: a temporary file renamed into place)


def _local_atomic(path: str, write: Callable[[str], None], uri: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)[:64]}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as err:
        raise _local_error(uri, err) from None


def write_bytes(uri: str, data: bytes, *, storage: StorageConfig = _DEFAULT) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            _boto(storage).put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as err:  # noqa: BLE001
            raise _from_boto(uri, err, storage) from None
        return

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _local_atomic(local_path(uri), write, uri)


def upload_file(local: str, uri: str, *, storage: StorageConfig = _DEFAULT) -> None:
    """Copy a local file to a URI (multipart on S3 for large files)."""
    if not os.path.isfile(local):
        raise StorageError(f"{local}: no such local file to upload to {uri}")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            _boto(storage).upload_file(local, bucket, key)
        except Exception as err:  # noqa: BLE001
            raise _from_boto(uri, err, storage) from None
        return
    _local_atomic(local_path(uri), lambda tmp: shutil.copyfile(local, tmp), uri)


def remove(uri: str, *, storage: StorageConfig = _DEFAULT) -> None:
    """Delete an object or file; a missing one is not an error."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            _boto(storage).delete_object(Bucket=bucket, Key=key)
        except Exception as err:  # noqa: BLE001
            mapped = _from_boto(uri, err, storage)
            if not isinstance(mapped, NotFoundError):
                raise mapped from None
        return
    try:
        os.remove(local_path(uri))
    except FileNotFoundError:
        pass
    except OSError as err:
        raise _local_error(uri, err) from None


def remove_many(uris: Iterable[str], *, storage: StorageConfig = _DEFAULT) -> None:
    """Delete many objects or files (S3: up to 1,000 per request); missing ones are fine."""
    by_bucket: dict[str, list[str]] = {}
    for uri in uris:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            by_bucket.setdefault(bucket, []).append(key)
        else:
            remove(uri, storage=storage)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            try:
                response = _boto(storage).delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})
            except Exception as err:  # noqa: BLE001
                raise _from_boto(f"s3://{bucket}/{chunk[0]}", err, storage) from None
            errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise StorageError(f"s3://{bucket}/{errors[0].get('Key', '')}: delete failed "
                                   f"({errors[0].get('Code', '?')})")


def remove_empty_folder(uri: str) -> None:
    """Remove a local folder if it is empty (S3 has no folders: nothing to do)."""
    if is_s3(uri):
        return
    try:
        os.rmdir(local_path(uri))
    except OSError:
        pass
