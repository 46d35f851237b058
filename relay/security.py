"""Access control for HTTP requests: the access token and browser origins.

Both checks run before a websocket upgrade, so a rejected client gets a JSON
401 or 403 response instead of a websocket. Health probes (``/health``,
``/live``, ``/ready``) and ``/`` stay open so load balancers and systemd
checks need no secret.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

OPEN_PATHS = frozenset({"/", "/health", "/live", "/ready"})


@dataclass(frozen=True)
class Credentials:
    """The Host, Origin and token a websocket client presented at its upgrade.

    Kept to re-check on reload. The token is kept only as its SHA-256 digest.
    """

    host: str
    origin: str | None
    token_digest: bytes | None


class AccessPolicy:
    """Token and origin rules from the ``[security]`` settings.

    Immutable; the relay swaps in a new policy on SIGHUP.
    """

    def __init__(self, settings: Any) -> None:
        self.token = settings.security_token or ""
        self.token_digest = hashlib.sha256(self.token.encode("utf-8")).digest()
        hosts = settings.server_allowed_hosts.split()
        self.any_host = "*" in hosts
        self.hosts = frozenset(hosts)
        origins = settings.security_allowed_origins.split()
        self.any_origin = "*" in origins
        self.origins = frozenset(origin.lower() for origin in origins if origin != "*")

    def token_required(self, path: str) -> bool:
        return bool(self.token) and path not in OPEN_PATHS

    def token_valid(self, environ: dict[str, Any]) -> bool:
        """Return True if the request carries the token, compared in constant time."""
        presented = _presented_token(environ)
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), self.token.encode("utf-8"))

    def credentials(self, environ: dict[str, Any]) -> Credentials:
        """Return what the request presents, for ``revoked`` to re-check later."""
        presented = _presented_token(environ)
        return Credentials(
            host=environ.get("HTTP_HOST", ""),
            origin=environ.get("HTTP_ORIGIN"),
            token_digest=None if presented is None else hashlib.sha256(presented.encode("utf-8")).digest(),
        )

    def revoked(self, credentials: Credentials) -> str:
        """Return which rule a connected client fails under this policy, or "" if none."""
        environ = {"HTTP_HOST": credentials.host}
        if credentials.origin is not None:
            environ["HTTP_ORIGIN"] = credentials.origin
        if not self.host_allowed(environ):
            return "Host"
        if not self.origin_allowed(environ):
            return "Origin"
        if self.token and not hmac.compare_digest(credentials.token_digest or b"", self.token_digest):
            return "access token"
        return ""

    def host_allowed(self, environ: dict[str, Any]) -> bool:
        """Return True if the Host header names an IP address, localhost or an allowed name.

        A DNS-rebinding page reaches the relay under its own host name; this
        check stops it even on requests that carry no Origin header.
        """
        if self.any_host:
            return True
        host = environ.get("HTTP_HOST", "")
        try:
            name = urlsplit(f"//{host}").hostname or ""
        except ValueError:
            # An unparsable Host, such as "[", names no host the relay serves.
            return False
        if name in ("localhost", "") or name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def origin_allowed(self, environ: dict[str, Any]) -> bool:
        """Return True unless the request names a foreign Origin that is not allowed.

        Allowed: no Origin header, an Origin listed in allowed_origins (or
        ``*``), and a same-origin Origin whose host and port equal the Host
        header. websocket-client, for one, sends the latter by default; a
        browser page on another site never does, unless it rebinds DNS, which
        ``host_allowed`` catches.
        """
        origin = environ.get("HTTP_ORIGIN")
        if origin is None or self.any_origin:
            return True
        normalised = origin.strip().rstrip("/").lower()
        if normalised in self.origins:
            return True
        host = environ.get("HTTP_HOST", "").strip().lower()
        try:
            netloc = urlsplit(normalised).netloc
        except ValueError:
            return False
        return bool(host) and netloc == host


def _presented_token(environ: dict[str, Any]) -> str | None:
    presented = _bearer_token(environ.get("HTTP_AUTHORIZATION", ""))
    if presented is None:
        values = parse_qs(environ.get("QUERY_STRING", "")).get("token")
        presented = values[0] if values else None
    return presented


def _bearer_token(header: str) -> str | None:
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()
