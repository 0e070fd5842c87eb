"""Where shard files live: a local folder, or an S3 prefix (`s3://bucket/prefix`, any S3-compatible server).

Readers go through `read_bytes` and `read_ranges` with a file's location (a local path or an `s3://` URL), so the
format, the reader and the writer do not care which. S3 access is boto3's client, configured from the standard
environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_REGION`), with botocore's own
retries (backoff on timeouts, throttling and 5xx); boto3 is an optional extra, imported only for `s3://` locations.
Every failure becomes one line naming the URL: FileNotFoundError for an object that is not there (as for a local
file, so callers treat both alike), ShardError for the rest.
"""
from __future__ import annotations

import http.client
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.shards.errors import ShardError

S3 = "s3://"
# Ranged GETs closer than this are merged into one request (the bytes between are read and dropped), up to
# MAX_REQUEST bytes a request: fewer round trips for samples that sit near each other in a shard.
MERGE_GAP = 256 * 1024
MAX_REQUEST = 8 * 1024 * 1024
PARALLEL_REQUESTS = 8  # GETs in flight per process while one batch is read


def is_s3(location: str | Path) -> bool:
    return str(location).startswith(S3)


def join(root: str | Path, name: str) -> str:
    """`root`/`name` for a folder or an S3 prefix (Path would fold the `//` of `s3://`)."""
    return f"{str(root).rstrip('/')}/{name}" if is_s3(root) else str(Path(root) / name)


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len(S3):].partition("/")
    if not bucket:
        raise ShardError(f"{url}: an S3 location is s3://BUCKET/PREFIX")
    return bucket, key


# -- reading ----------------------------------------------------------------------------------------------------------

def read_bytes(location: str | Path) -> bytes:
    """The whole file. FileNotFoundError when it is not there (a folder or S3), ShardError for other S3 problems."""
    if not is_s3(location):
        return Path(location).read_bytes()
    bucket, key = split_s3(str(location))
    return _s3_call(str(location), lambda c: c.get_object(Bucket=bucket, Key=key)["Body"].read())


def read_ranges(location: str | Path, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Bytes [start, stop) of the file for each range, in order; a range past the end comes back short, as a read of
    a truncated file does."""
    if not is_s3(location):
        out = []
        with open(location, "rb") as f:
            for start, stop in ranges:
                f.seek(start)
                out.append(f.read(stop - start))
        return out
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    requests: list[list[int]] = []  # each: [start, stop, range indices...]
    for i in order:
        start, stop = ranges[i]
        last = requests[-1] if requests else None
        if last and start - last[1] <= MERGE_GAP and max(stop, last[1]) - last[0] <= MAX_REQUEST:
            last[1] = max(last[1], stop)
            last.append(i)
        else:
            requests.append([start, stop, i])
    url = _presigned(str(location))

    def fetch(request):
        return _ranged_get(str(location), url, request[0], request[1])

    out: list[bytes] = [b""] * len(ranges)
    for request, data in zip(requests, _pool().map(fetch, requests)):
        if len(request) == 3 and ranges[request[2]] == (request[0], request[1]):
            out[request[2]] = data  # a request for exactly one range: no copy
            continue
        for i in request[2:]:
            start, stop = ranges[i]
            out[i] = data[start - request[0]:stop - request[0]]
    return out


def file_sizes(root: str | Path) -> dict[str, int]:
    """Name -> size of the files directly under `root` (a folder or an S3 prefix): one listing, not a request per
    file."""
    return {name: size for name, (size, _) in file_stats(root).items()}


def file_stats(root: str | Path) -> dict[str, tuple[int, str]]:
    """Name -> (size, version) of the files directly under `root`, from one listing. The version changes whenever
    the bytes can have: a local file's inode and ctime (no copy, `touch` or rename over it keeps both), an S3
    object's ETag."""
    if not is_s3(root):
        if not Path(root).is_dir():
            return {}
        out = {}
        for e in os.scandir(root):
            try:
                if e.is_file():
                    st = e.stat()
                    out[e.name] = (st.st_size, f"{st.st_ino}:{st.st_ctime_ns}")
            except OSError:  # gone since the listing (a writer's temporary file): not one of the set's
                pass
        return out
    return {name: found for name, found in objects(str(root)).items() if "/" not in name}


def sizes(root: str) -> dict[str, int]:
    """Name -> size of every object under the S3 prefix `root`, sub-folders included (`.parts/x.json`)."""
    return {name: size for name, (size, _) in objects(root).items()}


def objects(root: str) -> dict[str, tuple[int, str]]:
    """Name -> (size, ETag) of every object under the S3 prefix `root`, sub-folders included."""
    bucket, prefix = split_s3(root)
    prefix = prefix.rstrip("/") + "/" if prefix else ""

    def listing(client):
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.update({obj["Key"][len(prefix):]: (obj["Size"], obj.get("ETag", "")) for obj in
                          page.get("Contents", [])})
        return found
    return _s3_call(root, listing)


# -- writing (tools/make_shards.py --out s3://...) ---------------------------------------------------------------------

def upload(local: Path, url: str) -> None:
    """One file to S3; boto3's transfer manager splits large files into a multipart upload."""
    bucket, key = split_s3(url)
    _s3_call(url, lambda c: c.upload_file(str(local), bucket, key))


def put_bytes(url: str, data: bytes) -> None:
    bucket, key = split_s3(url)
    _s3_call(url, lambda c: c.put_object(Bucket=bucket, Key=key, Body=data))


def delete(root: str, keys: list[str]) -> None:
    bucket, prefix = split_s3(root)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    for first in range(0, len(keys), 1000):  # the API's batch limit
        objects = [{"Key": prefix + k} for k in keys[first:first + 1000]]
        _s3_call(root, lambda c: c.delete_objects(Bucket=bucket, Delete={"Objects": objects}))


# -- ranged reads -----------------------------------------------------------------------------------------------------
# Image bytes are read with plain HTTP GETs of a presigned URL (one per object and process, valid for PRESIGN_S): the
# signature covers the object, not the Range header, so a shard's many ranged reads skip botocore's per-request
# signing and parsing, which cost more CPU than decoding the JPEG they fetch.
PRESIGN_S = 6 * 3600
_presigns: dict[tuple, tuple[float, str]] = {}


def _presigned(location: str) -> str:
    key = (os.getpid(), location, *(os.environ.get(k) for k in ENVIRONMENT))
    made, url = _presigns.get(key, (0.0, ""))
    if time.time() - made > PRESIGN_S / 2:
        bucket, obj = split_s3(location)
        url = _s3_call(location, lambda c: c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": obj},
                                                                    ExpiresIn=PRESIGN_S))
        made = time.time()
        _presigns[key] = (made, url)
    return url


