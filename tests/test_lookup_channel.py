"""The scheduler-to-worker lookup channel (in-process mode with workers in other processes)."""

import subprocess
import sys
import textwrap

import pytest
from tierutil import engine, prompt

from lmcache.adapters.lookup_channel import LookupClient, LookupServer, channel_address

WORKER = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from tierutil import engine, prompt, store
    from lmcache.adapters.lookup_channel import LookupServer
    e = engine()
    store(e, prompt(64, 3), seed=3)
    server = LookupServer(sys.argv[1], e.lookup_chunks)
    print("serving", flush=True)
    time.sleep(600)
''')


def test_a_scheduler_in_another_process_sees_the_workers_pool(tmp_path):
    import os

    address = channel_address(f"test-{os.getpid()}-{tmp_path.name}")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    worker = subprocess.Popen([sys.executable, str(script), address, os.path.dirname(__file__)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert worker.stdout.readline().strip() == "serving"
        keys = engine().hasher().keys(prompt(64, 3))
        client = LookupClient(address, 5.0)
        assert client(keys, [(0, 2)]) == 4
        assert client(engine().hasher().keys(prompt(64, 4)), [(0, 2)]) == 0
        assert oct(os.stat(address[len("ipc://"):]).st_mode & 0o777) == "0o600"  # this user's processes only
        with pytest.raises(RuntimeError, match="share the engine_id"):
            LookupServer(address, lambda keys, shards: 0)  # a second engine with the same id: refused, loudly
        worker.kill()
        worker.wait()
        assert client(keys, [(0, 2)]) == 0  # the worker is gone: a miss within the timeout, never a stall
        LookupServer(address, lambda keys, shards: len(keys)).close()  # its leftover socket is taken over
    finally:
        worker.kill()
        worker.wait()
