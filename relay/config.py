"""Configuration: the INI file, the environment and the command line.

Every setting is declared once in ``FIELDS`` with its type, default, unit and
allowed range. ``load_settings`` merges the sources in this order of precedence:
command-line flag, environment variable, file, default. Any invalid value raises
``ConfigError`` with one line that names the source, the key, the value and what
is allowed; ``python -m relay`` turns that into exit status 78 (EX_CONFIG).
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import logging
import os
import re
import stat
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from .logs import LEVELS

EX_CONFIG = 78

KIB = 1024
MIB = 1024 * 1024

LOG_FORMATS = ("text", "json")

# Maximum size of token_file in bytes. The token is one line, and the bound
# stops a huge or endless file from filling memory.
TOKEN_FILE_MAX_BYTES = 4096


class ConfigError(Exception):
    """An invalid configuration file, key or value; the message is one line."""


@dataclass(frozen=True)
class Field:
    """One setting: where it lives, how it parses and what it means."""

    section: str
    key: str
    kind: str  # a key of PARSERS
    default: Any
    help: str
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False
    # Shown, commented out, in relay.conf.example when the default is empty.
    example: str = ""

    @property
    def attr(self) -> str:
        return f"{self.section}_{self.key}"


FIELDS: tuple[Field, ...] = (
    # [server]
    Field("server", "host", "host", "127.0.0.1", "address the HTTP server binds"),
    Field("server", "port", "int", 3001, "TCP port; 0 picks a free one", "", 0, 65535),
    Field(
        "server", "backlog", "int", 1024, "listen backlog for bursts of connects",
        "connections", 1, 65535,
    ),
    Field(
        "server", "header_timeout", "float", 10.0,
        "time a client has to send its request line and headers", "seconds", 0.1, 3600,
    ),
    Field(
        "server", "allowed_hosts", "hosts", "",
        "space-separated host names clients may use in the Host header besides IP "
        "addresses and localhost, or * for any; other names get 403, which stops "
        "DNS-rebinding web pages",
        example="relay.example.com",
    ),
    Field(
        "server", "max_header_bytes", "int", 16 * KIB,
        "largest request line plus headers; larger requests get HTTP 431",
        "bytes", 1024, 1 * MIB,
    ),
    Field(
        "server", "max_http_connections", "int", 1024,
        "connections served at once that are not websocket clients (HTTP requests "
        "and unfinished request heads); more get HTTP 503 and are closed",
        "connections", 1, 100000,
    ),
    Field(
        "server", "shutdown_timeout", "float", 5.0,
        "time to close clients and the upstream on SIGTERM before exiting",
        "seconds", 0.1, 600,
    ),
    # [upstream]
    Field(
        "upstream", "url", "url", "wss://ws.backpack.tf/events",
        "websocket URL of the events feed",
    ),
    Field(
        "upstream", "connect_timeout", "float", 10.0,
        "limit for the TCP, TLS and websocket handshake", "seconds", 0.1, 600,
    ),
    Field(
        "upstream", "ping_interval", "float", 30.0,
        "interval between protocol pings to the upstream; 0 disables pings",
        "seconds", 0, 3600,
    ),
    Field(
        "upstream", "ping_timeout", "float", 10.0,
        "time a pong may take before the connection counts as dead; "
        "must be less than ping_interval",
        "seconds", 0.1, 3600,
    ),
    Field(
        "upstream", "stall_timeout", "float", 120.0,
        "reconnect when no frame arrives for this long; 0 disables the check",
        "seconds", 0, 86400,
    ),
    Field(
        "upstream", "backoff_initial", "float", 1.0,
        "first reconnect delay cap", "seconds", 0.01, 3600,
    ),
    Field(
        "upstream", "backoff_multiplier", "float", 2.0,
        "growth of the delay cap per failed attempt", "", 1.0, 100,
    ),
    Field(
        "upstream", "backoff_max", "float", 60.0,
        "largest reconnect delay", "seconds", 0.01, 86400,
    ),
    Field(
        "upstream", "backoff_reset_after", "float", 30.0,
        "a connection that stays up this long resets the delay", "seconds", 0, 86400,
    ),
    Field(
        "upstream", "max_frame_bytes", "int", 16 * MIB,
        "larger upstream messages are dropped unbuffered and counted; checking a text message's UTF-8 briefly needs up to about 6 times its size", "bytes", 64 * KIB, 1024 * MIB,
    ),
    # [clients]
    Field(
        "clients", "max_clients", "int", 1000,
        "websocket clients served at once; more get HTTP 503", "clients", 1, 100000,
    ),
    Field(
        "clients", "max_clients_per_ip", "int", 0,
        "websocket clients from one IP address at once; more get HTTP 429; "
        "0 means no per-address cap (all local bots share 127.0.0.1)",
        "clients", 0, 100000,
    ),
    Field(
        "clients", "queue_max_bytes", "int", 16 * MIB,
        "bytes queued for one client before it is closed as a slow consumer",
        "bytes", 64 * KIB, 4096 * MIB,
    ),
    Field(
        "clients", "queue_max_frames", "int", 4096,
        "frames queued for one client before it is closed as a slow consumer",
        "frames", 1, 10_000_000,
    ),
    Field(
        "clients", "send_timeout", "float", 30.0,
        "a client whose socket accepts no bytes for this long is cut",
        "seconds", 0.1, 3600,
    ),
    Field(
        "clients", "ping_interval", "float", 30.0,
        "interval between protocol pings to each client; a client that sends "
        "nothing, not even a pong, for two intervals is closed",
        "seconds", 0.1, 3600,
    ),
    Field(
        "clients", "max_message_bytes", "int", 64 * KIB,
        "largest message a client may send; larger ones close it with 1009",
        "bytes", 125, 16 * MIB,
    ),
    Field(
        "clients", "message_rate", "float", 10.0,
        "messages per second a client may send on average; a flood beyond "
        "message_rate plus message_burst closes it with 1008",
        "messages/second", 0.1, 100000,
    ),
    Field(
        "clients", "message_burst", "int", 50,
        "messages a client may send at once above the rate", "messages", 1, 1000000,
    ),
    Field(
        "clients", "close_timeout", "float", 2.0,
        "time to wait for a client's close frame after sending ours", "seconds",
        0.01, 600,
    ),
    # [security]
    Field(
        "security", "token", "str", "",
        "access token clients must send (Authorization: Bearer TOKEN or "
        "?token=TOKEN); prefer token_file", secret=True,
    ),
    Field(
        "security", "token_file", "path", "",
        "file whose first line is the access token; read at start and on SIGHUP",
        example="/etc/bptf-relay/token",
    ),
    Field(
        "security", "allow_unauthenticated", "bool", False,
        "yes lets the relay listen on a non-loopback address without a token",
    ),
    Field(
        "security", "allowed_origins", "origins", "",
        "space-separated browser origins allowed to connect (e.g. "
        "https://example.com), or * for any; requests with another Origin get 403",
        example="https://dashboard.example.com",
    ),
    # [logging]
    Field("logging", "level", "level", "INFO", "DEBUG, INFO, WARNING (or WARN), ERROR"),
    Field("logging", "format", "format", "text", "text or json (one object a line)"),
)

FIELDS_BY_NAME = {(f.section, f.key): f for f in FIELDS}
SECTIONS = tuple(dict.fromkeys(f.section for f in FIELDS))

# Command-line flag of each setting that has one, for error messages. The
# flags are defined in relay.__main__, and a test checks that the two match.
COMMAND_LINE_FLAGS = {
    ("server", "host"): "--host",
    ("server", "port"): "--port",
    ("upstream", "url"): "--upstream-url",
    ("logging", "level"): "--log-level",
    ("logging", "format"): "--log-format",
}

# The Node relay this project replaces read these variables.
ENVIRONMENT = {
    "PORT": ("server", "port"),
    "BACKPACK_WS_URL": ("upstream", "url"),
    "LOG_LEVEL": ("logging", "level"),
}


def _settings_class() -> type:
    fields = [(f.attr, Any, dataclasses.field(default=f.default)) for f in FIELDS]
    fields.append(("source", str, dataclasses.field(default="defaults")))
    namespace = {
        "__doc__": (
            "Effective settings, one attribute per ``FIELDS`` entry named "
            "``SECTION_KEY`` (for example ``clients_queue_max_bytes``)."
        )
    }
    return dataclasses.make_dataclass("Settings", fields, frozen=True, namespace=namespace)


Settings = _settings_class()


def _describe_range(field: Field) -> str:
    unit = f" {field.unit}" if field.unit else ""
    if field.kind == "int":
        kind = "a whole number"
    else:
        kind = "a number"
    if field.minimum is not None and field.maximum is not None:
        return f"{kind} from {_number(field.minimum)} to {_number(field.maximum)}{unit}"
    return f"{kind}{unit}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# Plain ASCII notation only. int() and float() also accept "1_000", digits of
# other scripts such as "३००१", and float() accepts "nan" and "inf".
_INTEGER_PATTERN = re.compile(r"[+-]?[0-9]+")
_DECIMAL_PATTERN = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _parse_number(field: Field, text: str) -> int | float:
    pattern = _INTEGER_PATTERN if field.kind == "int" else _DECIMAL_PATTERN
    if not pattern.fullmatch(text):
        hint = "" if text.isascii() and "_" not in text else " in ASCII digits without underscores"
        raise ValueError(f"expected {_describe_range(field)}{hint}")
    try:
        value: int | float = int(text) if field.kind == "int" else float(text)
    except ValueError:  # more digits than sys.get_int_max_str_digits() allows
        raise ValueError(f"expected {_describe_range(field)}") from None
    if field.minimum is not None and value < field.minimum:
        raise ValueError(f"too small; expected {_describe_range(field)}")
    if field.maximum is not None and value > field.maximum:
        raise ValueError(f"too large; expected {_describe_range(field)}")
    return value


def _parse_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError("expected a ws:// or wss:// URL such as wss://ws.backpack.tf/events")
    if not parts.hostname:
        raise ValueError("the URL has no host; expected wss://HOST/PATH")
    try:
        parts.port
    except ValueError:
        raise ValueError("the URL has an invalid port; expected 1 to 65535") from None
    return text


def _parse_host(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ValueError("expected an IP address or host name such as 127.0.0.1")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        labels = text.rstrip(".").split(".")
        if not all(label and len(label) <= 63 for label in labels):
            raise ValueError("expected an IP address or host name such as 127.0.0.1") from None
    return text


def parse_level(text: str) -> str:
    """Normalise a log level name to a ``logging`` level name such as ``WARNING``.

    Accepts the names in ``relay.logs.LEVELS`` (the Node relay's ``WARN``
    among them) and ``CRITICAL``, which the relay logs as ERROR. Raises
    ValueError naming the allowed values.
    """
    name = text.strip().upper()
    if name == "CRITICAL":
        name = "ERROR"
    if name not in LEVELS:
        raise ValueError("expected one of DEBUG, INFO, WARNING (or WARN), ERROR")
    return logging.getLevelName(LEVELS[name])


def _parse_bool(text: str) -> bool:
    name = text.strip().lower()
    if name in ("yes", "true", "on", "1"):
        return True
    if name in ("no", "false", "off", "0"):
        return False
    raise ValueError("expected yes or no")


def _parse_origins(text: str) -> str:
    origins = text.split()
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(
                f"origin {origin!r} is invalid; expected scheme://host[:port] such as "
                "https://example.com, or *"
            )
    return " ".join(origin.rstrip("/") for origin in origins)


def _parse_hosts(text: str) -> str:
    names = text.split()
    for name in names:
        if name != "*":
            _parse_host(name)
    return " ".join(name.lower() for name in names)


def _parse_path(text: str) -> str:
    if text and not os.path.isabs(text):
        raise ValueError("expected an absolute path such as /etc/bptf-relay/token")
    return text


def _parse_format(text: str) -> str:
    name = text.strip().lower()
    if name not in LOG_FORMATS:
        raise ValueError("expected text or json")
    return name


PARSERS: dict[str, Callable[[Field, str], Any]] = {
    "int": _parse_number,
    "float": _parse_number,
    "url": lambda field, text: _parse_url(text),
    "host": lambda field, text: _parse_host(text),
    "level": lambda field, text: parse_level(text),
    "format": lambda field, text: _parse_format(text),
    "bool": lambda field, text: _parse_bool(text),
    "origins": lambda field, text: _parse_origins(text),
    "path": lambda field, text: _parse_path(text),
    "hosts": lambda field, text: _parse_hosts(text),
    "str": lambda field, text: text,
}


def _parse_value(field: Field, text: str, origin: str) -> Any:
    try:
        return PARSERS[field.kind](field, text.strip())
    except ValueError as error:
        raise ConfigError(f"{origin} {field.key} = {_show_invalid_value(field, text)} is invalid: {error}") from None


def _show_invalid_value(field: Field, text: str) -> str:
    if field.secret:
        return "(hidden)"
    if field.kind == "url":
        # An invalid URL may still carry a password or an API key.
        try:
            return repr(redact_url(text))
        except ValueError:
            return "(hidden because it cannot be parsed)"
    return repr(text)


def read_file(path: str) -> dict[tuple[str, str], tuple[str, str]]:
    """Read an INI file into ``{(section, key): (text, origin)}``.

    Raises ConfigError for a missing or unreadable file, a syntax error, an
    unknown section or an unknown key.
    """
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle, source=path)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found; pass an existing file with -c, "
            "for example a copy of relay.conf.example"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"{path}: configuration file is not readable by this user; "
            "fix its permissions or pass another file with -c"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; pass the configuration file itself") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid UTF-8 at byte {error.start}; save it as UTF-8") from None
    except configparser.Error as error:
        detail = " ".join(line.strip() for line in str(error).splitlines())
        raise ConfigError(f"{path}: invalid INI syntax: {detail}") from None

    values: dict[tuple[str, str], tuple[str, str]] = {}
    for section in parser.sections():
        if section not in SECTIONS:
            raise ConfigError(
                f"{path}: unknown section [{section}]; "
                f"allowed sections are {', '.join(f'[{s}]' for s in SECTIONS)}"
            )
        for key, text in parser.items(section):
            if (section, key) not in FIELDS_BY_NAME:
                allowed = ", ".join(f.key for f in FIELDS if f.section == section)
                raise ConfigError(
                    f"{path}: [{section}] unknown key {key!r}; keys in [{section}] are {allowed}"
                )
            values[(section, key)] = (text, f"{path}: [{section}]")
    return values


def load_settings(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, str], str] | None = None,
) -> Any:
    """Build ``Settings`` from defaults, a file, the environment and flags.

    ``overrides`` holds command-line values as text keyed by (section, key).
    Raises ConfigError on the first invalid source or value.
    """
    environ = os.environ if environ is None else environ
    raw: dict[tuple[str, str], tuple[str, str]] = {}
    if path is not None:
        raw.update(read_file(path))
    for variable, name in ENVIRONMENT.items():
        if variable in environ:
            raw[name] = (environ[variable], f"environment variable {variable}:")
    for name, text in (overrides or {}).items():
        flag = COMMAND_LINE_FLAGS.get(name, f"[{name[0]}] {name[1]}")
        raw[name] = (text, f"command line {flag}:")

    values: dict[str, Any] = {}
    for name, (text, origin) in raw.items():
        field = FIELDS_BY_NAME[name]
        values[field.attr] = _parse_value(field, text, origin)

    origin = path or "settings (no -c file)"
    if values.get("security_token_file"):
        values["security_token"] = read_token_file(values["security_token_file"], origin)
    settings = Settings(source=origin, **values)
    _check_combinations(settings, origin)
    return settings


def read_token_file(token_path: str, origin: str) -> str:
    """Return the first line of ``token_path``; raise ConfigError if unusable."""
    where = f"{origin}: [security] token_file = {token_path!r}"
    try:
        data = _read_token_bytes(token_path, where)
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found; create it with the token on its first line") from None
    except PermissionError:
        raise ConfigError(f"{where}: not readable by this user; fix its owner or mode (0640 root:bptf-relay)") from None
    except OSError as error:
        raise ConfigError(f"{where}: read failed: {error.strerror or error}; point it at a readable text file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{where}: not valid UTF-8 at byte {error.start}; save it as UTF-8") from None
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ConfigError(f"{where}: the token is missing or shorter than 16 characters; use a long random string such as the output of 'openssl rand -hex 32'")
    return token


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular_file(mode: int, where: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "a special file")
    raise ConfigError(f"{where}: is {kind}, not a regular file; point it at a text file with the token on its first line")


def _read_token_bytes(path: str, where: str) -> bytes:
    """Read the regular file ``path`` if it has at most TOKEN_FILE_MAX_BYTES.

    Raises ConfigError, starting with ``where``, for a directory, FIFO, device
    or socket (which could block or never end) and for a longer file. Raises
    OSError when the file cannot be opened or read.
    """
    _check_regular_file(os.stat(path).st_mode, where)
    # O_NONBLOCK keeps open() from waiting for a writer if the path was
    # replaced by a FIFO after the stat, and fstat then rejects it.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    descriptor = os.open(path, flags)
    limit = TOKEN_FILE_MAX_BYTES
    try:
        _check_regular_file(os.fstat(descriptor).st_mode, where)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(descriptor, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(descriptor)
    if size > limit:
        raise ConfigError(f"{where}: file is larger than {limit} bytes; put only the token on its first line")
    return b"".join(chunks)


def redact_url(url: str) -> str:
    """Return ``url`` with its user:password@ part, query values and fragment masked.

    ``wss://user:pw@host/events?key=SECRET&v=2`` becomes
    ``wss://***@host/events?key=***&v=***``. Scheme, host, port, path and
    query parameter names stay readable. Raises ValueError if urlsplit does.
    """
    parts = urlsplit(url)
    masked = parts
    if "@" in parts.netloc:
        masked = masked._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1])
    if parts.query:
        masked = masked._replace(query="&".join(_mask_query_value(item) for item in parts.query.split("&")))
    if parts.fragment:
        masked = masked._replace(fragment="***")
    if masked == parts:
        return url
    return masked.geturl()


def _mask_query_value(item: str) -> str:
    name, equals, value = item.partition("=")
    if not equals:
        # A part without "=" may be a bare key, as in ?SECRET, so mask it whole.
        return "***" if item else item
    return f"{name}=***" if value else item


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_combinations(settings: Any, origin: str) -> None:
    token = settings.security_token
    if token and len(token) < 16:
        raise ConfigError(
            f"{origin}: [security] token is invalid: shorter than 16 characters; use a long "
            "random string such as the output of 'openssl rand -hex 32'"
        )
    if (
        not is_loopback_host(settings.server_host)
        and not token
        and not settings.security_allow_unauthenticated
    ):
        raise ConfigError(
            f"{origin}: [server] host = {settings.server_host!r} exposes the relay beyond this "
            "machine without an access token, so anyone who can reach the port could use "
            "this IP's only Backpack.tf slot and read /status. Set [security] token_file "
            "(or token), or set [security] allow_unauthenticated = yes to accept the risk"
        )
    if settings.upstream_ping_interval and (
        settings.upstream_ping_timeout >= settings.upstream_ping_interval
    ):
        raise ConfigError(
            f"{origin}: [upstream] ping_timeout = {settings.upstream_ping_timeout:g} "
            f"is invalid: it must be less than ping_interval "
            f"({settings.upstream_ping_interval:g} seconds)"
        )
    if settings.upstream_backoff_initial > settings.upstream_backoff_max:
        raise ConfigError(
            f"{origin}: [upstream] backoff_initial = {settings.upstream_backoff_initial:g} "
            f"is invalid: it must not exceed backoff_max "
            f"({settings.upstream_backoff_max:g} seconds)"
        )


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe(settings: Any) -> str:
    """Render the effective settings as INI text, secrets masked."""
    lines: list[str] = [f"# effective configuration (file: {settings.source})"]
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for field in FIELDS:
            if field.section != section:
                continue
            value = getattr(settings, field.attr)
            if field.secret and value:
                shown = "********"
            elif field.kind == "url":
                shown = redact_url(value)
            else:
                shown = _format_value(value)
            lines.append(f"{field.key} = {shown}")
        lines.append("")
    return "\n".join(lines)


SECTION_HELP = {
    "server": "HTTP and websocket server for local clients.",
    "upstream": "The one connection to the Backpack.tf events feed.",
    "clients": "Limits applied to each websocket client.",
    "security": "Access control. Binding a non-loopback host requires a token.",
    "logging": "Log output (stderr; the journal under systemd).",
}


def example_text() -> str:
    """Render a configuration file that sets every key to its default, with help."""
    lines = [
        "# bptf-relay configuration. Every key is optional; the values below are the",
        "# defaults. Precedence: command-line flag > environment variable (PORT,",
        "# BACKPACK_WS_URL, LOG_LEVEL) > this file > default.",
        "# Check a file with: python -m relay -c relay.conf --check",
        "# Reload a running relay with SIGHUP (systemctl reload bptf-relay): [clients],",
        "# [security] and [logging] apply at once; [server] and [upstream] at restart.",
        "",
    ]
    for section in SECTIONS:
        lines.append(f"# {SECTION_HELP.get(section, '')}")
        lines.append(f"[{section}]")
        for field in FIELDS:
            if field.section != section:
                continue
            unit = f" Unit: {field.unit}." if field.unit else ""
            limits = ""
            if field.minimum is not None and field.maximum is not None:
                limits = f" Range: {_number(field.minimum)} to {_number(field.maximum)}."
            help_text = field.help[0].upper() + field.help[1:]
            lines.extend(textwrap.wrap(f"{help_text}.{unit}{limits}", 78, initial_indent="# ", subsequent_indent="# "))
            shown = _format_value(field.default)
            if field.secret or field.default == "":
                lines.append(f"# {field.key} = {field.example}".rstrip())
            else:
                lines.append(f"{field.key} = {shown}")
        lines.append("")
    return "\n".join(lines)
