"""The Triton model's end of the ingress's relay (``orchestrator/ingress/relay.py``).

One ``RelayClient`` per model instance holds one Unix-socket connection to the ingress.
``submit`` writes a request's frame from the calling thread (Triton's ``execute``), so the
request reaches the ingress without waking any other thread of the stub first. A reader
thread hands each answer frame to its request's callback. If the connection drops, every
open request gets an error frame, and the next ``submit`` connects again.

Nothing here imports Triton: tests drive it against a real ``RelayServer``.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from typing import Any, Callable

from orchestrator.ingress import relay_wire as wire

logger = logging.getLogger(__name__)

FrameHandler = Callable[[dict[str, Any]], None]


class RelayUnavailable(ConnectionError):
    """The ingress's relay socket cannot be reached."""


class _Connection:
    """One socket and the requests open on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.handlers: dict[int, FrameHandler] = {}


class RelayClient:
    """Requests multiplexed over one connection to the ingress's relay socket."""

    def __init__(self, path: str, connect_timeout_s: float = 5.0) -> None:
        self.path = path
        self.connect_timeout_s = connect_timeout_s
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        """Guards ``_conn``, its handlers and writes to its socket."""
        self._conn: _Connection | None = None

    def submit(self, body: dict[str, Any], on_frame: FrameHandler) -> int:
        """Send a ``/v1/completions`` body; ``on_frame`` gets its answer frames on the reader
        thread, the last one ``relay_wire.is_last``. Returns the id; ``RelayUnavailable``."""
        rid = next(self._ids)
        data = wire.encode({"op": "generate", "id": rid, "body": body})
        with self._lock:
            conn = self._connected()
            conn.handlers[rid] = on_frame
            try:
                conn.sock.sendall(data)
            except OSError as exc:
                conn.handlers.pop(rid, None)
                self._drop(conn)
                raise RelayUnavailable(f"sending to the cluster's ingress at {self.path} failed: {exc}") from None
        return rid

    def cancel(self, rid: int) -> None:
        """Abort a request in the cluster; its callback gets no more frames."""
        with self._lock:
            conn = self._conn
            if conn is None or conn.handlers.pop(rid, None) is None:
                return
            try:
                conn.sock.sendall(wire.encode({"op": "cancel", "id": rid}))
            except OSError:
                pass  # the connection is gone: the ingress aborts its requests itself

    def open_requests(self) -> int:
        with self._lock:
            return 0 if self._conn is None else len(self._conn.handlers)

    def close(self) -> None:
        """Close the connection (the ingress aborts what is still open on it)."""
        with self._lock:
            if self._conn is not None:
                self._drop(self._conn)

    def _connected(self) -> _Connection:
        if self._conn is not None:
            return self._conn
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout_s)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise RelayUnavailable(f"the cluster's ingress is not reachable at {self.path}: {exc}") from None
        sock.settimeout(None)
        self._conn = _Connection(sock)
        threading.Thread(target=self._read, args=(self._conn,), name="kunserve-relay-reader", daemon=True).start()
        return self._conn

    def _drop(self, conn: _Connection) -> None:
        """Forget a connection (lock held); its reader then fails the requests open on it."""
        if self._conn is conn:
            self._conn = None
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read(self, conn: _Connection) -> None:
        reader = conn.sock.makefile("rb")
        try:
            for line in reader:
                self._dispatch(conn, line)
        except (OSError, ValueError) as exc:
            logger.warning("the relay connection to %s failed: %s", self.path, exc)
        finally:
            reader.close()
            conn.sock.close()
            self._fail_open(conn)

    def _dispatch(self, conn: _Connection, line: bytes) -> None:
        frame = wire.decode(line)
        rid = frame.get("id")
        with self._lock:
            handler = conn.handlers.pop(rid, None) if wire.is_last(frame) else conn.handlers.get(rid)
        if handler is None:
            return  # cancelled meanwhile
        try:
            handler(frame)
        except Exception:  # noqa: BLE001 - one request's handler must not end the connection
            logger.exception("handling relay frame of request %s failed", rid)

    def _fail_open(self, conn: _Connection) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
            failed, conn.handlers = conn.handlers, {}
        for rid, handler in failed.items():
            try:
                handler({"id": rid, "error": f"the connection to the cluster's ingress at {self.path} was lost",
                         "status": 503})
            except Exception:  # noqa: BLE001
                logger.exception("failing relay request %s failed", rid)
