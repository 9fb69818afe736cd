"""The push channel between the MOP driver and its workers.

`multiprocessing.connection` gives framed messages over TCP with an HMAC challenge on connect:
a worker must prove it knows the per-run secret before the driver reads a single message from it.
Workers push a message the moment a unit ends, and the driver waits on all connections at once,
so a hop costs no polling delay (Cerebro polls every 2 s).

The channel is authenticated, not encrypted: messages (units, model specs, metrics) cross the
network in the clear, so the driver and the executors must share a trusted network, as Spark's
own RPC does unless ``spark.network.crypto.enabled`` is set. It listens on Spark's
``spark.driver.bindAddress`` when that is set (a driver in a container or pod binding 0.0.0.0),
else on ``spark.driver.host``, and tells the workers to connect to ``spark.driver.host``.

Each connection is authenticated in a thread of its own with a deadline
(``HANDSHAKE_TIMEOUT_S``), so a peer that connects and says nothing, or says garbage, costs one
short-lived thread and never holds up the workers joining beside it.
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import struct
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import (AuthenticationError, Connection, Listener, answer_challenge,
                                        deliver_challenge)
from typing import Any

log = logging.getLogger("cerebro_tasks.mop")

# Seconds a new connection has to pass the challenge and say hello. A worker does both at once
# (it connects only after TensorFlow is up), so this is generous.
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass
class Message:
    kind: str  # hello | unit | done | failed | fatal | stop | whole | saved | drop
    payload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def hello(cls, partition: int, info: dict[str, Any]) -> "Message":
        return cls("hello", {"partition": partition, "info": info})

    @classmethod
    def unit(cls, unit: Any, spec: Any, attempt: str) -> "Message":
        # attempt: this dispatch's id; a train unit writes its checkpoint under it (storage/layout.py)
        return cls("unit", {"unit": unit, "spec": spec, "attempt": attempt})

    @classmethod
    def done(cls, unit: Any, result: dict[str, Any]) -> "Message":
        return cls("done", {"unit": unit, "result": result})

    @classmethod
    def failed(cls, unit: Any, error: str) -> "Message":
        return cls("failed", {"unit": unit, "error": error})

    @classmethod
    def fatal(cls, unit: Any, error: str) -> "Message":
        return cls("fatal", {"unit": unit, "error": error})

    @classmethod
    def stop(cls) -> "Message":
        return cls("stop")

    @classmethod
    def whole(cls, model_id: str, step: int, spec: Any, attempt: str) -> "Message":
        # driver -> worker: write this model's whole checkpoint at `step` from its committed state
        # (its first writer was lost before it wrote it; mop/worker.py, writes behind)
        return cls("whole", {"model_id": model_id, "step": step, "spec": spec, "attempt": attempt})

    @classmethod
    def drop(cls, model_id: str, step: int, attempt: str) -> "Message":
        # driver -> worker: that whole checkpoint is no longer wanted: if not yet written, never write it
        return cls("drop", {"model_id": model_id, "step": step, "attempt": attempt})

    @classmethod
    def saved(cls, model_id: str, step: int, attempt: str | None, seconds: float, error: str | None = None) -> "Message":
        # worker -> driver: a whole checkpoint written behind is in place under `attempt` (or, with
        # `error`, could not be written)
        return cls("saved", {"model_id": model_id, "step": step, "attempt": attempt, "seconds": seconds,
                             "error": error})


def _spark_conf(key: str) -> str | None:
    try:
        from pyspark import SparkContext
    except ImportError:
        return None
    sc = SparkContext._active_spark_context
    return sc.getConf().get(key, None) if sc is not None else None


def driver_host() -> str:
    """The address workers can reach the driver at: Spark's own choice when a context exists."""
    return _spark_conf("spark.driver.host") or socket.gethostbyname(socket.gethostname())


def driver_bind_address() -> str:
    """Where the channel listens: Spark's ``spark.driver.bindAddress`` if set, else the host."""
    return _spark_conf("spark.driver.bindAddress") or driver_host()


class ControlServer:
    """Listens for workers on one port; hands over authenticated connections that said hello.

    Args:
        host: the address workers connect to (default: ``driver_host()``).
        bind: the address to listen on (default: ``host`` when given, else
            ``driver_bind_address()``); never a wildcard unless Spark's own bind address is one.
    """

    def __init__(self, host: str | None = None, bind: str | None = None,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.secret = secrets.token_bytes(32)
        self.handshake_timeout_s = handshake_timeout_s
        # no authkey here: the challenge runs per connection in _handshake, off the accept loop
        self._listener = Listener((bind or host or driver_bind_address(), 0))
        self.address: tuple[str, int] = (host or driver_host(), self._listener.address[1])
        self.joined: "queue.Queue[tuple[Connection, Message]]" = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="mop-control-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()  # plain TCP accept: returns at once
            except OSError:
                if self._closed:
                    return
                continue
            threading.Thread(target=self._handshake, args=(conn,), name="mop-control-handshake",
                             daemon=True).start()

    def _handshake(self, conn: Connection) -> None:
        """Authenticate one peer and read its hello within the deadline, or drop it."""
        try:
            _set_recv_timeout(conn, self.handshake_timeout_s)
            deliver_challenge(conn, self.secret)
            answer_challenge(conn, self.secret)
            if conn.poll(self.handshake_timeout_s):
                first = conn.recv()
                if isinstance(first, Message) and first.kind == "hello":
                    _set_recv_timeout(conn, 0)  # from now on the driver waits on it as it likes
                    self.joined.put((conn, first))
                    return
        except (AuthenticationError, EOFError, OSError) as e:  # OSError: timed out, reset, garbage
            log.debug("control channel: dropped a peer that did not authenticate: %s", e)
        except Exception as e:  # an authenticated peer that sent something unpicklable
            log.warning("control channel: dropped a peer after a bad first message: %s", e)
        conn.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass


def _set_recv_timeout(conn: Connection, seconds: float) -> None:
    """A receive deadline on the connection's socket (0: none); a blocked read then fails."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    finally:
        sock.detach()  # the descriptor stays the connection's
