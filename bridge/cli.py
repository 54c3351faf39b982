"""Command line: run, generate-registration, check-config, demo (and later audit, dlp).

Exit codes: 0 ok, 1 unexpected error, 2 usage error, 3 configuration error,
4 homeserver unreachable, 5 database error, 6 data directory unusable (not a directory,
read-only, full).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bridge import __version__

if TYPE_CHECKING:
    from mautrix.errors import MatrixRequestError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_HOMESERVER = 4
EXIT_DATABASE = 5
EXIT_DATA_DIR = 6

log = logging.getLogger("bridge")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="policy-bridge",
        description="Enterprise policy bridge for Synapse (appservice + pre-send gate).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-c", "--config", type=Path, help="config file (default: config.yaml)")
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run the bridge (the default)")
    run.add_argument("-c", "--config", type=Path, dest="sub_config")

    gen = sub.add_parser(
        "generate-registration",
        help="write a registration file with fresh tokens and store them in the config",
    )
    gen.add_argument("-c", "--config", type=Path, dest="sub_config")
    gen.add_argument("-r", "--registration", type=Path, default=Path("registration.yaml"))

    chk = sub.add_parser("check-config", help="validate the config; exit 0 if usable")
    chk.add_argument("-c", "--config", type=Path, dest="sub_config")

    sub.add_parser(
        "audit", help="audit archive: verify, search, export, rotate-key, public-key (-h)"
    )
    demo = sub.add_parser("demo", help="run a throwaway Synapse with the bridge, for a try-out")
    demo.add_argument("--port", type=int, default=0, help="Synapse port (default: a free one)")
    demo.add_argument("--keep", action="store_true", help="keep the temp directory on exit")
    return p


def _config_path(args: argparse.Namespace) -> Path:
    return getattr(args, "sub_config", None) or args.config or Path("config.yaml")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["audit"]:  # audit verify|search|export|rotate-key|public-key
        from bridge.archive.cli import main as audit_main

        return audit_main(argv[1:])
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if command == "run":
        return cmd_run(_config_path(args))
    if command == "generate-registration":
        return cmd_generate_registration(_config_path(args), args.registration)
    if command == "check-config":
        return cmd_check_config(_config_path(args))
    if command == "demo":
        from bridge.dev.demo import run_demo

        return run_demo(port=args.port, keep=args.keep)
    return EXIT_USAGE


def cmd_check_config(path: Path) -> int:
    from bridge.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    print(
        f"{path}: OK (homeserver {config.homeserver.url}, bot {config.bot_mxid}, "
        f"database {config.database.backend})"
    )
    return EXIT_OK


def cmd_generate_registration(config_path: Path, registration_path: Path) -> int:
    from bridge.config import ConfigError
    from bridge.registration import generate_registration

    try:
        reg = generate_registration(config_path, registration_path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    print(
        f"wrote {registration_path} (appservice id {reg['id']}, url {reg['url']}) "
        f"and stored the tokens in {config_path}.\n"
        f"Add it to homeserver.yaml under app_service_config_files and restart Synapse."
    )
    return EXIT_OK


def cmd_run(path: Path) -> int:
    from mautrix.errors import MatrixRequestError

    from bridge.app import Bridge
    from bridge.audit.chain import SigningKeyError
    from bridge.audit.keyring import KeyringError
    from bridge.config import ConfigError, load_config
    from bridge.logs import setup_logging
    from bridge.matrix import HomeserverUnreachable
    from bridge.store import StoreError, StoreUnavailable

    try:
        config = load_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.logging.level, config.logging.format)
    problem = data_dir_problem(config.data_dir)
    if problem is not None:
        log.error("%s", problem)
        return EXIT_DATA_DIR
    bridge = Bridge(config, path)
    try:
        return asyncio.run(bridge.run())
    except (KeyringError, SigningKeyError) as e:  # the audit keys: a configuration error
        log.error("configuration error: %s", e)
        return EXIT_CONFIG
    except (StoreUnavailable, StoreError) as e:
        log.error("database error: %s", e)
        return EXIT_DATABASE
    except HomeserverUnreachable as e:
        log.error("%s", e)
        return EXIT_HOMESERVER
    except MatrixRequestError as e:  # refused during start-up (registering the bot, ...)
        return homeserver_refused(e)
    except OSError as e:
        log.error("cannot start: %s", e)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK


def homeserver_refused(e: MatrixRequestError) -> int:
    """Explain a request the homeserver refused at start; the exit code says whose fault.

    401/403 mean Synapse does not know our as_token: a configuration error (the registration
    is not loaded, or its tokens differ from the config's). Anything else is the homeserver's.
    """
    if e.http_status in (401, 403):
        log.error(
            "the homeserver refused the bridge's as_token (%s): check that Synapse loads the "
            "registration file (app_service_config_files in homeserver.yaml, then restart "
            "Synapse) and that its as_token equals appservice.as_token in the config",
            e.errcode,
        )
        return EXIT_CONFIG
    log.error("the homeserver refused a start-up request: %s %s", e.http_status, e.errcode)
    return EXIT_HOMESERVER


def data_dir_problem(data_dir: Path) -> str | None:
    """Why ``data_dir`` cannot hold the bridge's files (None if it can).

    Creates the directory if needed and writes, syncs and removes a small probe file, so a
    read-only mount, a full disk or a path under a regular file is reported at start, in
    one sentence naming the path, instead of failing later in the middle of a write.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the data directory {data_dir}: {_reason(e)}"
    probe = data_dir / f".write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return f"the data directory {data_dir} is not writable: {_reason(e)}"
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def _reason(e: OSError) -> str:
    text = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        return f"{text} (free some space or grow the volume)"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{text} (mount it writable for this user, or set data_dir elsewhere)"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{text} (a file is in the way; data_dir must be a directory)"
    return text
