"""The driver-worker channel: authenticated by the per-run secret, bound to one address, push-based."""

from __future__ import annotations

import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest

from cerebro_tasks.mop.control import ControlServer, Message


@pytest.fixture
def server():
    s = ControlServer(host="127.0.0.1")
    yield s
    s.close()


def test_listens_only_on_the_given_address(server):
    host, port = server.address
    assert host == "127.0.0.1" and port > 0


def test_a_peer_without_the_secret_is_refused(server):
    with pytest.raises(AuthenticationError):
        Client(server.address, authkey=b"not the run secret")
    time.sleep(0.2)
    assert server.joined.empty()


def test_a_worker_with_the_secret_joins_and_messages_arrive_immediately(server):
    conn = Client(server.address, authkey=server.secret)
    conn.send(Message.hello(1, {"pid": 123}))
    driver_side, hello = server.joined.get(timeout=5)
    assert hello.payload == {"partition": 1, "info": {"pid": 123}}
    started = time.perf_counter()
    conn.send(Message.done("unit", {"metrics": {}}))
    assert driver_side.poll(5)
    assert driver_side.recv().kind == "done"
    assert time.perf_counter() - started < 0.5  # pushed, not picked up by a poll loop
    conn.close()
