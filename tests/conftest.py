import os

from hypothesis import HealthCheck, settings

# CI has 2 cores and a 15-minute budget for everything: enough examples to find layout bugs, no more.
settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import pytest  # noqa: E402


@pytest.fixture
def redis_server(tmp_path):
    from redisutil import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed: run .ci/run (it installs it with apt-get)")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ceph(tmp_path_factory):
    """A real single-node Ceph with its S3 gateway (radosgw) on loopback, started once per test session."""
    from cephutil import Ceph, missing_binaries

    missing = missing_binaries()
    if missing:
        how = "run .ci/run (it installs radosgw, ceph-mon, ceph-osd and ceph-common with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(f"Ceph is not installed ({', '.join(missing)} missing), but CI must run the S3 tests: {how}")
        pytest.skip(f"Ceph is not installed ({', '.join(missing)} missing): {how}")
    c = Ceph(tmp_path_factory.mktemp("ceph"))
    c.start()
    yield c
    c.stop()


@pytest.fixture
def s3(ceph, monkeypatch, request):
    """A fresh bucket on the real gateway, the standard AWS environment pointing at it, and the config
    overrides an engine needs to use it as its remote tier."""
    from cephutil import S3Bucket

    for k, v in ceph.env().items():
        monkeypatch.setenv(k, v)
    if "rgw" not in ceph.procs:  # a test before this one killed the gateway and failed before restarting it
        ceph.start_rgw()
    yield S3Bucket.create(ceph, request.node.name)
