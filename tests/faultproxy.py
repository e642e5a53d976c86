"""A TCP proxy of the tests' own, for faults on the wire (issue 9).

It listens on 127.0.0.1 (only) and forwards every connection to a target, normally the lab sshd
(tests/lab.py), so a test can break the transport *between* snapcoord and the guest without
touching sshd or the guest:

* :meth:`FaultProxy.cut`: close every open connection (the peers see a reset); new connections
  are accepted and forwarded at once: a drop that a client can recover from by reconnecting.
* :meth:`FaultProxy.refuse`: cut every open connection and, for N seconds, reset every new one
  right after accepting it: the guest is unreachable.
* :meth:`FaultProxy.stall`: forward no byte in either direction, on open and on new connections,
  for N seconds, then resume: a command in flight hangs.
* :meth:`FaultProxy.resume`: end a refuse or a stall now.

Faults can be switched at any time, from the test (the methods) or from ANOTHER process through
the control channel: a UNIX socket (``control_path``, in the proxy's work directory) that takes
one command per line, ``cut``, ``refuse SECONDS``, ``stall SECONDS``, ``resume``, ``stats``, and
answers ``ok`` (``stats``: ``ok {json}``) once the fault is in effect, or ``error: ...``.
:func:`control` is the client (``python -m tests.faultproxy send PATH cut`` from a shell).

:meth:`FaultProxy.stats` counts connections accepted, cut (ended by a fault), refused, closed
(ended by a peer) and active, and lists the faults with their times: enough to prove a client
reconnected. Threads only (one accept loop, two pumps per connection, one control server); the
test that starts a proxy stops it (:meth:`FaultProxy.stop`, or use it as a context manager).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import socketserver
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

LOOPBACK = "127.0.0.1"
CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Make the next close() send a TCP reset, and wake every thread blocked on ``sock``."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Connection:
    """One proxied connection: a client socket, an upstream socket, a pump thread each way."""

    def __init__(
        self, proxy: FaultProxy, number: int, client: socket.socket, upstream: socket.socket
    ) -> None:
        self.proxy = proxy
        self.number = number
        self.client = client
        self.upstream = upstream
        self.aborted = False  # ended by a fault (cut/refuse), not by a peer
        self._lock = threading.Lock()
        self._pumps_left = 2
        self._threads = [
            threading.Thread(
                target=self._pump, args=(client, upstream), daemon=True, name=f"proxy-{number}-up"
            ),
            threading.Thread(
                target=self._pump, args=(upstream, client), daemon=True, name=f"proxy-{number}-down"
            ),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def abort(self) -> None:
        """Reset both sides (the pumps then close the sockets)."""
        with self._lock:
            self.aborted = True
        _reset(self.client)
        _reset(self.upstream)
        self.proxy._wake()

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                if not self.proxy._wait_flowing(self):
                    return
                try:
                    data = src.recv(CHUNK)
                except OSError:
                    self.abort()
                    return
                if not data:  # the peer closed its side: pass the EOF on
                    if not self.aborted:
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                    return
                # Bytes read just before a stall began are held until it ends.
                if not self.proxy._wait_flowing(self):
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    self.abort()
                    return
        finally:
            self._pump_done()

    def _pump_done(self) -> None:
        with self._lock:
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if last:
            for sock in (self.client, self.upstream):
                with contextlib.suppress(OSError):
                    sock.close()
            self.proxy._forget(self)


class _ControlHandler(socketserver.StreamRequestHandler):
    server: _ControlServer

    def handle(self) -> None:
        for raw in self.rfile:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                answer = self.server.proxy.command(line)
            except (ValueError, IndexError) as exc:
                answer = f"error: {exc}"
            self.wfile.write((answer + "\n").encode())
            self.wfile.flush()


class _ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(path, _ControlHandler)


class FaultProxy:
    """A fault-injecting TCP proxy on 127.0.0.1 in front of ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int], workdir: Path | None = None) -> None:
        self.target = target
        self._own_workdir = workdir is None
        # Short: a UNIX socket path must fit in 108 bytes (pytest's tmp paths do not).
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="faultproxy-"))
        self.control_path = self.workdir / "control.sock"
        self.port = 0
        self._listener: socket.socket | None = None
        self._control: _ControlServer | None = None
        self._threads: list[threading.Thread] = []
        self._running = False
        self._cond = threading.Condition()
        self._connections: dict[int, _Connection] = {}
        self._stall_until = 0.0  # time.monotonic()
        self._refuse_until = 0.0
        self._counts = {"accepted": 0, "cut": 0, "refused": 0, "closed": 0}
        self._faults: list[dict[str, Any]] = []

    # -- life cycle ------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 0))
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.control_path.unlink(missing_ok=True)
        self._control = _ControlServer(str(self.control_path), self)
        self.control_path.chmod(0o600)
        self._running = True
        self._threads = [
            threading.Thread(target=self._accept_loop, daemon=True, name="proxy-accept"),
            threading.Thread(target=self._control.serve_forever, daemon=True, name="proxy-ctl"),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut every connection, end the control channel; idempotent."""
        if not self._running:
            return
        self._running = False
        if self._control is not None:
            self._control.shutdown()
            self._control.server_close()
        for thread in self._threads:
            thread.join(5)
        if self._listener is not None:
            self._listener.close()
        self._abort_all(count_as="cut", record=False)
        self.control_path.unlink(missing_ok=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> FaultProxy:
        return self.start() if not self._running else self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------------
    def cut(self) -> int:
        """Close every open connection; keep accepting new ones. Returns how many were cut."""
        return self._abort_all(count_as="cut", fault="cut")

    def refuse(self, seconds: float) -> int:
        """Cut every open connection and reset new ones for ``seconds``. Returns how many were
        cut."""
        with self._cond:
            self._refuse_until = time.monotonic() + seconds
        return self._abort_all(count_as="cut", fault="refuse", seconds=seconds)

    def stall(self, seconds: float) -> None:
        """Forward nothing, on any connection, for ``seconds``; then carry on."""
        with self._cond:
            self._stall_until = time.monotonic() + seconds
            self._record("stall", seconds=seconds, connections=len(self._connections))
            self._cond.notify_all()

    def resume(self) -> None:
        """End a refuse or a stall now."""
        with self._cond:
            self._stall_until = self._refuse_until = 0.0
            self._record("resume")
            self._cond.notify_all()

    def command(self, line: str) -> str:
        """Execute one control line (see the module docstring); return the answer."""
        words = line.split()
        verb = words[0].lower() if words else ""
        if verb == "cut" and len(words) == 1:
            self.cut()
        elif verb == "refuse" and len(words) == 2:
            self.refuse(_seconds(words[1]))
        elif verb == "stall" and len(words) == 2:
            self.stall(_seconds(words[1]))
        elif verb == "resume" and len(words) == 1:
            self.resume()
        elif verb == "stats" and len(words) == 1:
            return "ok " + json.dumps(self.stats())
        else:
            raise ValueError(
                f"unknown command {line!r} (cut | refuse S | stall S | resume | stats)"
            )
        return "ok"

    # -- state -----------------------------------------------------------------------------
    @property
    def refusing(self) -> bool:
        return time.monotonic() < self._refuse_until

    @property
    def stalled(self) -> bool:
        return time.monotonic() < self._stall_until

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                **self._counts,
                "active": len(self._connections),
                "refusing": self.refusing,
                "stalled": self.stalled,
                "faults": list(self._faults),
            }

    # -- internals -------------------------------------------------------------------------
    def _record(self, fault: str, **data: Any) -> None:
        self._faults.append({"fault": fault, "time": round(time.time(), 3), **data})

    def _abort_all(
        self, *, count_as: str, fault: str = "", record: bool = True, **data: Any
    ) -> int:
        with self._cond:
            victims = list(self._connections.values())
            self._counts[count_as] += len(victims)
            for conn in victims:
                conn.aborted = True
            if record:
                self._record(fault, connections=len(victims), **data)
        for conn in victims:
            conn.abort()
        for conn in victims:  # when this returns, the peers have seen the reset
            conn.join(5)
        return len(victims)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        number = 0
        while self._running:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._running:
                    return
                time.sleep(0.05)
                continue
            client.settimeout(None)
            if self._refused(client):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            number += 1
            conn = _Connection(self, number, client, upstream)
            with self._cond:
                # Checked again under the lock: refuse() may have cut everything meanwhile.
                if self.refusing:
                    self._counts["refused"] += 1
                    conn.aborted = True
                else:
                    self._counts["accepted"] += 1
                    self._connections[number] = conn
            if conn.aborted:
                for sock in (client, upstream):
                    _reset(sock)
                    sock.close()
                continue
            conn.start()

    def _refused(self, client: socket.socket) -> bool:
        with self._cond:
            if not self.refusing:
                return False
            self._counts["refused"] += 1
        _reset(client)
        client.close()
        return True

    def _wait_flowing(self, conn: _Connection) -> bool:
        """Block while stalled; False once the connection was aborted or the proxy stopped."""
        with self._cond:
            while True:
                if conn.aborted or not self._running:
                    return False
                remaining = self._stall_until - time.monotonic()
                if remaining <= 0:
                    return True
                self._cond.wait(remaining)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _forget(self, conn: _Connection) -> None:
        with self._cond:
            if self._connections.pop(conn.number, None) is not None and not conn.aborted:
                self._counts["closed"] += 1


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 3600:
        raise ValueError(f"seconds out of range: {text}")
    return value


def control(path: str | Path, command: str, timeout: float = 15.0) -> str:
    """Send one command line to a proxy's control socket; return its answer (``ok ...``).

    Raises RuntimeError when the proxy answers with an error."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(command.strip().encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    text = answer.decode(errors="replace").strip()
    if not text.startswith("ok"):
        raise RuntimeError(f"fault proxy {path}: {command!r}: {text or 'no answer'}")
    return text


def known_hosts_for(host_key_pub: Path, port: int, path: Path, host: str = LOOPBACK) -> Path:
    """Write a known_hosts file that verifies ``host_key_pub`` for ``[host]:port`` (the proxy's
    address: ssh looks the key up under the address it connects to)."""
    kind, key = host_key_pub.read_text().split()[:2]
    path.write_text(f"[{host}]:{port} {kind} {key}\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faultproxy", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="run a proxy in front of HOST:PORT until Ctrl-C")
    p_serve.add_argument("target", help="HOST:PORT, e.g. 127.0.0.1:2222")
    p_send = sub.add_parser("send", help="send a command to a running proxy")
    p_send.add_argument("control_path")
    p_send.add_argument("command", nargs="+", help="cut | refuse S | stall S | resume | stats")
    args = parser.parse_args(argv)
    if args.cmd == "send":
        print(control(args.control_path, " ".join(args.command)))
        return 0
    host, _, port = args.target.rpartition(":")
    with FaultProxy((host, int(port))) as proxy:
        print(f"listening on {LOOPBACK}:{proxy.port}; control: {proxy.control_path}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
