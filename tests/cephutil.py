"""A real S3 server for tests: single-node Ceph (one monitor, one OSD, radosgw) on loopback.

Debian 12's radosgw (Ceph 16) needs a RADOS cluster under it; the smallest real one starts in ~5 s
(../shared/reference/s3-ceph.md has the facts this follows). Every daemon runs in the foreground as a child of
the test process, all files under one directory. No emulator: the S3 tier's guarantees (atomic PUT, completed
multipart, ranged GET, a store that goes away) are only meaningful against the real thing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "LMCACHETESTACCESSKEY"
SECRET_KEY = "lmcache-test-secret-key-0123456789abcdef"
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "ceph-authtool", "monmaptool")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Ceph:
    root: Path
    mon_port: int = 0
    rgw_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    # -- setup --------------------------------------------------------------------------------------

    def write_conf(self) -> None:
        self.mon_port, self.rgw_port, lo = _free_ports(3)
        d = self.root
        for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0", "rgw"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self.fsid = str(uuid.uuid4())
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon_host = [v2:127.0.0.1:{self.mon_port}]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_port_min = {min(lo, 60000)}
ms_bind_port_max = {min(lo, 60000) + 40}
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
run_dir = {d}/run
log_file = {d}/log/$name.log
admin_socket = {d}/run/$name.asok
pid_file = {d}/run/$name.pid
keyring = {d}/keyring
paxos_propose_interval = 0.02
paxos_min_wait = 0.005
mon_data_avail_warn = 2
mon_data_avail_crit = 1
[mon]
mon_data = {d}/mon/ceph-$id
[osd]
osd_data = {d}/osd/ceph-$id
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 20G
bluestore_cache_size = 134217728
osd_memory_target = 536870912
# a killed radosgw leaves its cache-notify watches behind; the next bucket creation waits for them to time out
# (30 s by default): the tests kill the gateway on purpose
osd_client_watch_timeout = 3
[client.rgw.test]
rgw_frontends = beast endpoint=127.0.0.1:{self.rgw_port}
rgw_data = {d}/rgw
ms_mon_client_mode = crc
auth_client_required = none
# deleted objects' space comes back within seconds, not after the default two hours (benchmarks write GBs)
rgw_gc_obj_min_wait = 5
rgw_gc_processor_period = 5
""")

    def _run(self, *args: str, timeout: float = 60) -> str:
        r = subprocess.run([*args], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return r.stdout

    def ceph(self, *args: str, timeout: float = 30) -> str:
        return self._run("ceph", "-c", str(self.conf), *args, timeout=timeout)

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen([*args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start(self, timeout: float = 120) -> None:
        self.write_conf()
        d, c = self.root, str(self.conf)
        self._run("ceph-authtool", "--create-keyring", f"{d}/keyring", "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-authtool", f"{d}/keyring", "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
                  "--cap", "osd", "allow *", "--cap", "mgr", "allow *")
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]",
                  "--set-min-mon-release", "pacific", "--enable-all-features", f"{d}/monmap")
        self._run("ceph-mon", "-c", c, "--mkfs", "-i", "a", "--monmap", f"{d}/monmap", "--keyring", f"{d}/keyring")
        self._spawn("mon", "ceph-mon", "-c", c, "-i", "a", "-f")
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid, timeout=timeout).strip()
        if osd_id != "0":
            raise RuntimeError(f"expected OSD id 0, got {osd_id!r}")
        self._run("ceph-osd", "-c", c, "--mkfs", "-i", "0", "--osd-uuid", osd_uuid, timeout=timeout)
        self.start_osd(timeout)
        self.start_rgw(timeout)
        self._run("radosgw-admin", "-c", c, "user", "create", "--uid=lmcache", "--display-name=lmcache",
                  f"--access-key={ACCESS_KEY}", f"--secret-key={SECRET_KEY}", timeout=timeout)

    def start_osd(self, timeout: float = 120) -> None:
        self._spawn("osd", "ceph-osd", "-c", str(self.conf), "-i", "0", "-f")
        pid = self.procs["osd"].pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # up, under the pid just started (a killed one is listed up a while)
            self._alive("osd")
            try:
                dump = json.loads(self.ceph("osd", "dump", "--format", "json", timeout=10))
                if any(o["osd"] == 0 and o["up"] and o["public_addr"].endswith(f"/{pid}") for o in dump["osds"]):
                    return  # the address nonce is the daemon's pid
            except (RuntimeError, ValueError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"ceph-osd did not come up in {timeout}s; see {self.root}/log")

    def start_rgw(self, timeout: float = 120) -> None:
        self._spawn("rgw", "radosgw", "-c", str(self.conf), "-n", "client.rgw.test", "-f")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive("rgw")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).read()
                return
            except urllib.error.HTTPError:
                return  # it answers
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise RuntimeError(f"radosgw did not answer on {self.endpoint} in {timeout}s; see {self.root}/log")

    def _alive(self, name: str) -> None:
        rc = self.procs[name].poll()
        if rc is not None:
            tail = (self.root / "log" / f"{name}.out").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{name} exited with {rc}: {tail}")

    # -- faults ---------------------------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        p.wait(30)

    def stop(self) -> None:
        for name in ("rgw", "osd", "mon"):
            if name in self.procs:
                self.kill(name, signal.SIGTERM if name == "mon" else signal.SIGKILL)

    # -- S3 side --------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The standard AWS environment a client of this server uses."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


@dataclass
class S3Bucket:
    ceph: Ceph
    name: str
    prefix: str = "kv/"

    @classmethod
    def create(cls, ceph: Ceph, test_name: str) -> "S3Bucket":
        name = "t-" + uuid.uuid4().hex[:12]
        ceph.client().create_bucket(Bucket=name)
        return cls(ceph, name)

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}"

    def overrides(self, **more: object) -> dict[str, object]:
        """Config overrides of an engine whose remote tier is this bucket."""
        return {"remote_url": self.url, "s3_endpoint_url": self.ceph.endpoint, **more}

    def client(self):  # type: ignore[no-untyped-def]
        return self.ceph.client()

    def keys(self) -> list[str]:
        got = self.client().list_objects_v2(Bucket=self.name, Prefix=self.prefix)
        return sorted(o["Key"] for o in got.get("Contents", []))
