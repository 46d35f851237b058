"""Tests for relay.logs: output formats, level parsing, redaction, reconfiguration."""

from __future__ import annotations

import calendar
import io
import json
import logging
import os
import re
import sys
import tempfile
import unittest

from relay import logs

# 2026-01-01T10:30:00.123Z as a Unix timestamp.
FIXED_TIME = calendar.timegm((2026, 1, 1, 10, 30, 0)) + 0.123

TEXT_LINE = re.compile(
    r"^\[\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\] \[INFO\] relay\.upstream: hello$"
)

JOURNAL_ENVIRON = {"JOURNAL_STREAM": "8:12345"}


def make_record(
    level: int = logging.INFO,
    message: str = "message",
    name: str = "relay.upstream",
    **attributes: object,
) -> logging.LogRecord:
    """Build a record created at FIXED_TIME with extra ``attributes``."""
    record = logging.LogRecord(name, level, __file__, 1, message, None, None)
    record.created = FIXED_TIME
    record.msecs = 123.0
    for key, value in attributes.items():
        setattr(record, key, value)
    return record


def exception_info() -> tuple:
    """Return sys.exc_info() for a raised ValueError."""
    try:
        raise ValueError("bad frame")
    except ValueError:
        return sys.exc_info()


class LoggingTestCase(unittest.TestCase):
    """Saves and restores the logging state that configure_logging changes."""

    def setUp(self) -> None:
        root = logging.getLogger()
        relay_logger = logging.getLogger("relay")
        saved_handlers = list(root.handlers)
        saved_root_level = root.level
        saved_relay_level = relay_logger.level

        def restore() -> None:
            root.handlers[:] = saved_handlers
            root.setLevel(saved_root_level)
            relay_logger.setLevel(saved_relay_level)
            logs.set_secrets([])

        self.addCleanup(restore)
        self.stream = io.StringIO()

    def configure(
        self, level: str = "INFO", log_format: str = "text", environ: dict | None = None
    ) -> logging.Handler:
        return logs.configure_logging(
            level, log_format, stream=self.stream, environ=environ or {}
        )

    def output_lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()


class TextFormatTest(LoggingTestCase):
    def test_exact_line_shape(self) -> None:
        handler = self.configure()

        line = handler.format(make_record())

        self.assertEqual(
            line, "[2026-01-01T10:30:00.123Z] [INFO] relay.upstream: message"
        )

    def test_logged_line_matches_shape(self) -> None:
        self.configure()

        logging.getLogger("relay.upstream").info("hello")

        self.assertEqual(len(self.output_lines()), 1)
        self.assertRegex(self.output_lines()[0], TEXT_LINE)

    def test_standard_level_names(self) -> None:
        handler = self.configure()
        cases = [
            (logging.DEBUG, "[DEBUG]"),
            (logging.INFO, "[INFO]"),
            (logging.WARNING, "[WARNING]"),
            (logging.ERROR, "[ERROR]"),
            (logging.CRITICAL, "[CRITICAL]"),
        ]
        for level, expected in cases:
            with self.subTest(level=level):
                line = handler.format(make_record(level))
                self.assertEqual(line.split(" ")[1], expected)

    def test_lazy_arguments_formatted(self) -> None:
        self.configure()

        logging.getLogger("relay.client").info("client %d from %s", 7, "127.0.0.1")

        self.assertTrue(self.output_lines()[0].endswith("client 7 from 127.0.0.1"))

    def test_exception_traceback_follows(self) -> None:
        handler = self.configure()

        output = handler.format(make_record(logging.ERROR, exc_info=exception_info()))

        lines = output.split("\n")
        self.assertEqual(
            lines[0], "[2026-01-01T10:30:00.123Z] [ERROR] relay.upstream: message"
        )
        self.assertEqual(lines[1], "Traceback (most recent call last):")
        self.assertEqual(lines[-1], "ValueError: bad frame")

    def test_journal_stream_of_other_file_ignored(self) -> None:
        # A terminal started by a systemd user service inherits JOURNAL_STREAM while
        # its output goes elsewhere, so the numbers must match the stream itself.
        with tempfile.TemporaryFile("w+") as log_file:
            environ = {"JOURNAL_STREAM": "1:1"}
            logs.configure_logging("INFO", stream=log_file, environ=environ)
            logging.getLogger("relay.upstream").info("hello")
            log_file.seek(0)
            line = log_file.read().rstrip("\n")

        self.assertRegex(line, TEXT_LINE)