def _ranged_get(location: str, url: str, start: int, stop: int) -> bytes:
    """One ranged GET over a kept-alive connection of this thread (http.client: the least work per request in
    Python); connection failures and 5xx replies are retried with backoff, AWS_MAX_ATTEMPTS tries in all."""
    parts = urlsplit(url)
    target = parts.path + ("?" + parts.query if parts.query else "")
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", 5))
    for attempt in range(1, attempts + 1):
        try:
            conn = _connection(parts.scheme, parts.netloc)
            conn.request("GET", target, headers={"Range": f"bytes={start}-{stop - 1}"})
            reply = conn.getresponse()
            data, status = reply.read(), reply.status
        except (OSError, http.client.HTTPException) as e:
            _drop_connection(parts.scheme, parts.netloc)
            data, status, failure = b"", None, f"{type(e).__name__}: {e}"
        if status in (200, 206):
            return data
        if status == 416:
            return b""  # a range wholly past the end: the file is shorter than its index says
        if status == 404:
            raise FileNotFoundError(f"{location}: no such object")
        if status is not None:
            failure = f"HTTP {status} " + ("access denied (credentials, or a presigned URL that expired)"
                                           if status == 403 else reply.reason)
        if attempt == attempts or (status is not None and status < 500):
            raise ShardError(f"{location}: {failure}")
        time.sleep(0.5 * 2 ** (attempt - 1))  # a failed connection or a 5xx: try again


_threads = threading.local()


def _connection(scheme: str, netloc: str) -> http.client.HTTPConnection:
    pool = getattr(_threads, "connections", None)
    if pool is None or getattr(_threads, "pid", None) != os.getpid():  # not across a fork
        pool = _threads.connections = {}
        _threads.pid = os.getpid()
    key = (scheme, netloc)
    if key not in pool:
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        pool[key] = cls(netloc, timeout=60)
    return pool[key]


def _drop_connection(scheme: str, netloc: str) -> None:
    conn = getattr(_threads, "connections", {}).pop((scheme, netloc), None)
    if conn is not None:
        conn.close()


# -- the client -------------------------------------------------------------------------------------------------------

_clients: dict[tuple, object] = {}  # per process and settings: a boto3 client must not cross a fork
ENVIRONMENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION",
               "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_MAX_ATTEMPTS")


def environment() -> dict[str, str]:
    """The AWS_* settings of this process, for worker processes that may have started before they were set."""
    return {k: os.environ[k] for k in ENVIRONMENT if k in os.environ}


_pools: dict[int, ThreadPoolExecutor] = {}


def _client():
    key = (os.getpid(), *(os.environ.get(k) for k in ENVIRONMENT))
    if key not in _clients:
        import boto3
        from botocore.config import Config

        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", 5))  # botocore's standard retries: backoff, 5xx, timeouts
        config = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                        max_pool_connections=2 * PARALLEL_REQUESTS)
        # A session of its own: boto3's default session keeps the credentials it first found, even after the
        # environment changes.
        _clients[key] = boto3.session.Session().client("s3", config=config)
    return _clients[key]


def _pool() -> ThreadPoolExecutor:
    pid = os.getpid()
    if pid not in _pools:
        _pools[pid] = ThreadPoolExecutor(PARALLEL_REQUESTS, thread_name_prefix="s3-get")
    return _pools[pid]


def _s3_call(url: str, call):
    """`call(client)`, with every failure turned into one ShardError line naming `url`."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise ShardError("s3:// locations need boto3: pip install -e '.[s3]' (or pip install boto3)") from None
    try:
        return call(_client())
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404"):
            raise FileNotFoundError(f"{url}: no such object") from None
        reason = {"NoSuchBucket": "no such bucket",
                  "InvalidAccessKeyId": "the access key is not known to the server (AWS_ACCESS_KEY_ID)",
                  "SignatureDoesNotMatch": "wrong secret key (AWS_SECRET_ACCESS_KEY)",
                  "AccessDenied": "access denied"}.get(code, f"{code or 'error'}: {e}")
        raise ShardError(f"{url}: {reason}") from None
    except BotoCoreError as e:  # no credentials, an endpoint that does not answer (after botocore's retries), ...
        raise ShardError(f"{url}: {type(e).__name__}: {e}") from None
