"""A static HTTP server of a directory for the HTTP binary-cache tests, run as a real process
(``python tests/cache_http_server.py DIR PORT_FILE LOG_FILE [--tls-cert FILE --tls-key FILE]
[--idle-timeout S]``) —
like ``python -m http.server`` (HTTP/1.1 keep-alive, ``Last-Modified`` / ``If-Modified-Since``), plus:

* HTTPS with ``--tls-cert`` / ``--tls-key`` (PEM files; the handshake happens in the
  connection's own thread, so a client that refuses the certificate stalls nobody);

* ``ETag`` (size and mtime of the file) and ``If-None-Match`` → ``304``;
* ``Accept-Ranges: bytes`` and ``Range: bytes=N-`` (with ``If-Range``) → ``206``;
* a request log: one JSON line per request (method, path, the conditional headers, the
  client's port — requests with the same port came over one kept-alive connection);
* faults, read from ``DIR/.faults.json`` on every request: ``{"<path>": FAULT}`` with FAULT one
  of ``"500"`` (always), ``"500-once"`` (the first request only), ``"truncate"`` (announce the
  full length, send half, close), ``"truncate-once"`` (only the first time), ``"long-length"`` (announce one byte more than sent, close),
  ``"stall"`` (send the head, then nothing for 30 s), ``"garbage-status"`` (not HTTP);
* ``PUT`` stores a file (atomically), so it is also a writable cache.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import os
import socket
import ssl
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

_once: set[str] = set()
_lock = threading.Lock()


class Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    log_file = ""
    tls = False

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _log(self) -> None:
        entry = {"method": self.command, "path": self.path, "if-none-match": self.headers.get("If-None-Match"),
                 "if-modified-since": self.headers.get("If-Modified-Since"),
                 "authorization": self.headers.get("Authorization"), "range": self.headers.get("Range"),
                 "client-port": self.client_address[1], "tls": Handler.tls}
        with _lock, open(self.log_file, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _fault(self) -> str | None:
        try:
            with open(os.path.join(self.directory, ".faults.json")) as f:
                faults = json.load(f)
        except FileNotFoundError:
            return None
        fault = faults.get(self.path.split("?", 1)[0])
        if fault in ("500-once", "truncate-once"):
            with _lock:
                if self.path in _once:
                    return None
                _once.add(self.path)
            return fault.removesuffix("-once")
        return str(fault) if fault else None

    def _file(self) -> str:
        return os.path.join(self.directory, self.path.split("?", 1)[0].lstrip("/"))

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        self._log()
        fault = self._fault()
        if fault == "garbage-status":
            self.wfile.write(b"this is not HTTP\r\n\r\n")
            self.close_connection = True
            return
        if fault == "500":
            body = b"internal error\n"
            self.send_response(500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        path = self._file()
        if not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        st = os.stat(path)
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        inm = self.headers.get("If-None-Match")
        if inm is not None and inm.strip() == etag:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        with open(path, "rb") as f:
            data = f.read()
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-") and self.headers.get("If-Range") in (None, etag):
            start = int(rng[6:-1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", modified)
        self.send_header("Content-Type", "application/octet-stream")
        if fault == "long-length":
            self.send_header("Content-Length", str(len(data) + 1))
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if head:
            return
        if fault == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        if fault == "stall":
            time.sleep(30)
            self.close_connection = True
            return
        self.wfile.write(data)
        if fault == "long-length":
            self.close_connection = True

    def do_PUT(self) -> None:
        self._log()
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n)
        path = self._file()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class TLSServer(ThreadingHTTPServer):
    """Accepts plain connections and does the TLS handshake in the request's thread."""

    tls_context: ssl.SSLContext

    def finish_request(self, request: socket.socket | tuple[bytes, socket.socket],
                       client_address: tuple[str, int] | str) -> None:
        assert isinstance(request, socket.socket)
        request.settimeout(30)
        try:
            tls = self.tls_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client refused the certificate (or went away): nothing to serve
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("directory")
    ap.add_argument("port_file")
    ap.add_argument("log_file")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--idle-timeout", type=float, help="close a kept-alive connection idle this long")
    args = ap.parse_args()
    directory, port_file = args.directory, args.port_file
    Handler.log_file = args.log_file
    if args.idle_timeout:
        Handler.timeout = args.idle_timeout

    def handler(*a: object, **kw: object) -> Handler:
        return Handler(*a, directory=directory, **kw)  # type: ignore[arg-type]

    server: ThreadingHTTPServer
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        tserver = TLSServer(("127.0.0.1", 0), handler)
        tserver.tls_context = ctx
        server = tserver
        Handler.tls = True
    else:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