class JournalFormatTest(LoggingTestCase):
    def test_exact_line_shape(self) -> None:
        handler = self.configure(environ=JOURNAL_ENVIRON)

        line = handler.format(make_record())

        self.assertEqual(line, "<6>[INFO] relay.upstream: message")

    def test_priority_prefixes(self) -> None:
        handler = self.configure(environ=JOURNAL_ENVIRON)
        cases = [
            (logging.CRITICAL, "<3>[CRITICAL] "),
            (logging.ERROR, "<3>[ERROR] "),
            (logging.WARNING, "<4>[WARNING] "),
            (logging.INFO, "<6>[INFO] "),
            (logging.DEBUG, "<7>[DEBUG] "),
        ]
        for level, prefix in cases:
            with self.subTest(level=logging.getLevelName(level)):
                line = handler.format(make_record(level))
                self.assertTrue(line.startswith(prefix), line)

    def test_no_timestamp(self) -> None:
        self.configure(environ=JOURNAL_ENVIRON)

        logging.getLogger("relay.upstream").warning("hello")

        self.assertEqual(self.output_lines(), ["<4>[WARNING] relay.upstream: hello"])

    def test_every_traceback_line_prefixed(self) -> None:
        handler = self.configure(environ=JOURNAL_ENVIRON)

        output = handler.format(make_record(logging.ERROR, exc_info=exception_info()))

        lines = output.split("\n")
        self.assertGreater(len(lines), 2)
        for line in lines:
            self.assertTrue(line.startswith("<3>"), line)
        self.assertEqual(lines[-1], "<3>ValueError: bad frame")

    def test_matching_file_descriptor_selects_journal(self) -> None:
        with tempfile.TemporaryFile("w+") as log_file:
            status = os.fstat(log_file.fileno())
            environ = {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
            logs.configure_logging("INFO", stream=log_file, environ=environ)
            logging.getLogger("relay.upstream").info("hello")
            log_file.seek(0)
            line = log_file.read().rstrip("\n")

        self.assertEqual(line, "<6>[INFO] relay.upstream: hello")

    def test_invalid_journal_stream_ignored(self) -> None:
        handler = self.configure(environ={"JOURNAL_STREAM": "not-a-pair"})

        line = handler.format(make_record())

        self.assertTrue(line.startswith("[2026-01-01T10:30:00.123Z] "), line)

    def test_json_format_has_no_prefix(self) -> None:
        handler = self.configure(log_format="json", environ=JOURNAL_ENVIRON)

        line = handler.format(make_record())

        self.assertTrue(line.startswith("{"), line)


class JsonFormatTest(LoggingTestCase):
    def test_exact_fields(self) -> None:
        handler = self.configure(log_format="json")

        line = handler.format(make_record(logging.WARNING, "upstream closed"))

        self.assertEqual(
            json.loads(line),
            {
                "time": "2026-01-01T10:30:00.123Z",
                "level": "WARNING",
                "logger": "relay.upstream",
                "message": "upstream closed",
            },
        )

    def test_one_object_per_line(self) -> None:
        self.configure(log_format="json")
        log = logging.getLogger("relay.upstream")

        log.info("first\nsecond")
        log.info("third")

        lines = self.output_lines()
        self.assertEqual(len(lines), 2)
        self.assertEqual(json.loads(lines[0])["message"], "first\nsecond")
        self.assertEqual(json.loads(lines[1])["message"], "third")

    def test_extra_fields_included(self) -> None:
        self.configure(log_format="json")

        logging.getLogger("relay.client").info(
            "client %s closed",
            "c-17",
            extra={
                "client_id": "c-17",
                "address": "127.0.0.1:50312",
                "attempt": 3,
                "code": 1006,
            },
        )

        entry = json.loads(self.output_lines()[0])
        self.assertEqual(entry["message"], "client c-17 closed")
        self.assertEqual(entry["client_id"], "c-17")
        self.assertEqual(entry["address"], "127.0.0.1:50312")
        self.assertEqual(entry["attempt"], 3)
        self.assertEqual(entry["code"], 1006)
        self.assertNotIn("args", entry)
        self.assertNotIn("exc_info", entry)

    def test_unserializable_extra_written_as_text(self) -> None:
        handler = self.configure(log_format="json")

        record = make_record(peer=("127.0.0.1", 80), error=OSError(5, "EIO"))
        line = handler.format(record)

        entry = json.loads(line)
        self.assertEqual(entry["peer"], ["127.0.0.1", 80])
        self.assertEqual(entry["error"], "[Errno 5] EIO")

    def test_extra_cannot_replace_fixed_keys(self) -> None:
        handler = self.configure(log_format="json")

        line = handler.format(make_record(time="yesterday", logger="other"))

        entry = json.loads(line)
        self.assertEqual(entry["time"], "2026-01-01T10:30:00.123Z")
        self.assertEqual(entry["logger"], "relay.upstream")

    def test_exception_under_exc_info(self) -> None:
        self.configure(log_format="json")

        try:
            raise ConnectionResetError("peer reset")
        except ConnectionResetError:
            logging.getLogger("relay.upstream").exception("upstream failed")

        lines = self.output_lines()
        self.assertEqual(len(lines), 1)
        entry = json.loads(lines[0])
        self.assertEqual(entry["level"], "ERROR")
        self.assertEqual(entry["message"], "upstream failed")
        self.assertTrue(entry["exc_info"].startswith("Traceback (most recent call"))
        self.assertTrue(entry["exc_info"].endswith("ConnectionResetError: peer reset"))


class ParseLevelTest(unittest.TestCase):
    def test_accepted_names(self) -> None:
        cases = [
            ("ERROR", logging.ERROR),
            ("error", logging.ERROR),
            ("WARN", logging.WARNING),
            ("warn", logging.WARNING),
            ("WARNING", logging.WARNING),
            ("Warning", logging.WARNING),
            ("INFO", logging.INFO),
            (" info\n", logging.INFO),
            ("DEBUG", logging.DEBUG),
            ("debug", logging.DEBUG),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(logs.parse_level(text), expected)

    def test_invalid_level_message(self) -> None:
        with self.assertRaises(ValueError) as caught:
            logs.parse_level("verbose")

        message = str(caught.exception)
        self.assertIn("'verbose'", message)
        for name in ("ERROR", "WARN", "WARNING", "INFO", "DEBUG"):
            self.assertIn(name, message)

    def test_empty_level_rejected(self) -> None:
        with self.assertRaises(ValueError):
            logs.parse_level("")

    def test_invalid_format_message(self) -> None:
        with self.assertRaises(ValueError) as caught:
            logs.parse_log_format("xml")

        message = str(caught.exception)
        self.assertIn("'xml'", message)
        self.assertIn("text", message)
        self.assertIn("json", message)

    def test_format_case_insensitive(self) -> None:
        self.assertEqual(logs.parse_log_format(" JSON "), "json")


class RedactionTest(LoggingTestCase):
    def test_token_query_parameter(self) -> None:
        self.configure()

        logging.getLogger("relay.upstream").info(
            "connecting to %s", "wss://ws.backpack.tf/events?token=abc123&v=2"
        )

        line = self.output_lines()[0]
        self.assertIn("?token=REDACTED&v=2", line)
        self.assertNotIn("abc123", line)

    def test_token_parameter_variants(self) -> None:
        redactor = logs.SecretRedactor()
        cases = [
            ("GET /?token=abc HTTP/1.1", "GET /?token=REDACTED HTTP/1.1"),
            ("/events?v=1&token=abc#top", "/events?v=1&token=REDACTED#top"),
            ("url='/x?access_token=abc'", "url='/x?access_token=REDACTED'"),
            ("?TOKEN=abc, retrying", "?TOKEN=REDACTED, retrying"),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(redactor.redact(text), expected)

    def test_bearer_credential(self) -> None:
        self.configure()

        logging.getLogger("relay.http").warning(
            "rejected header Authorization: Bearer abc.def-123"
        )

        line = self.output_lines()[0]
        self.assertTrue(line.endswith("Authorization: Bearer REDACTED"), line)
        self.assertNotIn("abc.def-123", line)

    def test_configured_secret_masked_in_text(self) -> None:
        self.configure()
        logs.set_secrets(["s3cr3t-t0ken"])

        logging.getLogger("relay.config").info("token is %s", "s3cr3t-t0ken")

        self.assertEqual(self.output_lines()[0].split(": ", 1)[1], "token is REDACTED")

    def test_configured_secret_masked_in_traceback(self) -> None:
        self.configure(environ=JOURNAL_ENVIRON)
        logs.set_secrets(["s3cr3t-t0ken"])

        try:
            raise RuntimeError("handshake failed for s3cr3t-t0ken")
        except RuntimeError:
            logging.getLogger("relay.upstream").exception("upstream failed")

        output = self.stream.getvalue()
        self.assertNotIn("s3cr3t-t0ken", output)
        self.assertIn("<3>RuntimeError: handshake failed for REDACTED", output)

    def test_configured_secret_masked_in_json(self) -> None:
        self.configure(log_format="json")
        logs.set_secrets(['quo"te\\secret'])

        logging.getLogger("relay.upstream").info(
            "token %s", 'quo"te\\secret', extra={"token": 'quo"te\\secret'}
        )

        line = self.output_lines()[0]
        self.assertNotIn("secret", line)
        entry = json.loads(line)
        self.assertEqual(entry["message"], "token REDACTED")
        self.assertEqual(entry["token"], "REDACTED")

    def test_secrets_survive_reconfigure(self) -> None:
        logs.set_secrets(["s3cr3t-t0ken"])
        self.configure(log_format="json")
        self.configure(log_format="text")

        logging.getLogger("relay.upstream").info("s3cr3t-t0ken")

        self.assertNotIn("s3cr3t-t0ken", self.stream.getvalue())

    def test_set_secrets_replaces_list(self) -> None:
        redactor = logs.SecretRedactor()
        redactor.set_secrets(["old-secret", "", None])
        redactor.set_secrets(["new-secret"])

        redacted = redactor.redact("old-secret new-secret")

        self.assertEqual(redacted, "old-secret REDACTED")

    def test_longer_secret_masked_whole(self) -> None:
        redactor = logs.SecretRedactor()
        redactor.set_secrets(["abc", "abcdef"])

        self.assertEqual(redactor.redact("abcdef"), "REDACTED")


class ReconfigureTest(LoggingTestCase):
    def relay_handlers(self, handler: logging.Handler) -> list[logging.Handler]:
        return [h for h in logging.getLogger().handlers if type(h) is type(handler)]

    def test_no_duplicate_handlers(self) -> None:
        self.configure()
        self.configure()
        handler = self.configure()

        self.assertEqual(self.relay_handlers(handler), [handler])
        logging.getLogger("relay.upstream").info("hello")
        self.assertEqual(len(self.output_lines()), 1)

    def test_level_change_applies(self) -> None:
        self.configure("DEBUG")
        log = logging.getLogger("relay.upstream")
        log.debug("first debug")

        self.configure("INFO")
        log.debug("second debug")
        log.info("info")

        messages = [line.rsplit(": ", 1)[1] for line in self.output_lines()]
        self.assertIn("first debug", messages)
        self.assertNotIn("second debug", messages)
        self.assertIn("info", messages)

    def test_format_change_applies(self) -> None:
        self.configure(log_format="text")
        self.configure(log_format="json")

        logging.getLogger("relay.upstream").info("hello")

        lines = self.output_lines()
        self.assertEqual(len(lines), 1)
        self.assertEqual(json.loads(lines[0])["message"], "hello")

    def test_foreign_handlers_kept(self) -> None:
        foreign = logging.NullHandler()
        logging.getLogger().addHandler(foreign)

        self.configure()
        self.configure()

        self.assertIn(foreign, logging.getLogger().handlers)

    def test_invalid_values_keep_previous_setup(self) -> None:
        handler = self.configure("INFO")

        with self.assertRaises(ValueError):
            self.configure("LOUD")
        with self.assertRaises(ValueError):
            self.configure("INFO", log_format="xml")

        self.assertEqual(self.relay_handlers(handler), [handler])
        self.assertEqual(logging.getLogger("relay").level, logging.INFO)

    def test_library_loggers_limited_to_warning(self) -> None:
        self.configure("DEBUG")

        logging.getLogger("relay.upstream").debug("relay debug")
        logging.getLogger("websocket").debug("library debug")
        logging.getLogger("websocket").info("library info")
        logging.getLogger("websocket").warning("library warning")

        output = self.stream.getvalue()
        self.assertIn("relay debug", output)
        self.assertNotIn("library debug", output)
        self.assertNotIn("library info", output)
        self.assertIn("[WARNING] websocket: library warning", output)

    def test_error_level_silences_library_warnings(self) -> None:
        self.configure("ERROR")

        logging.getLogger("websocket").warning("library warning")
        logging.getLogger("relay.upstream").warning("relay warning")
        logging.getLogger("relay.upstream").error("relay error")

        self.assertEqual(len(self.output_lines()), 1)
        self.assertIn("relay error", self.output_lines()[0])


if __name__ == "__main__":
    unittest.main()
