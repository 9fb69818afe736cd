"""The push channel between the MOP driver and its workers.

`multiprocessing.connection` gives framed messages over TCP with an HMAC challenge on connect:
a worker must prove it knows the per-run secret before the driver reads a single message from it.
Workers push a message the moment a unit ends, and the driver waits on all connections at once,
so a hop costs no polling delay (Cerebro polls every 2 s).
"""

from __future__ import annotations

import queue
import secrets
import socket
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Listener
from typing import Any


@dataclass
class Message:
    kind: str  # hello | unit | done | failed | fatal | stop
    payload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def hello(cls, partition: int, info: dict[str, Any]) -> "Message":
        return cls("hello", {"partition": partition, "info": info})

    @classmethod
    def unit(cls, unit: Any, spec: Any) -> "Message":
        return cls("unit", {"unit": unit, "spec": spec})

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


def driver_host() -> str:
    """The address workers can reach the driver at: Spark's own choice when a context exists."""
    try:
        from pyspark import SparkContext

        sc = SparkContext._active_spark_context
        if sc is not None:
            host = sc.getConf().get("spark.driver.host", None)
            if host:
                return host
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())


class ControlServer:
    """Listens for workers on one port of the driver's address; hands over authenticated connections."""

    def __init__(self, host: str | None = None) -> None:
        self.secret = secrets.token_bytes(32)
        # bind only to the interface the workers use (loopback in local mode), never 0.0.0.0
        self._listener = Listener((host or driver_host(), 0), authkey=self.secret)
        self.address: tuple[str, int] = self._listener.address
        self.joined: "queue.Queue[tuple[Connection, Message]]" = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="mop-control-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()  # raises AuthenticationError for a wrong secret
            except OSError:
                if self._closed:
                    return
                continue
            except Exception:  # a peer without the secret: drop it and keep listening
                continue
            try:
                if conn.poll(30):
                    first = conn.recv()
                    if isinstance(first, Message) and first.kind == "hello":
                        self.joined.put((conn, first))
                        continue
            except (EOFError, OSError):
                pass
            conn.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass
