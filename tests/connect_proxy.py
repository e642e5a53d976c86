"""A small HTTP CONNECT proxy on loopback for tests: what cron's https_proxy points at.

Each client connection is one thread: it reads the CONNECT request, opens the target (or,
with ``hijack`` set, another address: the proxy, or the network behind it, plays
man-in-the-middle), answers ``200 Connection established`` and relays bytes both ways until
either side closes. It counts CONNECTs and records their targets; anything but CONNECT gets a
405 (requests only tunnels to https:// URLs).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class ConnectProxy:
    #: (host, port) every CONNECT is sent to instead of its target; None: the target itself
    hijack: tuple[str, int] | None = None
    #: the targets of the CONNECTs received, as "host:port", in order
    connects: list[str] = field(default_factory=list)
    #: bytes relayed from the upstream end to clients (a TLS server's handshake among them)
    upstream_bytes: int = 0
    _listener: socket.socket | None = None
    _open: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> ConnectProxy:
        listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Close every open tunnel: the client's next request needs a new CONNECT."""
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _close(sock)

    def stop(self) -> None:
        if self._listener is not None:
            _close(self._listener)
            self._listener = None
        self.cut()

    def __enter__(self) -> ConnectProxy:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- plumbing -------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._open.update(sockets)

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk or len(head) > 65536:
                _close(client)
                return
            head += chunk
        header, _, early = head.partition(b"\r\n\r\n")
        method, target, *_ = [*header.split(b"\r\n", 1)[0].decode("latin-1").split(), "", ""]
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            _close(client)
            return
        with self._lock:
            self.connects.append(target)
        host, _, port = target.rpartition(":")
        address = self.hijack or (host.strip("[]"), int(port))
        try:
            upstream = socket.create_connection(address, timeout=10)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            _close(client)
            return
        upstream.settimeout(None)
        self._track(upstream)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if early:
            upstream.sendall(early)
        threading.Thread(target=self._relay, args=(upstream, client, True), daemon=True).start()
        self._relay(client, upstream, False)

    def _relay(self, source: socket.socket, sink: socket.socket, from_upstream: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if from_upstream:
                    with self._lock:
                        self.upstream_bytes += len(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
