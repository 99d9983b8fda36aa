"""The object-store tier: S3 and what speaks its API (AWS S3, Ceph RGW, MinIO, R2, GCS), ``s3://bucket/prefix``.

Persistent, cheap and shared across hosts, usually the last tier (cpu -> disk -> redis -> s3). One chunk is one
S3 object ``<prefix><chunk key>`` holding the canonical format as every tier does ([sealed header][payload]):
the object describes itself, so readers need none of the writer's settings.

Commit point: the store's own. S3 makes an object visible only when complete, from one PUT or a completed
multipart upload, so a writer killed mid-object leaves nothing under the key (an unfinished multipart upload
is invisible; ``lmcache s3 prune`` or the bucket's AbortIncompleteMultipartUpload rule reclaims it).

Reads: the first ranged GET returns the header, its head checksum table and the object's size; the rest is
read by parallel ranged GETs straight into the pool memory (``readinto``, no intermediate copy), pinned to the
first response's ETag so a concurrent overwrite cannot mix two objects. A TP head shard reads only its heads'
byte range. The header, the table and every head are verified; a truncated, foreign or corrupt object is a
counted miss and is deleted; a missing one is a plain miss.

Client library: boto3 (threads), chosen by measurement against the real Ceph gateway on this machine kind
(32 MiB objects, client and server on 2 cores): PUT 0.19-0.21 GB/s vs obstore's 0.15-0.16, GET 0.42-0.46 vs
0.43, parallel ranged GET 0.47-0.62 vs 0.53; boto3 also reads into a caller's buffer (obstore returns a new
buffer per range: one more copy) and brings the standard AWS credential chain (environment, profiles,
instance roles) with no native code.

Failure policy (``RemoteHealth``): a store that is down or slow makes lookups miss and stores drop (counted)
within ``s3_timeout_s``, then the tier stays quiet for a second and retries by itself. Capacity: lmcache never
expires objects; give the bucket a lifecycle rule, or run ``lmcache s3 prune --older-than`` (README).
"""

from __future__ import annotations

import logging
import re
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
from botocore.config import Config

from lmcache.core.chunk_format import HEADER_BYTES, ChunkCorrupt, ChunkHeader, check_header, head_sums, verify_heads
from lmcache.core.config import LMCacheConfig
from lmcache.core.hookspecs import HeadDest
from lmcache.core.keys import ObjectKey
from lmcache.core.memory_pool import MemoryObj
from lmcache.core.tiers.health import RemoteHealth
from lmcache.core.tiers.stats import TierStats
from lmcache.core.tiers.whole_load import load_whole

log = logging.getLogger("lmcache")
SCHEMES = ("s3",)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ABSENT = {"NoSuchKey", "404", "NotFound"}
_CHANGED = {"PreconditionFailed", "412"}
#: transport failures and refusals: the tier goes quiet and retries; never an exception to the engine
_FAILURES = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError)
#: error codes with the fix a person needs (the log line and ``lmcache doctor`` say them)
_HINTS = {
    "NoSuchBucket": "the bucket does not exist: create it, or fix remote_url",
    "InvalidAccessKeyId": "the access key is not known to this store: fix AWS_ACCESS_KEY_ID (or the profile)",
    "SignatureDoesNotMatch": "the secret key is wrong: fix AWS_SECRET_ACCESS_KEY (or the profile)",
    "AccessDenied": "these credentials may not use this bucket: grant s3:GetObject/PutObject/DeleteObject/ListBucket",
    "403": "credentials rejected (403): fix AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the bucket policy",
}


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix) of ``s3://bucket/prefix``; a one-line error naming the fix otherwise."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise ValueError(f"remote_url '{url}': expected s3://bucket/prefix")
    bucket = parts.netloc
    if not _BUCKET.match(bucket or ""):
        raise ValueError(f"remote_url '{url}': '{bucket}' is not an S3 bucket name (3-63 characters: lowercase "
                         "letters, digits, '.' and '-'), e.g. s3://kv-cache/lmcache/")
    prefix = parts.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def error_code(e: BaseException) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        err = e.response.get("Error", {})
        return str(err.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return type(e).__name__


def hint_for(e: BaseException, endpoint: str) -> str:
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    if isinstance(e, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
        return f"nothing answers at {endpoint}: start the object store, or fix s3_endpoint_url"
    if isinstance(e, botocore.exceptions.ReadTimeoutError):
        return (f"{endpoint} accepted the connection but did not answer within s3_timeout_s: check the store's "
                "health (full, overloaded), or raise s3_timeout_s")
    return _HINTS.get(error_code(e), "")


def make_client(config: LMCacheConfig, pool_size: int) -> Any:
    """A boto3 S3 client from the standard AWS chain (env, profile, instance role) and the s3_* keys."""
    session = boto3.session.Session()
    endpoint = config.s3_endpoint_url or None
    style = config.s3_addressing_style
    if style == "auto":  # a custom endpoint (Ceph, MinIO) is addressed by path; AWS by virtual host
        style = "path" if endpoint or session.get_config_variable("endpoint_url") else "virtual"
    timeout = config.s3_timeout_s
    return session.client(
        "s3", endpoint_url=endpoint, region_name=config.s3_region or session.region_name or "us-east-1",
        config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1, "mode": "standard"},
                      max_pool_connections=pool_size, s3={"addressing_style": style},
                      # our own checksums cover every byte; the SDK's extra CRC would only cost CPU
                      request_checksum_calculation="when_required", response_checksum_validation="when_required"))


