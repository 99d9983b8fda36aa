"""Registers the S3 tier (``s3://bucket/prefix``) without importing boto3 until a tier is opened: every engine
process loads the built-in plugins at start, and most never use S3."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmcache.core.hookspecs import StorageTierSpec, hookimpl

if TYPE_CHECKING:
    from lmcache.core.config import LMCacheConfig
    from lmcache.core.tiers.s3_tier import S3Tier


def _factory(url: str, config: "LMCacheConfig") -> "S3Tier":
    from lmcache.core.tiers.s3_tier import S3Tier

    return S3Tier(url, config)


@hookimpl
def lmcache_storage_tiers() -> list[StorageTierSpec]:
    return [StorageTierSpec("s3", _factory, "S3-compatible object store (AWS S3, Ceph RGW, MinIO): s3://bucket/prefix")]
