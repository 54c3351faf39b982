"""``python -m bridge audit verify|search|export|rotate-key|public-key -c config.yaml``.

Exit codes as in :mod:`bridge.cli` (0 ok, 2 usage, 3 configuration, 5 database) plus
6: ``verify`` found the archive altered (the message names the first bad record), 7:
``verify`` found the chain intact but records unsigned for longer than allowed
(``audit.checkpoint_interval`` plus :data:`bridge.audit.tail.TAIL_MARGIN_S`, or
``--max-tail-age``; only a warning with ``--tail-warning-only``), and 1: an ``export``
worker process died.

No command creates the checkpoint signing key or signs a checkpoint. Only ``public-key``
(which prints its public key, where the key is) and ``verify`` without ``--public-key`` read
it. ``search``, ``export`` and ``rotate-key`` record themselves in the archive (who:
``--actor``, else the OS user); the bridge's next checkpoint covers those records.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import io
import json
import os
import sys
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bridge.archive.export import (
    FORMATS,
    OutputExists,
    PrivateOutput,
    csv_header,
    format_records,
    searches_trail,
    text_matches,
)
from bridge.archive.parallel import export_parallel, frozen_heap
from bridge.archive.setup import audit_config, load_keyring, open_store
from bridge.audit import tail
from bridge.audit.chain import (
    CHANGED,
    CIPHERTEXT_REMOVED,
    DATA_KEY_MISSING,
    ChainVerifier,
    Checkpoint,
    SigningKeyError,
    VerifyReport,
    key_fingerprint,
    load_public_key,
    load_signing_key,
    public_key_pem,
)
from bridge.audit.keyring import KeyringError
from bridge.audit.kinds import AuditKind, split_type_filter
from bridge.config import Config, ConfigError, load_config
from bridge.policy.durations import parse_instant
from bridge.store import (
    AuditEntry,
    Store,
    StoreError,
    StoreUnavailable,
    iter_chain_batches,
    load_checkpoints,
    load_removals,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_DATABASE = 5
EXIT_TAMPERED = 6
EXIT_STALE_TAIL = 7


#: Slack on top of ``audit.checkpoint_interval`` before ``verify`` calls an unsigned tail
#: too old: a signing delayed by a busy database, the clock of the verifying machine.
class _Fail(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _jobs(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of processes (1 or more)")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="policy-bridge audit", description="The audit archive.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", type=Path, default=Path("config.yaml"))

    v = sub.add_parser("verify", help="walk the hash chain and signed checkpoints")
    common(v)
    v.add_argument(
        "--public-key",
        type=Path,
        action="append",
        default=[],
        help="trusted checkpoint public key (PEM, repeatable: e.g. the old and the new key "
        "after a replacement); default: the configured signing key's",
    )
    v.add_argument(
        "--max-tail-age",
        type=float,
        metavar="SECONDS",
        help="fail (exit 7) when a record has been unsigned for longer than this "
        f"(default: audit.checkpoint_interval + {tail.TAIL_MARGIN_S:.0f}s)",
    )
    v.add_argument(
        "--tail-warning-only",
        action="store_true",
        help="report an unsigned tail older than allowed as a warning and exit 0 (e.g. "
        "verifying the copy of a bridge that crashed)",
    )
    k = sub.add_parser(
        "public-key", help="print the checkpoint signing key's public key (PEM) for verifiers"
    )
    common(k)
    k.add_argument("-o", "--output", type=Path, help="write it to this file (default: stdout)")

    def filters(sp: argparse.ArgumentParser) -> None:
        common(sp)
        sp.add_argument("--room", help="room ID (exact)")
        sp.add_argument("--sender", help="sender user ID (exact)")
        sp.add_argument("--type", dest="type", help="event type or record kind (exact)")
        sp.add_argument("--since", help="ISO time, inclusive (event origin time)")
        sp.add_argument("--until", help="ISO time, exclusive")
        sp.add_argument("--text", help="words that must all appear (case-insensitive)")

    s = sub.add_parser("search", help="print matching records, decrypted")
    filters(s)
    s.add_argument("--limit", type=int, default=100, help="at most this many (0 = all)")
    s.add_argument("--json", action="store_true", help="one full JSON object per record")
    s.add_argument("--actor", help="who searches (default: the OS user)")

    e = sub.add_parser("export", help="export matching records (streaming), audited")
    filters(e)
    e.add_argument("--format", choices=FORMATS, default="jsonl")
    e.add_argument("-o", "--output", required=True, help="output file ('-' = stdout)")
    e.add_argument(
        "--force",
        action="store_true",
        help="replace the output file if it exists (it is written anew with mode 0600)",
    )
    e.add_argument(
        "--jobs",
        type=_jobs,
        help="worker processes that decrypt and format (1 = none, all in this process; "
        f"default: 2 when writing to a file, at least {PARALLEL_FROM:,} records match and "
        f"{SPARE_CPUS_FOR_WORKERS} CPUs are free, else 1)",
    )
    e.add_argument("--actor", help="who exports (default: the OS user)")

    r = sub.add_parser("rotate-key", help="add a new KEK and re-wrap every data key under it")
    common(r)
    r.add_argument(
        "--remove-old",
        action="store_true",
        help="afterwards remove the older KEKs (refused while any data key still uses one)",
    )
    r.add_argument("--actor", help="who rotates (default: the OS user)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``audit`` command group; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) and EXIT_USAGE
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EXIT_CONFIG
    handler = {
        "verify": cmd_verify,
        "search": cmd_search,
        "export": cmd_export,
        "rotate-key": cmd_rotate_key,
        "public-key": cmd_public_key,
    }[args.command]
    try:
        return asyncio.run(handler(config, args))
    except _Fail as e:
        print(str(e), file=sys.stderr)
        return e.code
    except (KeyringError, SigningKeyError) as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (StoreError, StoreUnavailable, SQLAlchemyError, OSError) as e:
        print(f"database error: {e}", file=sys.stderr)
        return EXIT_DATABASE


# -- verify ----------------------------------------------------------------------------


def _engine(config: Config) -> AsyncEngine:
    url = config.database.url
    if url.startswith("sqlite"):
        db = url.split(":///", 1)[-1]
        if db and db != ":memory:" and not Path(db).exists():
            raise _Fail(EXIT_DATABASE, f"database error: the SQLite database {db} does not exist")
    return create_async_engine(url, hide_parameters=True)  # errors never quote values


def read_checkpoint_log(path: Path) -> list[Checkpoint]:
    """Checkpoints appended to the log file outside the database (missing file = none)."""
    out = []
    try:
        fh = path.open(encoding="utf-8")
    except FileNotFoundError:
        return []
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(Checkpoint.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise _Fail(
                    EXIT_TAMPERED, f"checkpoint log {path} line {n} is malformed ({e})"
                ) from None
    return out


def _merge_checkpoints(*sources: list[Checkpoint]) -> list[Checkpoint]:
    seen: dict[tuple[int, bytes], Checkpoint] = {}
    for cps in sources:
        for cp in cps:
            seen.setdefault((cp.seq, cp.signature), cp)
    return sorted(seen.values(), key=lambda c: c.seq)


_REMOVAL_PROBLEMS = (CIPHERTEXT_REMOVED, DATA_KEY_MISSING, CHANGED)


async def verify_store(
    engine: AsyncEngine, public_keys: list[Ed25519PublicKey], checkpoint_log: Path | None
) -> VerifyReport:
    """Stream the chain from the database and check it against every known checkpoint,
    and every removed ciphertext and data key against the removal records (no keys)."""
    for attempt in (0, 1):
        # removal records first: the checkpoint over each one is committed with it, so the
        # checkpoints read next include it
        removals = await load_removals(engine)
        cps = _merge_checkpoints(
            await load_checkpoints(engine),
            read_checkpoint_log(checkpoint_log) if checkpoint_log else [],
        )
        verifier = ChainVerifier(public_keys, cps, removals=removals)
        if not verifier.done:
            feed_rows = verifier.feed_rows
            # aclosing: stopping early must also stop the read-ahead query, before the
            # engine is disposed (not later, when the generator is collected).
            async with contextlib.aclosing(iter_chain_batches(engine)) as batches:
                async for rows in batches:
                    if not feed_rows(rows):
                        break
        report = verifier.finish()
        if report.ok or report.problem_kind not in _REMOVAL_PROBLEMS or attempt:
            return report
        # a running bridge may have expired or shredded since: then verify once more
        if await load_removals(engine) == removals:
            return report
    raise AssertionError("unreachable")


async def cmd_verify(config: Config, args: argparse.Namespace) -> int:
    cfg = audit_config(config)
    if args.public_key:
        keys = [load_public_key(p.read_bytes()) for p in args.public_key]
    else:
        try:
            keys = [load_signing_key(cfg.signing_key).public_key()]
            keys += [load_public_key(p.read_bytes()) for p in cfg.previous_public_keys]
        except SigningKeyError as e:
            raise _Fail(
                EXIT_CONFIG,
                f"configuration error: {e}. Where the private key is not available, give "
                f"the public key: --public-key FILE (print it with `audit public-key` where "
                f"the key is)",
            ) from None
    engine = _engine(config)
    try:
        report = await verify_store(engine, keys, cfg.checkpoint_log)
    finally:
        await engine.dispose()
    if report.ok:
        now = tail.now_ms()
        print(str(report))
        print(tail.signed_head_line(report, now))
        limit = args.max_tail_age
        if limit is None:
            limit = cfg.checkpoint_interval_s + tail.TAIL_MARGIN_S
        problem = tail.stale_tail_problem(report, now, limit)
        if problem is None:
            return EXIT_OK
        print(f"{'warning' if args.tail_warning_only else 'error'}: {problem}", file=sys.stderr)
        return EXIT_OK if args.tail_warning_only else EXIT_STALE_TAIL
    print(str(report), file=sys.stderr)
    print(
        f"first bad record: seq {report.first_bad_seq} "
        f"({report.records_checked} records verified before it)",
        file=sys.stderr,
    )
    return EXIT_TAMPERED


# -- search and export -----------------------------------------------------------------


def _ms(value: str | None, flag: str) -> int | None:
    if not value:
        return None
    try:
        return parse_instant(value)
    except ValueError:
        raise _Fail(EXIT_USAGE, f"{flag}: {value!r} is not an ISO date/time") from None


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "room": args.room,
        "sender": args.sender,
        "type": args.type,
        "since": args.since,
        "until": args.until,
        "text": args.text,
    }


async def _open_for_reading(config: Config) -> Store:
    keyring, _ = load_keyring(audit_config(config))
    if keyring is None:
        raise _Fail(
            EXIT_CONFIG,
            f"configuration error: the audit keyring {audit_config(config).keyring} does not "
            f"exist and BRIDGE_AUDIT_KEYRING is not set",
        )
    return await open_store(config, create=False)


def _query(args: argparse.Namespace) -> dict[str, Any]:
    """The filters as arguments of ``RecordReader.iter_batches`` (all but ``--text``)."""
    # --type matches the event type of events, and the kind of other records
    kind_filter, type_filter = split_type_filter(args.type)
    return {
        "kind": kind_filter,
        "room": args.room,
        "sender": args.sender,
        "type": type_filter,
        "since": _ms(args.since, "--since"),
        "until": _ms(args.until, "--until"),
    }


def _words(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(w.casefold() for w in (args.text or "").split())


async def _match_batches(
    store: Store, args: argparse.Namespace, *, raw_json: bool = False
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Matching records, decrypted, in batches (one await per batch, not per record)."""
    words = _words(args)
    query = _query(args)
    trail = searches_trail(query["kind"])
    batches = store.reader.iter_batches(**query, raw_json=raw_json)
    async with contextlib.aclosing(batches):
        async for recs in batches:
            recs = text_matches(recs, words, trail=trail)
            if recs:
                yield recs