def _read_exact(body: Any, view: memoryview) -> None:
    at = 0
    while at < len(view):
        n = body.readinto(view[at:])
        if not n:
            raise ChunkCorrupt(f"object ended after {at} of {len(view)} bytes")
        at += n


class S3Tier:
    """Invariant: an object under a chunk's key is complete (the store's atomic PUT/multipart completion) and is
    used only after its header, table and heads verified; anything else is a miss."""

    name = "s3"

    def __init__(self, url: str, config: LMCacheConfig, retry_interval_s: float = 1.0) -> None:
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.part_bytes = int(config.s3_part_mb * 2**20)
        self.multipart_bytes = int(config.s3_multipart_mb * 2**20)
        self.concurrency = config.s3_concurrency
        #: objects written side by side by the write-back (``ParallelWrites``)
        self.write_workers = max(1, min(4, config.s3_concurrency))
        self.client = make_client(config, pool_size=2 * self.concurrency + self.write_workers)
        self.endpoint = str(self.client.meta.endpoint_url)
        self.stats = TierStats()
        self.health = RemoteHealth(self.safe_url(), self.stats, retry_interval_s)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="lmcache-s3")

    def safe_url(self) -> str:
        return f"{self.url} at {self.endpoint}"

    def object_name(self, key: ObjectKey) -> str:
        return f"{self.prefix}{key}"

    def _failed(self, what: str, e: Exception) -> None:
        self.health.failed(what, e, hint_for(e, self.endpoint))

    # -- lookup -------------------------------------------------------------------------------------

    def _exists(self, key: ObjectKey) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_name(key))
            return True
        except botocore.exceptions.ClientError as e:
            if error_code(e) in _ABSENT:
                return False
            raise

    def contains(self, key: ObjectKey) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: list[ObjectKey]) -> list[bool]:
        """Each key exactly: parallel HEADs (``s3_concurrency`` in flight)."""
        if not keys or not self.health.usable():
            return [False] * len(keys)
        try:
            found = list(self._pool.map(self._exists, keys))
        except _FAILURES as e:
            self._failed("lookup", e)
            return [False] * len(keys)
        self.health.ok()
        return found

    def leading(self, keys: list[ObjectKey]) -> int:
        """How many of a prompt's chunk keys are in the bucket before the first absent one (PrefixLookup), in a
        few waves of ``s3_concurrency`` parallel HEADs instead of one HEAD per chunk: S3 has no batched
        existence check, and a 128K-token prompt is hundreds of chunks. Each wave probes evenly spaced keys of
        the range where the first absent one must be, narrowing it ``s3_concurrency + 1`` times; the last wave
        checks what is left one by one. The stored chunks are taken to form a prefix (they are written in
        prompt order); a hole between probes is found when the chunk is loaded, where the loaded prefix ends."""
        if not keys or not self.health.usable():
            return 0
        try:
            lo, hi = 0, len(keys)  # keys[:lo] are taken as present; the first absent one is in [lo, hi]
            while hi - lo > self.concurrency:
                step = (hi - lo) / (self.concurrency + 1)
                probes = sorted({min(hi - 1, lo + int(step * (i + 1))) for i in range(self.concurrency)})
                found = list(self._pool.map(self._exists, [keys[p] for p in probes]))
                miss = next((p for p, f in zip(probes, found) if not f), None)
                present = [p for p, f in zip(probes, found) if f and (miss is None or p < miss)]
                lo = present[-1] + 1 if present else lo
                hi = miss if miss is not None else hi
            found = list(self._pool.map(self._exists, keys[lo:hi]))
        except _FAILURES as e:
            self._failed("lookup", e)
            return 0
        self.health.ok()
        return lo + next((i for i, f in enumerate(found) if not f), len(found))

    # -- reads --------------------------------------------------------------------------------------

    def load(self, key: ObjectKey, alloc: Callable[[int], MemoryObj | None]) -> tuple[ChunkHeader, MemoryObj] | None:
        return load_whole(lambda dest: self._read(key, None, dest), alloc)

    def load_heads(self, key: ObjectKey, head_start: int, head_end: int, dest: HeadDest) -> ChunkHeader | None:
        """Heads [head_start, head_end) of the object: ranged GETs of their bytes only (RangedLoad)."""
        return self._read(key, (head_start, head_end), dest)

    def _get_range(self, name: str, lo: int, hi: int, etag: str, into: memoryview) -> None:
        resp = self.client.get_object(Bucket=self.bucket, Key=name, Range=f"bytes={lo}-{hi - 1}", IfMatch=etag)
        with resp["Body"] as body:
            _read_exact(body, into)

    def _read(self, key: ObjectKey, heads: tuple[int, int] | None, dest: HeadDest) -> ChunkHeader | None:
        if not self.health.usable():
            self.stats.misses += 1
            return None
        name = self.object_name(key)
        # the first response: a whole object's first part, or for a head shard the header and its table only (its
        # size follows from the key's head range), so no byte before the wanted heads crosses the network
        whole = heads is None or heads == (key.head_start, key.head_end)
        first_end = self.part_bytes if whole else HEADER_BYTES + 8 * (key.head_end - key.head_start)
        try:
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=name, Range=f"bytes=0-{first_end - 1}")
            except botocore.exceptions.ClientError as e:
                if error_code(e) in _ABSENT:
                    self.stats.misses += 1
                    self.health.ok()
                    return None
                if error_code(e) == "InvalidRange":  # an empty object
                    raise ChunkCorrupt("empty object") from None
                raise
            with resp["Body"] as body:
                size = int(str(resp.get("ContentRange") or f"/{resp['ContentLength']}").rpartition("/")[2])
                sealed = bytearray(HEADER_BYTES)
                _read_exact(body, memoryview(sealed))
                header = check_header(bytes(sealed), key)  # a copy of ~100 bytes: the buffer grows next
                sealed.extend(bytes(header.sealed_nbytes - HEADER_BYTES))
                _read_exact(body, memoryview(sealed)[HEADER_BYTES:])
                sums = head_sums(header, memoryview(sealed))
                if size != header.sealed_nbytes + header.payload_nbytes:
                    raise ChunkCorrupt(f"object is {size} bytes, its header says "
                                       f"{header.sealed_nbytes + header.payload_nbytes}")
                h0, h1 = heads or (header.head_start, header.head_end)
                if not header.head_start <= h0 < h1 <= header.head_end:
                    raise ValueError(f"heads [{h0}, {h1}) are not within the object's "
                                     f"[{header.head_start}, {header.head_end})")
                first = h0 - header.head_start
                lo = header.sealed_nbytes + first * header.head_nbytes  # the wanted bytes, within the object
                hi = lo + (h1 - h0) * header.head_nbytes
                view = dest(header)
                if view is None:
                    self.stats.drops += 1
                    return None
                if len(view) != hi - lo:
                    raise ValueError(f"dest holds {len(view)} bytes for {hi - lo} bytes of heads")
                # the first response runs to here; it holds the start of the payload only when reading it whole
                streamed_to = min(size, first_end) if whole else lo
                # the rest first, in parallel, pinned to this object's version; then the first response's bytes
                later: list[Future[None]] = [
                    self._pool.submit(self._get_range, name, at, min(at + self.part_bytes, hi), resp["ETag"],
                                      view[at - lo : min(at + self.part_bytes, hi) - lo])
                    for at in range(max(lo, streamed_to), hi, self.part_bytes)]
                try:
                    if lo < streamed_to:
                        _read_exact(body, view[: min(hi, streamed_to) - lo])
                finally:
                    for f in later:
                        f.result()
            verify_heads(header, sums, view, first)
        except ChunkCorrupt as e:
            self.stats.corrupt += 1
            log.warning("lmcache remote tier %s: object %s is corrupt (%s); deleted, treated as a miss",
                        self.safe_url(), name, e)
            self.remove(key)
            return None
        except botocore.exceptions.ClientError as e:
            if error_code(e) not in _CHANGED | _ABSENT:
                self._failed("read", e)
            else:  # overwritten or removed while read: a miss, nothing wrong with the store
                self.stats.misses += 1
            return None
        except _FAILURES as e:
            self._failed("read", e)
            return None
        self.health.ok()
        self.stats.hits += 1
        self.stats.bytes_out += hi - lo
        return header

    # -- writes -------------------------------------------------------------------------------------

    def put(self, key: ObjectKey, header: bytes, payload: memoryview) -> bool:
        if not self.health.usable():
            self.stats.drops += 1
            return False
        name = self.object_name(key)
        try:
            if len(header) + len(payload) <= self.multipart_bytes:
                self.client.put_object(Bucket=self.bucket, Key=name, Body=b"".join((header, payload)))
            else:
                self._multipart(name, header, payload)
        except _FAILURES as e:
            self._failed("write", e)
            self.stats.drops += 1
            return False
        self.health.ok()
        self.stats.stores += 1
        self.stats.bytes_in += len(payload)
        return True

    def _multipart(self, name: str, header: bytes, payload: memoryview) -> None:
        """Parts uploaded side by side; the object appears only at completion (aborted on any failure)."""
        step, skip = self.part_bytes, len(header)
        total = skip + len(payload)
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"]

        def part(n: int) -> dict[str, Any]:
            lo, hi = n * step, min((n + 1) * step, total)
            body = (bytes(header) + bytes(payload[: hi - skip])) if n == 0 else bytes(payload[lo - skip : hi - skip])
            got = self.client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload, PartNumber=n + 1, Body=body)
            return {"PartNumber": n + 1, "ETag": got["ETag"]}

        try:
            parts = list(self._pool.map(part, range(-(-total // step))))
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload)
            except _FAILURES:
                pass  # the store is gone: the upload stays invisible, and prune/lifecycle reclaims it
            raise

    def remove(self, key: ObjectKey) -> bool:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_name(key))
            return True
        except _FAILURES as e:
            self._failed("delete", e)
            return False

    # -- health -------------------------------------------------------------------------------------

    def ping(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except _FAILURES:
            return False

    def diagnose(self) -> list[tuple[str, str, str]]:
        """Endpoint, credentials, bucket and write permission, in that order: (status, found, fix)."""
        where = f"s3://{self.bucket}/{self.prefix} at {self.endpoint}"
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except _FAILURES as e:
            return [("fail", f"{where}: {error_code(e)}: {e}", hint_for(e, self.endpoint) or "check the endpoint, "
                     "credentials and bucket")]
        probe = f"{self.prefix}.lmcache-doctor-{uuid.uuid4().hex}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"lmcache doctor write check")
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except _FAILURES as e:
            return [("fail", f"{where}: readable, but a test write failed: {error_code(e)}: {e}",
                     hint_for(e, self.endpoint) or "grant s3:PutObject and s3:DeleteObject on the prefix")]
        return [("ok", f"{where}: reachable, credentials accepted, bucket exists, writable", "")]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        try:
            self.client.close()
        except Exception:  # closing after the store went away may raise; nothing to save
            pass
