"""The driver-worker channel: authenticated by the per-run secret, bound to one address, push-based."""

from __future__ import annotations

import socket
import threading
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
    assert server._listener.address == ("127.0.0.1", port)


def test_binds_where_told_and_advertises_the_driver_host():
    """spark.driver.bindAddress / spark.driver.host: listen on one, tell workers the other."""
    s = ControlServer(host="driver.example.internal", bind="127.0.0.1")
    try:
        assert s.address == ("driver.example.internal", s._listener.address[1])
        assert s._listener.address[0] == "127.0.0.1"
    finally:
        s.close()


def _join(address, secret, partition: int, out: list) -> None:
    conn = Client(address, authkey=secret)
    conn.send(Message.hello(partition, {}))
    out.append(conn)


def test_silent_and_garbage_peers_do_not_hold_up_workers():
    """The handshake runs per connection: two bad peers stay connected, workers join at once."""
    s = ControlServer(host="127.0.0.1", handshake_timeout_s=6.0)
    silent = socket.create_connection(s.address)  # connects, never says a word
    garbage = socket.create_connection(s.address)
    garbage.sendall(b"\x00\x00\x00\x40not a challenge answer")  # declares 64 bytes, sends fewer
    try:
        started = time.perf_counter()
        clients: list = []
        threads = [threading.Thread(target=_join, args=(s.address, s.secret, p, clients), daemon=True)
                   for p in range(2)]
        for t in threads:
            t.start()
        joined = sorted(s.joined.get(timeout=5)[1].payload["partition"] for _ in range(2))
        # well before any bad peer's deadline (a loaded machine takes ~1 s to start two clients)
        assert joined == [0, 1] and time.perf_counter() - started < 4.0
        # the silent peer is dropped once its deadline passes: its socket reads EOF after the challenge
        silent.settimeout(10)
        received = b""
        while chunk := silent.recv(4096):
            received += chunk
        assert received.startswith(b"\x00\x00\x00") and b"#CHALLENGE#" in received
        for c in clients:
            c.close()
    finally:
        silent.close()
        garbage.close()
        s.close()


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