async def _matches(store: Store, args: argparse.Namespace) -> AsyncGenerator[dict[str, Any], None]:
    async with contextlib.aclosing(_match_batches(store, args)) as batches:
        async for recs in batches:
            for rec in recs:
                yield rec


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _line(rec: dict[str, Any]) -> str:
    data = rec["data"]
    if data is None:
        what = f"<{rec.get('unreadable', 'unreadable')}>"
    elif rec["kind"] == AuditKind.EVENT:
        content = data.get("content")
        body = content.get("body") if isinstance(content, dict) else None
        what = body if isinstance(body, str) else json.dumps(content, ensure_ascii=False)
    else:
        what = json.dumps(data, ensure_ascii=False)
    if len(what) > 300:
        what = what[:300] + "…"
    parts = [f"#{rec['seq']}", _iso(rec["origin_ts"]), rec["kind"]]
    parts += [x for x in (rec["room_id"], rec["sender"], rec["type"]) if x]
    return " ".join(parts) + ": " + what


async def cmd_search(config: Config, args: argparse.Namespace) -> int:
    store = await _open_for_reading(config)
    n = 0
    try:
        async with contextlib.aclosing(_matches(store, args)) as matches:
            async for rec in matches:
                print(json.dumps(rec, ensure_ascii=False) if args.json else _line(rec))
                n += 1
                if args.limit and n >= args.limit:
                    print(f"(stopped at --limit {args.limit})", file=sys.stderr)
                    break
        actor = args.actor or getpass.getuser()
        await store.records.append(
            [
                AuditEntry(
                    AuditKind.COMMAND,
                    {
                        "command": "audit search",
                        "via": "cli",
                        "actor": actor,
                        "filters": {k: v for k, v in _filters(args).items() if v},
                        "limit": args.limit,
                        "count": n,
                    },
                    sender=actor,
                    type="audit search",
                )
            ]
        )
    finally:
        await store.close()
    print(f"{n} matching records (search recorded in the audit store)", file=sys.stderr)
    return EXIT_OK


