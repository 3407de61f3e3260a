"""Real servers on loopback for the object-storage tests: an S3 server (moto in server mode),
a proxy in front of it that injects faults, and an HTTP file server that honours Range.

Nothing here mocks a client call: s3fs and botocore talk HTTP to these servers as they would
to S3, through ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ERRORS = {  # S3's own error bodies
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
}
UPSTREAM_TIMEOUT_S = 30


class FaultProxy(ThreadingHTTPServer):
    """Forwards each request to the S3 server, except the ones it is told to fail.

    ``inject(kind, count, method)`` fails the next ``count`` requests of ``method`` with
    ``kind``: ``slowdown`` (503 SlowDown), ``internal`` (500), ``denied`` (403, never retried)
    or ``drop`` (the connection is closed with no answer); ``pass`` lets one through.
    Requests for a bucket in ``denied`` get 403 AccessDenied.
    ``injected`` counts the faults sent, ``requests`` every request by method and
    ``bytes_sent`` the bytes of the answers' bodies.
    """

    daemon_threads = True

    def __init__(self, upstream: tuple[str, int]):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.queue: list[tuple[str, str | None]] = []
        self.denied: set[str] = set()
        self.injected: Counter = Counter()
        self.requests: Counter = Counter()
        self.bytes_sent: Counter = Counter()  # response bodies, by method
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def inject(self, kind: str, count: int = 1, method: str | None = None) -> None:
        with self.lock:
            self.queue += [(kind, method)] * count

    def take_fault(self, method: str) -> str | None:
        with self.lock:
            self.requests[method] += 1
            for i, (kind, wanted) in enumerate(self.queue):
                if wanted in (None, method):
                    del self.queue[i]
                    self.injected[kind] += 1
                    return kind
        return None

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as two writes: without this, Nagle's algorithm and the
        # client's delayed ACK hold each answer back 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _error(self, kind: str) -> None:
        status, code, message = ERRORS[kind]
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>0</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        body = self._body()
        server: FaultProxy = self.server
        if self.path == "/__stats":  # the counters, for a client in another process
            data = json.dumps({"requests": server.requests, "bytes_sent": server.bytes_sent}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        bucket = self.path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
        if bucket in server.denied:
            return self._error("denied")
        fault = server.take_fault(self.command)
        if fault == "pass":
            fault = None
        if fault == "drop":  # the connection goes away before any answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None:
            return self._error(fault)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*server.upstream, timeout=UPSTREAM_TIMEOUT_S)
        try:
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                self.send_header(k, v)
        # A HEAD answer carries the object's length, with no body.
        length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            with server.lock:
                server.bytes_sent[self.command] += len(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class S3Server:
    """moto's S3 in server mode on loopback, behind a ``FaultProxy``; ``env`` points the AWS SDK at it."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        self.proxy = FaultProxy(self.moto.get_host_and_port())

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.proxy.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                # Bounded: a few tries, short timeouts (botocore reads these from the environment).
                "AWS_MAX_ATTEMPTS": "4", "AWS_RETRY_MODE": "standard"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.proxy.url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def close(self) -> None:
        self.proxy.close()
        self.moto.stop()


class RangeHandler(SimpleHTTPRequestHandler):
    """A static file server that answers ``Range: bytes=a-b`` with 206, as object stores do, and
    keeps connections open (HTTP/1.1), as they do; aiohttp waits on a closed pooled one."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if match is None or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
        f = path.open("rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return _Limited(f, end - start + 1)


class _Limited:
    def __init__(self, f, n):
        self.f, self.n = f, n

    def read(self, size=-1):
        size = self.n if size < 0 else min(size, self.n)
        data = self.f.read(size)
        self.n -= len(data)
        return data

    def close(self):
        self.f.close()


class FlakyHandler(RangeHandler):
    """Fails the first try of every request (a 503, or a dropped connection for every third one),
    and serves the second: a client that does not retry every request fails."""

    seen: dict = {}
    failed: list = []

    def _flaky(self) -> bool:
        request = (self.command, self.path, self.headers.get("Range"))
        if request in self.seen:
            return False
        self.seen[request] = True
        self.failed.append(request)
        if len(self.failed) % 3 == 0:
            self.close_connection = True
            self.connection.shutdown(2)
        else:
            self.send_error(503, "SlowDown")
        return True

    def do_GET(self):
        if not self._flaky():
            super().do_GET()

    def do_HEAD(self):
        if not self._flaky():
            super().do_HEAD()


def serve_folder(folder: Path, handler: type = RangeHandler) -> ThreadingHTTPServer:
    """An HTTP server for ``folder`` on loopback, in a daemon thread."""
    import functools

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":  # a server in its own process: prints its environment and the S3 server's own
    # URL (without the proxy), and serves until stdin closes
    import sys

    server = S3Server()
    host, port = server.moto.get_host_and_port()
    print(json.dumps({"env": server.env, "direct": f"http://{host}:{port}"}), flush=True)
    sys.stdin.read()
    server.close()
