"""Configure the relay's log output: text, journald-prefixed text or JSON lines.

Formats written by :func:`configure_logging`:

- ``text`` on a terminal or file:
  ``[2026-01-01T10:30:00.000Z] [INFO] relay.upstream: message`` (UTC, milliseconds).
- ``text`` when stderr is the systemd journal (``$JOURNAL_STREAM`` matches the
  stream): ``<6>[INFO] relay.upstream: message``. The ``<N>`` syslog priority lets
  journald store the level, and the journal adds its own timestamp.
- ``json``: one object per line with ``time``, ``level``, ``logger``, ``message``,
  every ``extra=`` field, and ``exc_info`` when an exception is attached.

Every formatted line passes through a :class:`SecretRedactor`, which masks
``token=VALUE`` query parameters, ``Bearer VALUE`` credentials and the literal
secrets registered with :func:`set_secrets`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any, Iterable, Mapping, TextIO

logger = logging.getLogger(__name__)

RELAY_LOGGER_NAME = "relay"

LOG_FORMATS = ("text", "json")

# Accepted spellings of LOG_LEVEL. WARN is the name the Node.js relay used.
LEVELS: dict[str, int] = {
    "ERROR": logging.ERROR,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "INFO": logging.INFO,
    "DEBUG": logging.DEBUG,
}

# Library loggers (websocket, asyncio, ...) log through the root logger, which is
# never more verbose than this, so their per-frame DEBUG and INFO noise stays out.
LIBRARY_LEVEL = logging.WARNING

REDACTED = "REDACTED"

# Syslog priorities (RFC 5424) that journald reads from a "<N>" line prefix.
_PRIORITY_ERROR = 3
_PRIORITY_WARNING = 4
_PRIORITY_INFO = 6
_PRIORITY_DEBUG = 7

# Attributes that every LogRecord has. Any other attribute came from ``extra=``.
# "message" and "asctime" are set by Formatter.format, "taskName" by Python 3.12+.
_STANDARD_RECORD_ATTRIBUTES = frozenset(
    vars(logging.makeLogRecord({})).keys() | {"message", "asctime", "taskName"}
)

# A query parameter whose name ends in "token" (token=, access_token=, ...). The
# value ends at the next separator, quote, bracket or whitespace.
_TOKEN_PARAMETER = re.compile(r"(?i)\b(\w*token=)[^&#\s\"'<>,;)\]}]+")

# An HTTP bearer credential, as in "Authorization: Bearer VALUE".
_BEARER_CREDENTIAL = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;)\]}]+")


class SecretRedactor:
    """Masker for credentials in formatted log lines.

    It replaces the value of ``token=`` query parameters and ``Bearer`` credentials
    with ``REDACTED``, as well as every occurrence of the registered literal
    secrets, both raw and JSON-escaped. It is thread-safe.
    """

    def __init__(self) -> None:
        """Create a redactor with no literal secrets."""
        self._secrets: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def set_secrets(self, secrets: Iterable[str | None]) -> None:
        """Replace the literal secrets to mask. Empty strings and None are skipped."""
        forms: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            forms.add(secret)
            # The JSON formatter escapes quotes and backslashes in string values.
            forms.add(json.dumps(secret)[1:-1])
        # Mask longer secrets first so that a secret containing another is masked
        # whole.
        ordered = tuple(sorted(forms, key=len, reverse=True))
        with self._lock:
            self._secrets = ordered

    def redact(self, text: str) -> str:
        """Return ``text`` with every known credential replaced by ``REDACTED``."""
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        text = _TOKEN_PARAMETER.sub(r"\1" + REDACTED, text)
        text = _BEARER_CREDENTIAL.sub(r"\1" + REDACTED, text)
        return text


# Shared by every handler that configure_logging installs, so set_secrets() applies
# across reconfigurations.
_redactor = SecretRedactor()


def set_secrets(secrets: Iterable[str | None]) -> None:
    """Mask these literal strings (e.g. the configured access token) in all logs.

    The list replaces the previous one and survives calls to configure_logging.
    """
    _redactor.set_secrets(secrets)


def parse_level(text: str) -> int:
    """Convert a level name (ERROR, WARN, WARNING, INFO, DEBUG) to a logging level.

    Matching ignores case and surrounding whitespace. Raises ValueError naming the
    invalid value and the accepted names.
    """
    level = LEVELS.get(text.strip().upper())
    if level is None:
        allowed = ", ".join(LEVELS)
        raise ValueError(f"invalid log level {text!r}: expected one of {allowed}")
    return level


def parse_log_format(text: str) -> str:
    """Normalize a log format name to ``text`` or ``json``.

    Matching ignores case and surrounding whitespace. Raises ValueError naming the
    invalid value and the accepted names.
    """
    log_format = text.strip().lower()
    if log_format not in LOG_FORMATS:
        allowed = ", ".join(LOG_FORMATS)
        raise ValueError(f"invalid log format {text!r}: expected one of {allowed}")
    return log_format


def syslog_priority(levelno: int) -> int:
    """Map a logging level to the syslog priority that journald reads."""
    if levelno >= logging.ERROR:
        return _PRIORITY_ERROR
    if levelno >= logging.WARNING:
        return _PRIORITY_WARNING
    if levelno >= logging.INFO:
        return _PRIORITY_INFO
    return _PRIORITY_DEBUG


def is_journal_stream(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Return whether ``stream`` writes to the systemd journal.

    systemd sets ``$JOURNAL_STREAM`` to ``DEVICE:INODE`` of the journal socket. As
    systemd.exec(5) advises, the stream's file descriptor must match those numbers,
    because a child of a service (e.g. a terminal started by a user service)
    inherits the variable with other output. A stream without a file descriptor
    (such as io.StringIO) is trusted on the variable alone.
    """
    value = environ.get("JOURNAL_STREAM")
    if not value:
        return False

    device, _, inode = value.partition(":")
    try:
        expected = (int(device), int(inode))
    except ValueError:
        return False

    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return True

    try:
        status = os.fstat(fd)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) == expected