#: From how many matching records ``export`` uses worker processes by default (below, the
#: pool's start-up, ≈ 0.2 s of CPU, is not worth it).
PARALLEL_FROM = 50_000
#: How many CPUs must be free for ``export`` to use worker processes by default. The workers
#: cost ≈ 12 % more CPU time in all (moving rows and output between processes): on a machine
#: whose other work leaves this export about one CPU, one process is faster.
SPARE_CPUS_FOR_WORKERS = 1.4


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


_CpuClock = tuple[float, float, float]


def _cpu_clock() -> _CpuClock | None:
    """(now, idle CPU seconds of the machine, CPU seconds of this process); None without
    /proc/stat."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait …, in ticks
        idle = (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.monotonic(), idle, time.process_time()


async def _spare_cpus(since: _CpuClock | None) -> float | None:
    """How many CPUs this process could have used since ``since``: the idle ones and its
    own use (over at least 0.1 s); None where unknown."""
    if since is None:
        return None
    wait = 0.1 - (time.monotonic() - since[0])
    if wait > 0:
        await asyncio.sleep(wait)
    now = _cpu_clock()
    if now is None:
        return None
    return (now[1] - since[1] + now[2] - since[2]) / (now[0] - since[0])


async def _export_jobs(
    store: Store, args: argparse.Namespace, to_stdout: bool, since: _CpuClock | None
) -> int:
    """``--jobs``, or by default: 2 worker processes (1 = none) where they pay off: 2 CPUs
    or more, at least :data:`SPARE_CPUS_FOR_WORKERS` of them free since the command
    started, output to a file, and at least :data:`PARALLEL_FROM` records matching."""
    if args.jobs is not None:
        return int(args.jobs)
    cpus = _cpus()
    if cpus < 2 or to_stdout:
        return 1
    if await store.reader.count(**_query(args), at_most=PARALLEL_FROM) < PARALLEL_FROM:
        return 1
    spare = await _spare_cpus(since)
    if spare is not None and min(spare, cpus) < SPARE_CPUS_FOR_WORKERS:
        return 1
    return min(2, cpus)


async def _export_in_process(
    store: Store, args: argparse.Namespace, write: Callable[[bytes], object]
) -> int:
    n = 0
    fmt = args.format
    async with contextlib.aclosing(_match_batches(store, args, raw_json=fmt == "jsonl")) as it:
        async for recs in it:
            write(format_records(recs, fmt))
            n += len(recs)
    return n


class _TextOut(io.RawIOBase):
    """Bytes written to a text stream without a binary buffer (a replaced ``sys.stdout``)."""

    def __init__(self, text: IO[str]) -> None:
        self._text = text

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._text.write(bytes(b).decode("utf-8"))
        return len(b)

    def flush(self) -> None:
        self._text.flush()


async def cmd_export(config: Config, args: argparse.Namespace) -> int:
    since = _cpu_clock()  # how busy the machine is, measured while the store opens
    store = await _open_for_reading(config)
    to_stdout = args.output == "-"
    n = 0
    out: IO[bytes] | _TextOut
    private: PrivateOutput | None = None
    if to_stdout:
        sys.stdout.flush()
        out = getattr(sys.stdout, "buffer", None) or _TextOut(sys.stdout)
    else:
        try:
            private = PrivateOutput(Path(args.output), replace=args.force)
        except OutputExists as e:
            await store.close()
            raise _Fail(EXIT_USAGE, str(e)) from None
        except OSError:
            await store.close()
            raise
        out = private.file
    try:
        jobs = await _export_jobs(store, args, to_stdout, since)
        if args.format == "csv":
            out.write(csv_header())
        with frozen_heap():
            if jobs > 1:
                try:
                    n = await export_parallel(
                        store, _query(args), args.format, _words(args), out.write, jobs=jobs
                    )
                except BrokenProcessPool as e:
                    raise _Fail(EXIT_ERROR, f"export failed: a worker process died ({e})") from None
            else:
                n = await _export_in_process(store, args, out.write)
        out.flush()
        if private is not None:
            private.commit()  # the file is in place before the record says so
        actor = args.actor or getpass.getuser()
        await store.records.append(
            [
                AuditEntry(
                    AuditKind.EXPORT,
                    {
                        "actor": actor,
                        "filters": {k: v for k, v in _filters(args).items() if v},
                        "format": args.format,
                        "output": args.output,
                        "count": n,
                    },
                    sender=actor,
                    type="export",
                )
            ]
        )
    except BaseException:
        if private is not None:
            private.discard()
        raise
    finally:
        await store.close()
    print(f"exported {n} records to {args.output} (recorded in the audit store)", file=sys.stderr)
    return EXIT_OK


# -- rotate-key ------------------------------------------------------------------------


async def cmd_rotate_key(config: Config, args: argparse.Namespace) -> int:
    cfg = audit_config(config)
    keyring, path = load_keyring(cfg)
    if keyring is None:
        raise _Fail(
            EXIT_CONFIG, f"configuration error: the audit keyring {cfg.keyring} does not exist"
        )
    if path is None:
        raise _Fail(
            EXIT_CONFIG,
            "configuration error: the keyring comes from BRIDGE_AUDIT_KEYRING; rotate-key "
            "writes the keyring file: unset the variable, rotate, then put the new file's "
            "content back into the variable",
        )
    store = await open_store(config, create=False)
    keyring = store.keyring  # the one the store unlocked with: the new KEK must reach it
    assert keyring is not None
    actor = args.actor or getpass.getuser()
    done: dict[str, Any] = {}
    try:
        old = keyring.kek_ids
        new = keyring.add_kek()
        keyring.save(path)  # first: a crash now leaves a keyring that still has the old KEKs
        done.update(new_kek=new.id, old_keks=old)
        changed = await store.keys.rewrap()
        done.update(rewrapped=changed, removed_old=False)
        print(f"added KEK {new.id}; re-wrapped {changed} data keys under it")
        if args.remove_old:
            usage = await store.keys.kek_usage()
            still = {k: n for k, n in usage.items() if k != new.id}
            if still:
                done["not_removed"] = f"data keys still use {still}"
                raise _Fail(
                    EXIT_DATABASE,
                    f"not removing old KEKs: data keys still use {still} (is a bridge running "
                    f"with the old keyring? stop it and run rotate-key again)",
                )
            for kid in old:
                keyring.remove_kek(kid)
            keyring.save(path)
            done["removed_old"] = True
            print(f"removed old KEK(s): {', '.join(old)}")
        else:
            print(
                f"old KEK(s) {', '.join(old)} kept; remove them with rotate-key --remove-old "
                f"once backups of the new keyring exist"
            )
        print(f"BACK UP the keyring file {path} now. Restart the bridge to use the new KEK.")
    finally:
        try:
            if done:  # the keyring changed: record it, even when a later step failed
                await store.records.append(
                    [
                        AuditEntry(
                            AuditKind.COMMAND,
                            {"command": "audit rotate-key", "via": "cli", "actor": actor, **done},
                            sender=actor,
                            type="audit rotate-key",
                        )
                    ]
                )
        finally:
            await store.close()
    return EXIT_OK


# -- public-key ------------------------------------------------------------------------


async def cmd_public_key(config: Config, args: argparse.Namespace) -> int:
    cfg = audit_config(config)
    key = load_signing_key(cfg.signing_key)  # read only: never creates a key
    pem = public_key_pem(key).decode("ascii")
    if args.output:
        args.output.write_text(pem, encoding="ascii")
    else:
        sys.stdout.write(pem)
    print(
        f"checkpoint signing key {key_fingerprint(key.public_key())} (the key_id of its "
        f"checkpoints){f': written to {args.output}' if args.output else ''}",
        file=sys.stderr,
    )
    return EXIT_OK
