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
