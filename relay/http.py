"""The Werkzeug WSGI app: JSON endpoints and the ``/relay`` websocket upgrade.

A websocket request keeps its Werkzeug request thread for the whole life of the
connection; that thread becomes the client's writer (``Client.serve``). When the
websocket ends, the handler shuts the socket down and raises ``ConnectionError``
so that Werkzeug writes nothing more onto the upgraded socket (a normal return
would put an HTTP status line after the close frame).
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

import simple_websocket
from werkzeug.serving import WSGIRequestHandler
from werkzeug.wrappers import Request, Response

from . import __version__
from .client import Client, ClientSocket, InboundSignal
from .frames import relay_message
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import render as render_metrics
from .security import OPEN_PATHS

logger = logging.getLogger(__name__)

ENDPOINTS = {
    "/": "service name, version and endpoints",
    "/health": "200 when the upstream is connected, 503 otherwise",
    "/live": "200 while the process is serving HTTP",
    "/ready": "200 while the upstream is connected, 503 otherwise",
    "/status": "upstream, clients, traffic and process details (token)",
    "/api/clients": "connected clients with their counters (token)",
    "/metrics": "Prometheus metrics (token)",
    "/relay": "websocket endpoint that streams the Backpack.tf feed (token)",
}


# Maximum length of client-supplied text repeated in a log line or an error body.
MAX_SHOWN_CHARS = 200


def shorten(text: str, limit: int) -> str:
    """Return ``text`` cut to ``limit`` characters, marking the cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class RejectionLog:
    """Log rejected requests at WARNING, at most ``burst`` lines per reason a minute.

    A scanner or a misconfigured bot can cause thousands of rejections. Past
    the burst, lines are only counted, and the count is logged with the first
    rejection of that reason after the minute. /metrics counts every one.
    """

    def __init__(self, burst: int = 5, window: float = 60.0) -> None:
        self._burst = burst
        self._window = window
        self._lock = threading.Lock()
        # reason -> [window start, lines logged, lines suppressed]
        self._state: dict[str, list[float]] = {}

    def warning(self, reason: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            state = self._state.setdefault(reason, [now, 0, 0])
            suppressed = 0
            if now - state[0] >= self._window:
                suppressed = int(state[2])
                state[:] = [now, 0, 0]
            allowed = state[1] < self._burst
            if allowed:
                state[1] += 1
            else:
                state[2] += 1
        if suppressed:
            logger.warning("%d more %s rejections in the last %g s were not logged", suppressed, reason, self._window)
        if allowed:
            logger.warning(message, *args)


REJECTIONS = RejectionLog()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return Response(text + "\n", status=status, mimetype="application/json", headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message, "status": status}, status, headers)


class HeadersTooLarge(Exception):
    pass


