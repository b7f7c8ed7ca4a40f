"""A loopback TCP proxy in front of a real S3 server that can drop connections, answer 5xx or stall.

Every connection is relayed to the upstream server unless a fault is active when it is accepted:
  drop   close the client's connection at once (botocore: connection reset / closed)
  5xx    read the request and answer 503 SlowDown (S3's throttling answer), then close
  stall  hold the connection this many seconds before relaying (a store that hangs)
  down   refuse: close every connection (an outage) until the mode changes
Faults apply to connections accepted while they are set (`fault(mode, seconds)` for a window of time,
or `every=n` for every n-th connection). Loopback only.
"""
from __future__ import annotations

import socket
import threading
import time

SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: 149\r\n\r\n"
             b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Reduce your request rate.'
             b"</Message><RequestId>1</RequestId></Error>   ")


class FaultProxy:
    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.mode: str | None = None
        self.until = 0.0
        self.every = 0
        self.stall_s = 0.0
        self.accepted = 0
        self.faulted = 0
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fault(self, mode: str | None, seconds: float = 0.0, every: int = 0, stall_s: float = 5.0) -> None:
        """Set a fault for `seconds` from now (or, with every=n, on every n-th connection until cleared)."""
        self.mode, self.until, self.every, self.stall_s = mode, time.time() + seconds, every, stall_s

    def _active(self) -> str | None:
        if self.mode is None:
            return None
        if self.every:
            return self.mode if self.accepted % self.every == 0 else None
        return self.mode if time.time() < self.until else None

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            mode = self._active()
            if mode:
                self.faulted += 1
            threading.Thread(target=self._handle, args=(client, mode), daemon=True).start()

    def _handle(self, client: socket.socket, mode: str | None) -> None:
        try:
            if mode in ("drop", "down"):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                client.close()
                return
            if mode == "5xx":
                client.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = client.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                client.sendall(SLOW_DOWN)
                client.close()
                return
            if mode == "stall":
                time.sleep(self.stall_s)
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()