class _UtcFormatter(logging.Formatter):
    """Base formatter with ISO 8601 UTC times and redaction of the whole output."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self, fmt: str, redactor: SecretRedactor) -> None:
        """Use the %-style ``fmt`` and mask credentials with ``redactor``."""
        super().__init__(fmt)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` like logging.Formatter, then redact credentials."""
        return self.redactor.redact(super().format(record))


class TextFormatter(_UtcFormatter):
    """Formatter for ``[2026-01-01T10:30:00.000Z] [INFO] relay.x: message`` lines."""

    def __init__(self, redactor: SecretRedactor) -> None:
        """Mask credentials with ``redactor``."""
        super().__init__(
            "[%(asctime)s] [%(levelname)s] %(name)s: %(message)s", redactor
        )


class JournalFormatter(_UtcFormatter):
    """Formatter for ``<6>[INFO] relay.x: message`` lines read by journald.

    journald turns every line into its own entry, so each line of a multi-line
    message or traceback gets the record's priority prefix.
    """

    def __init__(self, redactor: SecretRedactor) -> None:
        """Mask credentials with ``redactor``."""
        super().__init__("[%(levelname)s] %(name)s: %(message)s", redactor)

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` and prefix each line with ``<N>``."""
        prefix = f"<{syslog_priority(record.levelno)}>"
        lines = super().format(record).split("\n")
        return "\n".join(prefix + line for line in lines)


class JsonFormatter(_UtcFormatter):
    """Formatter for one JSON object per record.

    Keys: ``time`` (ISO 8601 UTC with milliseconds), ``level`` (standard Python
    level name), ``logger``, ``message``, then every attribute passed with
    ``extra=`` under its own name, then ``exc_info`` (the formatted traceback) and
    ``stack_info`` when present. Values that JSON cannot encode are written as
    ``str(value)``. An ``extra`` key equal to a fixed key is dropped.
    """

    def __init__(self, redactor: SecretRedactor) -> None:
        """Mask credentials with ``redactor``."""
        super().__init__("%(message)s", redactor)

    def format(self, record: logging.LogRecord) -> str:
        """Serialize ``record`` as a single-line JSON object."""
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }

        for key, value in vars(record).items():
            if key in _STANDARD_RECORD_ATTRIBUTES or key in entry:
                continue
            entry[key] = value

        if record.exc_info:
            # Formatter.format caches the traceback in record.exc_text the same way.
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)

        line = json.dumps(entry, default=str, ensure_ascii=False)
        return self.redactor.redact(line)


class _RelayHandler(logging.StreamHandler):
    """Stream handler installed by configure_logging, found again by its type."""


def configure_logging(
    level: str,
    log_format: str = "text",
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Send log records to ``stream`` in ``log_format`` and set the relay's level.

    ``level`` is a name accepted by :func:`parse_level`. ``log_format`` is ``text``
    or ``json``. ``stream`` defaults to ``sys.stderr`` and ``environ`` to
    ``os.environ``, from which ``$JOURNAL_STREAM`` selects the journald text form.

    The ``relay`` logger gets ``level``. One handler on the root logger writes the
    output, so library loggers appear in the same format, and the root level is
    ``level`` or WARNING, whichever is less verbose. Calling this again (e.g. on
    SIGHUP) replaces the handler installed by the previous call and leaves other
    handlers alone. Returns the new handler.

    Raises ValueError for an invalid level or format before changing anything.
    """
    levelno = parse_level(level)
    log_format = parse_log_format(log_format)
    if stream is None:
        stream = sys.stderr
    if environ is None:
        environ = os.environ

    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter(_redactor)
    elif is_journal_stream(stream, environ):
        formatter = JournalFormatter(_redactor)
    else:
        formatter = TextFormatter(_redactor)

    handler = _RelayHandler(stream)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _RelayHandler):
            root.removeHandler(existing)
            existing.close()
    root.addHandler(handler)
    root.setLevel(max(levelno, LIBRARY_LEVEL))

    relay_logger = logging.getLogger(RELAY_LOGGER_NAME)
    relay_logger.setLevel(levelno)
    relay_logger.propagate = True

    logger.debug(
        "Logging configured: level %s, format %s, formatter %s",
        logging.getLevelName(levelno),
        log_format,
        type(formatter).__name__,
    )
    return handler