class _LimitedReader:
    """Wrap ``rfile`` while headers are parsed, failing past a byte budget."""

    def __init__(self, raw: Any, budget: int) -> None:
        self._raw = raw
        self._budget = budget

    def readline(self, size: int = -1) -> bytes:
        line = self._raw.readline(size)
        self._budget -= len(line)
        if self._budget < 0:
            raise HeadersTooLarge()
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class HeaderDeadlines:
    """Cut connections that have not sent a complete request head in time.

    A socket timeout alone cannot do this: it restarts with every byte, so a
    client sending one byte a second would hold a thread forever. One
    ``header-reaper`` thread shuts such sockets down instead.
    """

    def __init__(self, tick: float = 0.25) -> None:
        self._lock = threading.Lock()
        self._deadlines: dict[Any, float] = {}
        self._tick = tick
        self._thread: threading.Thread | None = None

    def add(self, handler: Any, seconds: float) -> None:
        with self._lock:
            self._deadlines[handler] = time.monotonic() + seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="header-reaper", daemon=True)
                self._thread.start()

    def discard(self, handler: Any) -> None:
        with self._lock:
            self._deadlines.pop(handler, None)

    def _run(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            # Shut down under the lock, so a handler cannot finish its head
            # (and start a websocket) between the check and the shutdown.
            with self._lock:
                expired = [handler for handler, deadline in self._deadlines.items() if deadline <= now]
                for handler in expired:
                    del self._deadlines[handler]
                    handler.header_timed_out()


HEADER_DEADLINES = HeaderDeadlines()

def over_capacity_response(maximum: int) -> bytes:
    """Return the whole 503 response for a connection over max_http_connections."""
    body = json.dumps(
        {"error": f"the relay has {maximum} HTTP connections open, the most allowed; "
         "retry later or raise [server] max_http_connections"}
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        "Retry-After: 5\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


# Pause of the accepting thread after accept() fails for want of descriptors.
ACCEPT_PAUSE_SECONDS = 0.1


class ConnectionLimit:
    """Cap on connections that hold a server thread without being websocket clients.

    Each accepted connection takes a slot until its thread ends or it becomes
    a websocket client, which ``max_clients`` bounds instead. Past the cap a
    connection gets a 503 and is closed on the accepting thread, so idle or
    slow connections cannot make the server start a thread for each.
    """

    def __init__(self, maximum: int, count_rejection: Callable[[str], None]) -> None:
        self.maximum = maximum
        self._count_rejection = count_rejection
        self._lock = threading.Lock()
        self._open: set[Any] = set()

    def count(self) -> int:
        with self._lock:
            return len(self._open)

    def admit(self, connection: Any) -> bool:
        with self._lock:
            if len(self._open) >= self.maximum:
                return False
            self._open.add(connection)
            return True

    def release(self, connection: Any) -> None:
        with self._lock:
            self._open.discard(connection)

    def _reject(self, connection: Any, address: Any) -> None:
        self._count_rejection("max_http_connections")
        host = address[0] if isinstance(address, tuple) else str(address)
        REJECTIONS.warning(
            "max_http_connections",
            "rejected connection from %s: max_http_connections (%d) reached",
            host,
            self.maximum,
        )
        try:
            # MSG_DONTWAIT keeps the accepting thread from blocking, so a
            # client that does not read misses the response.
            connection.send(over_capacity_response(self.maximum), socket.MSG_DONTWAIT)
        except OSError:
            pass

    def install(self, server: Any) -> None:
        """Wrap ``server``'s accept and per-connection thread start with the cap."""
        accept = server.get_request
        start_thread = server.process_request
        run_thread = server.process_request_thread

        def get_request() -> Any:
            try:
                return accept()
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    self._count_rejection("open_file_limit")
                    REJECTIONS.warning(
                        "open_file_limit",
                        "cannot accept a connection: %s; raise LimitNOFILE (ulimit -n) "
                        "or lower [clients] max_clients and [server] max_http_connections",
                        error.strerror,
                    )
                    # The listener stays readable, so without a pause the
                    # accepting thread would spin on the same error.
                    time.sleep(ACCEPT_PAUSE_SECONDS)
                raise

        def process_request(connection: Any, address: Any) -> None:
            if not self.admit(connection):
                self._reject(connection, address)
                server.shutdown_request(connection)
                return
            try:
                start_thread(connection, address)
            except BaseException:
                self.release(connection)
                raise

        def process_request_thread(connection: Any, address: Any) -> None:
            try:
                run_thread(connection, address)
            finally:
                self.release(connection)

        server.get_request = get_request
        server.process_request = process_request
        server.process_request_thread = process_request_thread


class RelayRequestHandler(WSGIRequestHandler):
    """Werkzeug's handler with JSON error pages, header limits and quiet logs."""

    # Overridden per server by ``make_handler`` from the [server] settings.
    # The socket timeout is twice the header deadline, so the reaper, which
    # logs and counts, is what cuts a slow or idle head.
    header_timeout = 10.0
    timeout: float | None = 2 * header_timeout
    max_header_bytes = 16 * 1024

    def handle_one_request(self) -> None:
        HEADER_DEADLINES.add(self, self.header_timeout)
        try:
            super().handle_one_request()
        finally:
            HEADER_DEADLINES.discard(self)
            environ = getattr(self, "environ", None)
            if environ is not None and environ.get("relay.upgraded"):
                self.close_connection = True

    def header_timed_out(self) -> None:
        REJECTIONS.warning(
            "header_timeout",
            "closed connection from %s: no complete request within header_timeout (%g s)",
            self.client_address[0],
            self.header_timeout,
        )
        counter = getattr(self.server, "count_rejection", None)
        if counter is not None:
            counter("header_timeout")
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def parse_request(self) -> bool:
        original = self.rfile
        self.rfile = _LimitedReader(original, self.max_header_bytes - len(self.raw_requestline))
        try:
            parsed = super().parse_request()
            if parsed and self.request_version == "HTTP/0.9":
                # http.server would answer HTTP/0.9 with a bare body.
                self.request_version = "HTTP/1.1"
                self.send_error(505, "HTTP/0.9 is not supported; send HTTP/1.1")
                return False
            return parsed
        except HeadersTooLarge:
            self.send_error(431, f"request line and headers exceed {self.max_header_bytes} bytes")
            return False
        finally:
            self.rfile = original
            # The head is complete (or rejected); the websocket that may
            # follow lives on without a deadline.
            HEADER_DEADLINES.discard(self)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if getattr(self, "command", None) is None:
            # The request line did not parse, so http.server still assumes
            # HTTP/0.9 and would send the body without a status line.
            self.request_version = "HTTP/1.1"
        short = BaseHTTPRequestHandler.responses.get(code, ("Error", ""))[0]
        # http.server quotes the whole request line in some messages, and a
        # line may be 64 KiB long.
        detail = shorten(message or short, MAX_SHOWN_CHARS)
        body = json.dumps({"error": detail, "status": code}).encode() + b"\n"
        REJECTIONS.warning(f"http_{code}", "rejected request from %s: HTTP %d %s", self.client_address[0], code, detail)
        counter = getattr(self.server, "count_rejection", None)
        if counter is not None:
            counter(f"http_{code}")
        self.send_response(code, short)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if getattr(self, "command", None) != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)
        self.close_connection = True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if logger.isEnabledFor(logging.DEBUG):
            # The query string may carry the access token, in any encoding.
            path = getattr(self, "path", "").split("?", 1)[0]
            logger.debug(
                "%s %s %r %s %s", self.client_address[0], getattr(self, "command", ""), path, code, size
            )

    def log_error(self, format: str, *args: Any) -> None:
        logger.debug("%s: " + format, self.client_address[0], *args)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s: " + format, self.client_address[0], *args)


class RelayWebSocket(simple_websocket.Server):
    """simple-websocket's server, choosing subprotocols as Node's ``ws`` does."""

    def choose_subprotocol(self, request: Any) -> str | None:
        # The relay speaks no subprotocol of its own. Node ws servers (which
        # this relay replaces) accept the client's first one, and ws clients
        # that request one fail if the response names none.
        return request.subprotocols[0] if request.subprotocols else None


def make_handler(header_timeout: float, max_header_bytes: int) -> type[RelayRequestHandler]:
    attributes = {"header_timeout": header_timeout, "timeout": 2 * header_timeout, "max_header_bytes": max_header_bytes}
    return type("ConfiguredRequestHandler", (RelayRequestHandler,), attributes)


def is_websocket_request(environ: dict[str, Any]) -> bool:
    upgrade = environ.get("HTTP_UPGRADE", "").lower()
    connection = [token.strip().lower() for token in environ.get("HTTP_CONNECTION", "").split(",")]
    return upgrade == "websocket" and "upgrade" in connection


class RelayApp:
    """WSGI callable; ``relay`` is the ``service.Relay`` that owns the state."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.routes: dict[str, Callable[[Request], Response]] = {
            "/": self.index,
            "/health": self.health,
            "/live": self.live,
            "/ready": self.ready,
            "/status": self.status,
            "/api/clients": self.api_clients,
            "/metrics": self.metrics,
        }

    @property
    def settings(self) -> Any:
        # Read on every use: SIGHUP swaps in new settings.
        return self.relay.settings

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        # WSGI passes the path as latin-1 text holding the raw bytes.
        path = environ.get("PATH_INFO", "").encode("latin-1", "replace").decode("utf-8", "replace")
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            response = self._check_access(environ, path)
            if response is None and not (path == "/relay" and method == "GET" and is_websocket_request(environ)):
                response = self.dispatch(Request(environ), path, method)
        except Exception as error:  # noqa: BLE001 - one bad request must not log a traceback
            response = self._internal_error(environ, path, method, error)
        if response is None:
            return self.websocket(environ, start_response)
        return response(environ, start_response)

    def _internal_error(self, environ: dict[str, Any], path: str, method: str, error: Exception) -> Response:
        """Log a failed request without its traceback (DEBUG shows it) and return a JSON 500."""
        address = environ.get("REMOTE_ADDR", "?")
        self.relay.count_rejection("internal_error")
        REJECTIONS.warning(
            "internal_error", "request %s %r from %s failed: %s: %s", method, path, address, type(error).__name__, error
        )
        logger.debug("request %s %r from %s failed", method, path, address, exc_info=True)
        return error_response(500, "internal error while handling this request; the relay's log names it")

    def _check_access(self, environ: dict[str, Any], path: str) -> Response | None:
        policy = self.relay.access
        address = environ.get("REMOTE_ADDR", "?")
        if path not in OPEN_PATHS and not policy.host_allowed(environ):
            self.relay.count_rejection("host")
            REJECTIONS.warning(
                "host",
                "rejected %s from %s: Host %r is not an IP address, localhost or in "
                "[server] allowed_hosts",
                path,
                address,
                environ.get("HTTP_HOST", "")[:200],
            )
            return error_response(
                403, "this Host name is not allowed; add it to [server] allowed_hosts"
            )
        if path not in OPEN_PATHS and not policy.origin_allowed(environ):
            self.relay.count_rejection("origin")
            REJECTIONS.warning(
                "origin",
                "rejected %s from %s: Origin %r is not in [security] allowed_origins",
                path,
                address,
                environ.get("HTTP_ORIGIN", "")[:200],
            )
            return error_response(
                403,
                "this Origin is not allowed; add it to [security] allowed_origins",
            )
        if policy.token_required(path) and not policy.token_valid(environ):
            self.relay.count_rejection("token")
            REJECTIONS.warning("token", "rejected %s from %s: missing or wrong access token", path, address)
            return error_response(
                401,
                "missing or wrong access token; send 'Authorization: Bearer TOKEN' "
                "or add ?token=TOKEN to the URL",
                {"WWW-Authenticate": 'Bearer realm="bptf-relay"'},
            )
        return None

    def dispatch(self, request: Request, path: str, method: str) -> Response:
        if path not in self.routes and path != "/relay":
            return error_response(404, f"no endpoint at {path}; see GET / for the list")
        if method not in ("GET", "HEAD"):
            return error_response(
                405, f"method {method} is not allowed on {path}; use GET", {"Allow": "GET, HEAD"}
            )
        if path == "/relay":
            return error_response(
                400,
                "GET /relay needs a websocket upgrade: connect with a websocket client to "
                f"ws://{request.host}/relay",
            )
        return self.routes[path](request)

    # -- JSON endpoints ----------------------------------------------------------

    def index(self, request: Request) -> Response:
        return json_response(
            {
                "service": "bptf-relay",
                "version": __version__,
                "description": "Relay for the Backpack.tf events feed",
                "endpoints": ENDPOINTS,
            }
        )

    def health(self, request: Request) -> Response:
        relay = self.relay
        connected = relay.upstream.connected
        body = {
            "healthy": connected,
            "backpackConnected": connected,
            "connectedClients": relay.registry.count(),
            "uptime": round(relay.uptime(), 3),
            "messagesRelayed": relay.upstream.frames_relayed,
        }
        return json_response(body, 200 if connected else 503)

    def live(self, request: Request) -> Response:
        return json_response({"live": True, "uptime": round(self.relay.uptime(), 3)})

    def ready(self, request: Request) -> Response:
        connected = self.relay.upstream.connected
        return json_response(
            {"ready": connected, "backpackConnected": connected}, 200 if connected else 503
        )

    def metrics(self, request: Request) -> Response:
        return Response(render_metrics(self.relay), status=200, content_type=METRICS_CONTENT_TYPE)

    def status(self, request: Request) -> Response:
        return json_response(self.relay.status())

    def api_clients(self, request: Request) -> Response:
        rows = [client.describe() for client in self.relay.registry.clients()]
        rows.sort(key=lambda row: row["id"])
        return json_response({"count": len(rows), "clients": rows})

    # -- websocket -----------------------------------------------------------------

    def websocket(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        relay = self.relay
        registry = relay.registry
        address = environ.get("REMOTE_ADDR", "?")
        rejection = self._check_handshake(environ)
        if rejection is None and relay.stopping:
            rejection = error_response(503, "the relay is shutting down", {"Retry-After": "5"})
        if rejection is None:
            rejection = self._reserve_slot(address)
        if rejection is not None:
            return rejection(environ, start_response)
        try:
            return self._serve_websocket(environ, address)
        finally:
            # The writer thread is done with the socket; Werkzeug must not
            # read leftover client bytes from it as a new HTTP request.
            environ["relay.upgraded"] = True

    def _reserve_slot(self, address: str) -> Response | None:
        settings = self.settings
        per_ip = settings.clients_max_clients_per_ip
        cap = self.relay.registry.reserve(address, settings.clients_max_clients, per_ip)
        if cap is None:
            return None
        self.relay.count_rejection(cap)
        limit = per_ip if cap == "max_clients_per_ip" else settings.clients_max_clients
        REJECTIONS.warning(cap, "rejected websocket from %s: %s (%d) reached", address, cap, limit)
        if cap == "max_clients_per_ip":
            return error_response(
                429,
                f"this address already has {per_ip} connections, the most allowed; "
                "close one or raise [clients] max_clients_per_ip",
                {"Retry-After": "5"},
            )
        return error_response(
            503,
            f"the relay is serving its maximum of {settings.clients_max_clients} "
            "clients; retry later",
            {"Retry-After": "5"},
        )

    def _serve_websocket(self, environ: dict[str, Any], address: str) -> Any:
        relay = self.relay
        registry = relay.registry

        raw = environ["werkzeug.socket"]
        client_id = registry.next_id()
        threading.current_thread().name = f"client-{client_id}"
        # The header timeout is over; reads now happen on the reader thread
        # and writes use MSG_DONTWAIT plus select().
        raw.settimeout(None)
        # From here max_clients bounds this connection, not max_http_connections.
        relay.connections.release(raw)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        client = Client(
            client_id,
            address,
            environ.get("HTTP_USER_AGENT", "")[:200],
            raw,
            self.settings,
            on_closing=registry.count_closing,
            latency=relay.latency,
        )
        client.credentials = relay.access.credentials(environ)
        upgrade_environ = dict(environ)
        # Refuse permessage-deflate: compressing per client multiplies the
        # relay's CPU, and uncompressed frames are valid either way.
        upgrade_environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        upgrade_environ["werkzeug.socket"] = ClientSocket(client)
        try:
            ws = RelayWebSocket(
                upgrade_environ,
                max_message_size=self.settings.clients_max_message_bytes,
                thread_class=functools.partial(threading.Thread, daemon=True),
                event_class=functools.partial(InboundSignal, client),
            )
        except Exception as error:  # noqa: BLE001 - wsproto raises several types
            logger.info("websocket handshake with %s failed: %s", address, error)
            registry.release(address)
            client.abort()
            raise ConnectionError("websocket handshake failed") from None
        client.ws = ws
        ws.thread.name = f"client-{client_id}-reader"

        def greeting(count: int) -> bytes:
            return relay_message(
                "relay_status",
                clientId=client_id,
                backpackConnected=relay.upstream.connected,
                connectedClients=count,
                uptime=round(relay.uptime(), 3),
                messagesRelayed=relay.upstream.frames_relayed,
            )

        count = registry.add(client, greeting)
        logger.info(
            "client %d connected from %s (%s); %d connected",
            client_id,
            address,
            client.user_agent or "no user agent",
            count,
        )
        if relay.stopping:
            client.going_away()
        # A reload may have changed the rules after this request passed them
        # but before the reload's sweep could see this client, so check again.
        failed = relay.access.revoked(client.credentials)
        if failed:
            client.revoke_access(failed)
        try:
            client.serve()
        finally:
            count = registry.remove(client)
            logger.info(
                "client %d (%s) disconnected: %s, code %s, %d frames and %d bytes sent; "
                "%d connected",
                client_id,
                address,
                client.close_cause.value if client.close_cause else "unknown",
                client.close_code,
                client.frames_sent,
                client.bytes_sent,
                count,
            )
        # The socket is already shut down; raising ConnectionError makes
        # Werkzeug end the connection without writing a response.
        raise ConnectionError("websocket closed")

    def _check_handshake(self, environ: dict[str, Any]) -> Response | None:
        version = environ.get("HTTP_SEC_WEBSOCKET_VERSION", "")
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        if not key:
            return error_response(400, "websocket upgrade without Sec-WebSocket-Key")
        try:
            decoded = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if len(decoded) != 16:
            # RFC 6455, section 4.2.1: the key is 16 random bytes in base64.
            return error_response(400, "invalid Sec-WebSocket-Key: expected 16 bytes in base64")
        if version.strip() != "13":
            return error_response(
                426,
                f"unsupported Sec-WebSocket-Version {version!r}; this relay speaks version 13",
                {"Sec-WebSocket-Version": "13"},
            )
        return None
