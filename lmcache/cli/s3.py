"""``lmcache s3 prune``: capacity for object stores without a lifecycle rule.

lmcache never expires what it stored (a store's own policy does it better: Redis ``maxmemory``, an S3 bucket
lifecycle rule). For an S3-compatible store that has no lifecycle rules, or before one is set, this deletes the
objects under the tier's prefix written longer ago than ``--older-than`` and aborts multipart uploads left
unfinished as long (writers killed mid-object). Age is time since written: S3 keeps no last-access time.
"""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timedelta, timezone
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> timedelta:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number and a unit s, m, h or d, e.g. 7d or 12h")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lmcache.cli.main import add_config_flags

    s3 = sub.add_parser("s3", help="housekeeping of an S3 tier (prune old objects)")
    ssub = s3.add_subparsers(dest="s3_command", metavar="SUBCOMMAND")
    p = ssub.add_parser("prune", help="delete objects written longer ago than --older-than, and stale unfinished uploads")
    p.add_argument("--older-than", required=True, type=parse_age, metavar="AGE", help="e.g. 7d, 12h, 30m")
    p.add_argument("--url", help="s3://bucket/prefix (default: remote_url's s3:// entry)")
    p.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_config_flags(p)
    p.set_defaults(func=cmd_prune)
    s3.set_defaults(func=lambda args: (s3.print_help(), 2)[1])


def checked_tier(url: str | None, cfg: Any, command: str) -> Any:
    """The S3 tier a command works on (``--url``, else remote_url's s3:// entry), after ``diagnose`` found the
    endpoint, credentials, bucket and write permission in order; else a one-line error with the fix."""
    from lmcache.core.config import remote_urls
    from lmcache.core.tiers.s3_tier import S3Tier

    url = url or next((u for u in remote_urls(cfg) if u.startswith("s3://")), None)
    if url is None:
        raise ValueError(f"{command} needs --url s3://bucket/prefix (or an s3:// entry in remote_url)")
    tier = S3Tier(url, cfg)
    problems = [f"{found}; fix: {fix}" for status, found, fix in tier.diagnose() if status != "ok"]
    if problems:
        tier.close()
        raise ValueError(problems[0])
    return tier


def cmd_prune(args: argparse.Namespace) -> int:
    from lmcache.cli.bench import Progress
    from lmcache.cli.main import config_from_args, emit, table

    cfg = config_from_args(args)
    tier = checked_tier(args.url, cfg, "lmcache s3 prune")
    url = tier.url
    say = Progress(args.json)
    try:
        cutoff = datetime.now(timezone.utc) - args.older_than
        data = _prune(tier.client, tier.bucket, tier.prefix, cutoff, args.dry_run, say)
    finally:
        tier.close()
    data |= {"url": url, "older_than_s": args.older_than.total_seconds(), "dry_run": args.dry_run}
    verb = "would delete" if args.dry_run else "deleted"
    emit(args, data, lambda d: table(f"lmcache s3 prune {url}: objects written before {cutoff:%Y-%m-%d %H:%M:%S} UTC",
                                     ["", "count", "GiB"],
                                     [["kept", d["kept"], f"{d['kept_bytes'] / 2**30:.3f}"],
                                      [verb, d["deleted"], f"{d['deleted_bytes'] / 2**30:.3f}"],
                                      ["unfinished uploads aborted" if not args.dry_run else "unfinished uploads to abort",
                                       d["uploads_aborted"], ""]]))
    return 0


def _prune(client: Any, bucket: str, prefix: str, cutoff: datetime, dry_run: bool, say) -> dict[str, int]:
    out = {"kept": 0, "kept_bytes": 0, "deleted": 0, "deleted_bytes": 0, "uploads_aborted": 0}
    batch: list[dict[str, str]] = []

    def delete(batch: list[dict[str, str]]) -> None:
        if batch and not dry_run:
            got = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if got.get("Errors"):
                e = got["Errors"][0]
                raise ValueError(f"deleting {e.get('Key')} failed: {e.get('Code')}: {e.get('Message')}; "
                                 "grant s3:DeleteObject on the prefix")

    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["LastModified"] < cutoff:
                out["deleted"] += 1
                out["deleted_bytes"] += obj["Size"]
                batch.append({"Key": obj["Key"]})
                if len(batch) == 1000:  # S3's limit per multi-object delete
                    delete(batch)
                    batch = []
            else:
                out["kept"] += 1
                out["kept_bytes"] += obj["Size"]
        say(f"listed {out['kept'] + out['deleted']} objects, {out['deleted']} older than the cutoff")
    delete(batch)
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for up in page.get("Uploads", []):
            if up["Initiated"] < cutoff:
                out["uploads_aborted"] += 1
                if not dry_run:
                    client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    return out
