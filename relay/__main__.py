"""Command line: ``python -m relay -c relay.conf`` (also installed as ``bptf-relay``)."""

from __future__ import annotations

import signal
import threading

# Install the stop handlers before the heavier imports below, so a SIGTERM
# that arrives while the process is still starting ends it with status 0.
STOP_REQUESTED = threading.Event()
RECEIVED_SIGNALS: list[int] = []


def _on_stop_signal(signum: int, frame: object) -> None:
    RECEIVED_SIGNALS.append(signum)
    STOP_REQUESTED.set()


# SIGHUP (systemctl reload) must not end the process, which is Python's
# default; the relay re-reads its configuration instead.
RELOAD_REQUESTED = threading.Event()


def _on_reload_signal(signum: int, frame: object) -> None:
    RELOAD_REQUESTED.set()


signal.signal(signal.SIGTERM, _on_stop_signal)
signal.signal(signal.SIGINT, _on_stop_signal)
signal.signal(signal.SIGHUP, _on_reload_signal)

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from typing import Sequence  # noqa: E402

from . import __version__  # noqa: E402
from .config import COMMAND_LINE_FLAGS, EX_CONFIG, ConfigError, describe, load_settings  # noqa: E402
from .logs import configure_logging, set_secrets  # noqa: E402
from .service import Relay, StartupError  # noqa: E402

logger = logging.getLogger("relay.main")

# argparse destination (such as "upstream_url") -> (section, key).
FLAGS = {flag[2:].replace("-", "_"): name for name, flag in COMMAND_LINE_FLAGS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bptf-relay",
        description=(
            "Hold the one allowed websocket connection to the Backpack.tf events feed "
            "and relay every frame to local clients at ws://HOST:PORT/relay."
        ),
        epilog=(
            "Precedence: command-line flag > environment (PORT, BACKPACK_WS_URL, "
            "LOG_LEVEL) > configuration file > default. Exit status 78 means an "
            "invalid configuration."
        ),
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="INI configuration file (see relay.conf.example)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", help="TCP port to listen on (default 3001)")
    parser.add_argument("--upstream-url", metavar="URL", help="events feed URL (default wss://ws.backpack.tf/events)")
    parser.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING (or WARN) or ERROR")
    parser.add_argument("--log-format", metavar="FORMAT", help="text or json")
    parser.add_argument(
        "--check", action="store_true", help="validate the configuration, print the effective settings and exit"
    )
    parser.add_argument("--version", action="version", version=f"bptf-relay {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {name: getattr(args, flag) for flag, name in FLAGS.items() if getattr(args, flag) is not None}
    try:
        settings = load_settings(args.config, overrides=overrides)
    except ConfigError as error:
        print(f"bptf-relay: invalid configuration: {error}", file=sys.stderr)
        return EX_CONFIG
    if args.check:
        print(describe(settings))
        print("configuration OK", file=sys.stderr)
        return 0

    set_secrets([settings.security_token])
    configure_logging(settings.logging_level, settings.logging_format)

    def reload_settings() -> object:
        return load_settings(args.config, overrides=overrides)

    relay = Relay(settings, stop_event=STOP_REQUESTED, load_settings=reload_settings)
    relay.reload_requested = RELOAD_REQUESTED
    relay.received_signals = RECEIVED_SIGNALS
    try:
        relay.start()
    except StartupError as error:
        logger.error("%s", error)
        return 1
    relay.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
