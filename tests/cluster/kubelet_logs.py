"""The kubelet's read-only log endpoint for the node agent, so `kubectl logs [-f]` works.

The API server proxies GET /containerLogs/<namespace>/<pod>/<container> to the node's
daemonEndpoints port over TLS, presenting its kubelet-client certificate; this server accepts
only clients with a certificate from the cluster CA and serves the agent's log files.
"""

import http.server
import ssl
import threading
import time
import urllib.parse

from tests.cluster import certs
from tests.cluster.procs import free_port


class LogServer:
    """The kubelet's read-only log endpoint (/containerLogs/...) over TLS for the API server."""

    def __init__(self, agent):
        self.agent = agent
        self.port = free_port()
        self.httpd = None

    def start(self):
        pair = certs.make_serving_cert(
            self.agent.workdir / "kubelet-pki",
            f"node-agent-{self.agent.name}",
            self.agent.pki.ca,
            ("IP:127.0.0.1", "DNS:localhost"),
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pair.cert), str(pair.key))
        context.load_verify_locations(str(self.agent.pki.ca.cert))
        context.verify_mode = ssl.CERT_REQUIRED
        agent = self.agent

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):
                agent.log.info("log server: " + fmt, *args)

            def do_GET(self):
                serve_logs(agent, self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, name="node-agent-logs", daemon=True).start()
        return self

    def stop(self):
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()


def serve_logs(agent, handler):
    url = urllib.parse.urlsplit(handler.path)
    query = dict(urllib.parse.parse_qsl(url.query))
    parts = url.path.strip("/").split("/")
    if url.path == "/healthz":
        return _reply(handler, 200, b"ok")
    if len(parts) != 4 or parts[0] != "containerLogs":
        return _reply(handler, 404, b"not found")
    _, namespace, name, container = parts
    c = agent.find_container(namespace, name, container)
    if c is None or not c.runs:
        return _reply(handler, 404, f"container {container} of {namespace}/{name} not found".encode())
    previous = query.get("previous") == "true"
    path = c.log_path(c.runs - 1 if previous else None)
    full = path.read_bytes() if path.exists() else b""
    data = full
    if query.get("tailLines"):
        tail_lines = int(query["tailLines"])
        data = b"".join(full.splitlines(keepends=True)[-tail_lines:]) if tail_lines else b""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/plain")
    handler.end_headers()
    handler.wfile.write(data)
    if query.get("follow") == "true" and not previous:
        _follow(c, path, len(full), handler)


def _follow(container, path, offset, handler, limit=3600):
    """Stream what the container appends until it stops (at most `limit` seconds)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        if chunk:
            offset += len(chunk)
            try:
                handler.wfile.write(chunk)
                handler.wfile.flush()
            except OSError:
                return
        elif not container.running:
            return
        time.sleep(0.2)


def _reply(handler, code, body):
    handler.send_response(code)
    handler.send_header("Content-Type", "text/plain")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
