"""``audit export`` through worker processes: the same bytes, errors and audit record as the
in-process export, on real SQLite and PostgreSQL stores.

The store holds events (commas, quotes, line breaks, emoji and floats in them), audit records
of several kinds, records whose ciphertext expired, and the records of a room whose data key
was destroyed. Both paths are compared with each other and with an oracle: the formatting
of the export before it had workers (csv.writer, the JSON line built as text).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.archive import cli
from bridge.archive.export import CSV_COLUMNS, _csv_cell, format_csv, json_text
from bridge.archive.parallel import export_parallel
from bridge.audit.kinds import AuditKind
from bridge.store import AuditEntry, Store, StoreError
from bridge.store.models import now_ms
from tests.kit.store import destroy_room_key
from tests.unit.store.test_audit_store import Env, attack, env, fill  # noqa: F401

SECRET = "Osprey ledger 4417-KILO"  # a body that must never land in a stray file

BODIES = [
    f"{SECRET}, with a comma",
    'she said "ship it", twice',
    "line one\nline two\r\nline three\r",
    "über café 会議 🎉 party",
    "",
    "Quarterly NUMBERS attached",
    "tab\there and a backslash \\ too",
]


def event(i: int, room: str, sender: str, body: str, **content: Any) -> dict[str, Any]:
    return {
        "event_id": f"$x{i}",
        "room_id": room,
        "sender": sender,
        "type": "m.room.message",
        "origin_server_ts": 1_700_000_000_000 + i * 1000,
        "content": {"msgtype": "m.text", "body": body, **content},
    }


async def build(target: Env) -> None:
    """Events, audit records of several kinds, expired records and a shredded room."""
    store = await target.open()
    try:
        await store.queue.ingest(
            "early",
            [
                event(1, "!old:x", "@alice:x", 'early news, "quoted"'),
                event(2, "!mix:x", "@bob:x", "early mix 🎉"),
                event(3, "!old:x", "@bob:x", "early again"),
            ],
        )
        await store.records.append(
            [
                AuditEntry(
                    "decision",
                    {"rule": "dlp", "score": 0.25, "hits": [1, 2.5e-07, None, True, 1e16]},
                    room_id="!old:x",
                    sender="@alice:x",
                    type="m.room.message",
                )
            ]
        )
        await asyncio.sleep(0.02)
        boundary = now_ms()
        await asyncio.sleep(0.02)
        rooms = ["!a:x", "!b:x", "!mix:x", "!gone:x"]
        senders = ["@alice:x", "@bob:x", "@carol:x"]
        evs = [
            event(10 + i, rooms[i % 4], senders[i % 3], BODIES[i % len(BODIES)], n=i * 0.1)
            for i in range(40)
        ]
        evs.append(event(60, "!a:x", "@alice:x", "formatted", formatted_body="<b>x</b>, y"))
        await store.queue.ingest("late", evs)
        await store.records.append(
            [
                AuditEntry("gate", {"verdict": "allow", "why": 'a "quote", a comma'}, "!a:x"),
                AuditEntry("action", {"redact": "$x11", "ok": False}, "!b:x", "@bot:x"),
                AuditEntry("command", {"command": "!policy rooms", "args": ["--all"]}),
                AuditEntry("config", {"layers": {"dlp": {"enabled": True}}, "n": 3}),
                AuditEntry("error", {"message": "über: line\nbreak"}, type="boom"),
            ]
        )
        # the early records expire: !old:x entirely (its key is shredded), !mix:x's first
        report = await store.expiry.expire(1000, now=boundary + 1000)
        assert report.expired == 4 and report.rooms_shredded == 1
        assert await destroy_room_key(store, "!gone:x")
        assert await store.holds.set("room", "!b:x", True, by="@admin:x", reason="case 7") == "on"
    finally:
        await store.close()


# -- the oracle: the export's formatting before it had workers ---------------------------------


def oracle(recs: list[dict[str, Any]], fmt: str, text: str | None) -> tuple[bytes, int]:
    """The export's output and record count, as the export wrote them before workers."""
    words = [w.casefold() for w in (text or "").split()]
    if words:
        recs = [
            r
            for r in recs
            if r["data"] is not None
            and r["kind"] not in ("login", "access", "export")  # the search trail
            and all(w in json.dumps(r["data"], ensure_ascii=False).casefold() for w in words)
        ]
    if fmt == "csv":
        buf = io.StringIO(newline="")
        writer = csv.writer(buf)
        writer.writerow(CSV_COLUMNS)
        for rec in recs:
            row = [rec.get(c) for c in CSV_COLUMNS]
            row[-1] = json.dumps(rec["data"], ensure_ascii=False)
            writer.writerow(["" if v is None else v for v in row])
        return buf.getvalue().encode("utf-8"), len(recs)
    lines = []
    for rec in recs:
        raw = rec.pop("json", None)
        if raw is None:
            lines.append(json.dumps(rec, ensure_ascii=False))
        else:
            lines.append(
                f'{{"seq": {rec["seq"]:d}, "ts": {rec["ts"]:d}, '
                f'"kind": {json.dumps(rec["kind"], ensure_ascii=False)}, '
                + ", ".join(
                    f'"{k}": {json.dumps(rec[k], ensure_ascii=False)}'
                    for k in ("event_id", "room_id", "sender", "type")
                )
                + f', "origin_ts": {rec["origin_ts"]:d}, "data": {raw.decode("utf-8")}}}'
            )
    return "\n".join([*lines, ""]).encode("utf-8"), len(recs)


def export_args(*argv: str) -> Any:
    return cli._parser().parse_args(["export", "-c", "unused.yaml", "-o", "unused", *argv])


async def expected(target: Env, args: Any) -> tuple[bytes, int]:
    store = await target.open()
    try:
        recs = [r async for r in store.reader.iter(**cli._query(args), raw_json=True)]
    finally:
        await store.close()
    if args.format == "csv":
        for r in recs:
            r.pop("json", None)
    return oracle(recs, args.format, args.text)


FILTERS = [
    (),
    ("--room", "!a:x"),
    ("--room", "!gone:x"),
    ("--room", "!old:x", "--type", "shred"),
    ("--sender", "@bob:x", "--since", "2023-11-14T22:13:40Z", "--until", "2023-11-14T22:13:50Z"),
    ("--type", "decision"),
    ("--type", "m.room.message", "--text", "QUOTE"),
    ("--text", "🎉 CAFÉ"),
]


@pytest.fixture
async def rich(env: Env) -> AsyncIterator[Env]:  # noqa: F811
    await build(env)
    yield env


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_parallel_and_in_process_write_the_same_bytes(rich: Env, fmt: str) -> None:
    """Every filter, both formats: the workers' output is the in-process output, byte for
    byte, and both are the oracle's (the export before workers), in many small tasks."""
    store: Store = await rich.open()
    try:
        for argv in FILTERS:
            args = export_args("--format", fmt, *argv)
            inproc: list[bytes] = []
            n1 = await cli._export_in_process(store, args, inproc.append)
            par: list[bytes] = []
            n2 = await export_parallel(
                store,
                cli._query(args),
                fmt,
                cli._words(args),
                par.append,
                jobs=2,
                batch=7,  # several database pages ...
                task_rows=3,  # ... and more tasks than workers, in flight at once
            )
            want, count = await expected(rich, args)
            if fmt == "csv":  # the CLI writes the header first
                want = want[len(cli.csv_header()) :]
            assert b"".join(par) == b"".join(inproc) == want, argv
            assert n1 == n2 == count, argv
    finally:
        await store.close()


async def test_the_store_has_what_the_comparison_needs(rich: Env) -> None:
    store = await rich.open()
    try:
        recs = [r async for r in store.reader.iter()]
    finally:
        await store.close()
    kinds = {r["kind"] for r in recs}
    assert {"event", "decision", "gate", "action", "command", "config", "error"} <= kinds
    assert {"expiry", "shred", "retention", "hold"} <= kinds
    unreadable = [r["unreadable"] for r in recs if r["data"] is None]
    assert any("expired" in u for u in unreadable)
    assert any("destroyed" in u for u in unreadable)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_cli_with_workers_writes_the_oracle_and_records_the_export(
    rich: Env, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    counts = []
    for i, argv in enumerate([(), ("--room", "!a:x", "--text", "COMMA")]):
        args = export_args("--format", fmt, *argv)
        want, n = await expected(rich, args)
        out = rich.tmp / f"out{i}.{fmt}"
        rc = await rich.cli("export", "--jobs", "2", "--format", fmt, "-o", str(out), *argv)
        assert rc == 0, capsys.readouterr().err
        assert out.read_bytes() == want
        assert f"exported {n} records" in capsys.readouterr().err
        counts.append(n)
    store = await rich.open()
    try:
        exports = [r["data"] async for r in store.reader.iter(kind="export")]
    finally:
        await store.close()
    assert [e["format"] for e in exports] == [fmt, fmt]
    assert exports[1]["filters"] == {"room": "!a:x", "text": "COMMA"}
    assert [e["count"] for e in exports] == counts and counts[1] == 3
    assert await rich.cli("verify") == 0


@pytest.mark.parametrize("name", ["ciphertext byte", "data key deleted"])
async def test_a_bad_record_fails_the_parallel_export_as_the_in_process_one(
    env: Env,  # noqa: F811
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await fill(env)
    await attack(env, name)
    outcomes = []
    for jobs in ("1", "2"):
        out = env.tmp / f"out-{jobs}.jsonl"
        capsys.readouterr()
        rc = await env.cli("export", "--jobs", jobs, "-o", str(out))
        outcomes.append((rc, capsys.readouterr().err, out.read_bytes()))
    assert outcomes[0] == outcomes[1]
    rc, err, _ = outcomes[0]
    seq = 12 if name == "ciphertext byte" else 2
    assert rc == 5 and err.startswith(f"database error: audit record seq {seq}: "), err
    assert "cannot decrypt" in err if seq == 12 else "is not in the store" in err
    # a failed export records nothing
    assert await env.scalar("SELECT count(*) FROM records WHERE kind = 'export'") == 0
    # in small tasks too: the tasks before the bad one are done, but their page is not
    # written, as in-process (pages of 2,000 rows)
    store = await env.open()
    try:
        written: list[bytes] = []
        with pytest.raises(StoreError, match=f"^audit record seq {seq}: "):
            await export_parallel(store, {}, "jsonl", (), written.append, jobs=2, task_rows=3)
        assert written == []
    finally:
        await store.close()


def _new_files(roots: list[Path], before: set[Path]) -> list[Path]:
    out = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = Path(dirpath) / name
                if p not in before:
                    out.append(p)
    return out


def _files(roots: list[Path]) -> set[Path]:
    return {Path(d) / n for root in roots for d, _, names in os.walk(root) for n in names}


def _worker_processes() -> list[str]:
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "multiprocessing.spawn" in cmd:
                found.append(cmd)
    return found


async def test_workers_leave_no_files_and_no_processes(
    rich: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    store = await rich.open()
    try:
        keys = [dk.key async for dk in _loaded_keys(store)]
    finally:
        await store.close()
    assert keys
    roots = [Path(tempfile.gettempdir()), Path("/dev/shm"), rich.tmp]
    before = _files(roots)
    here = set(os.listdir())  # the working directory, not walked (the repository)
    out = rich.tmp / "out.jsonl"
    assert await rich.cli("export", "--jobs", "2", "-o", str(out)) == 0
    assert set(os.listdir()) == here
    assert SECRET.encode() in out.read_bytes()
    new = [p for p in _new_files(roots, before) if p != out]
    for p in new:
        try:
            blob = p.read_bytes()
        except OSError:
            continue
        assert SECRET.encode() not in blob, p
        assert not any(k in blob for k in keys), p
    # besides the output, at most the database's own files changed under tmp
    assert all(p.parent != rich.tmp or p.name.startswith("bridge.db") for p in new), new
    assert _worker_processes() == []


async def _loaded_keys(store: Store) -> AsyncIterator[Any]:
    async for recs in store.reader.iter_sealed_batches():
        material, _ = store.keys.key_material(r[5] for r in recs)
        for key_id, _scope, _key in material:
            yield store.keys.by_id[key_id]


async def test_jobs_default_uses_workers_for_large_exports_to_a_file_on_a_free_machine(
    env: Env,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await fill(env)
    calls: list[int] = []
    real = cli.export_parallel

    async def spy(*a: Any, **kw: Any) -> int:
        calls.append(kw["jobs"])
        return await real(*a, **kw)

    spare = [2.0]

    async def spare_cpus(since: Any) -> float:
        assert since is not None  # measured from the start of the command
        return spare[0]

    monkeypatch.setattr(cli, "export_parallel", spy)
    monkeypatch.setattr(cli, "_cpus", lambda: 4)
    monkeypatch.setattr(cli, "_spare_cpus", spare_cpus)
    monkeypatch.setattr(cli, "PARALLEL_FROM", 20)
    out = env.tmp / "o.jsonl"
    assert await env.cli("export", "-o", str(out)) == 0
    assert calls == [2]  # min(2, CPUs)
    spare[0] = 1.2  # the machine is busy: one process is faster
    assert await env.cli("export", "--force", "-o", str(out)) == 0
    assert calls == [2]
    spare[0] = 2.0
    assert await env.cli("export", "--force", "--room", "!room0:x", "-o", str(out)) == 0
    assert calls == [2]  # 10 records match: in this process
    capsys.readouterr()
    assert await env.cli("export", "-o", "-") == 0  # stdout: in this process
    assert calls == [2]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 33 and json.loads(lines[0])["seq"] == 1
    assert await env.cli("export", "--jobs", "3", "-o", "-") == 0
    assert calls == [2, 3]
    more = capsys.readouterr().out.splitlines()
    assert more[:33] == lines and json.loads(more[33])["kind"] == "export"
    monkeypatch.setattr(cli, "_cpus", lambda: 1)
    assert await env.cli("export", "--force", "-o", str(out)) == 0
    assert calls == [2, 3]
    assert await env.cli("export", "--jobs", "0", "-o", str(out)) == 2


async def test_spare_cpus_counts_idle_cpus_and_its_own_use() -> None:
    since = cli._cpu_clock()
    assert since is not None  # Linux
    spare = await cli._spare_cpus(since)  # waits 0.1 s
    assert spare is not None and 0 <= spare <= os.cpu_count() + 0.5  # type: ignore[operator]


def test_csv_cells_are_what_the_csv_module_writes() -> None:
    values: list[Any] = [
        None, "", " ", "a", "a,b", 'a"b', '"', '""', "a\nb", "a\rb", "\r\n", ",", "a\x00b",
        "tab\there", "über 🎉", 0, -1, 10**30, 0.1, 1e16, 2.5e-07, float("nan"), True, False,
        [1, "x"], {"k": "v, w"}, ("t", 1),
    ]  # fmt: skip
    values += [chr(c) for c in range(0x80)] + ["\u2028", "\x85", "\ufeff"]
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    for v in values:
        buf.seek(0)
        buf.truncate()
        writer.writerow(["x", v, "y"])
        assert buf.getvalue() == f"x,{_csv_cell(v)},y\r\n", repr(v)
    rec = dict.fromkeys(CSV_COLUMNS, 'q"')
    rec["data"] = {"a": [1, "b,c"]}
    buf.seek(0)
    buf.truncate()
    writer.writerow([*['q"'] * 8, json.dumps(rec["data"], ensure_ascii=False)])
    assert format_csv([rec]) == buf.getvalue().encode()
    # text the output encoding refuses fails the same way (a lone surrogate)
    with pytest.raises(UnicodeEncodeError):
        format_csv([{**rec, "sender": "\ud800"}])


def test_json_text_is_json_dumps() -> None:
    """The export's reused JSON encoder writes what json.dumps(…, ensure_ascii=False) does."""
    values: list[Any] = [
        None, True, False, 0, -1, 10**40, 0.1, 1e16, 2.5e-07, -0.0, float("nan"),
        float("inf"), -float("inf"), "", "x", "über 🎉 会議", "\ud800", '\x00\x1f"\\/\u2028',
        [], {}, [1, [2, {"a": None}]], {"k": "v", "n": {"x": [1.5, "é"]}}, {"\udfff": 1},
        {1: "int key", "b": True},
    ]  # fmt: skip
    for v in values:
        assert json_text(v) == json.dumps(v, ensure_ascii=False), repr(v)
    for v in values:  # and again: nothing carried over from one call to the next
        assert json_text(v) == json.dumps(v, ensure_ascii=False), repr(v)


def test_a_worker_loads_neither_sqlalchemy_nor_the_store() -> None:
    """A worker's memory counts: it imports decoding, crypto and two small store modules."""
    code = (
        "import sys\n"
        "from bridge.archive import export\n"
        "export.init_worker()\n"
        "heavy = [m for m in ('sqlalchemy', 'asyncio', 'bridge.store.store', 'aiosqlite')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
    # decoding imported first does not trip over the store's own import of it
    out = subprocess.run(
        [sys.executable, "-c", "import bridge.audit.decode, bridge.store; print('ok')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "ok"


@pytest.mark.parametrize("jobs", ["1", "2"])
async def test_word_searches_leave_out_the_search_trail(
    env: Env,  # noqa: F811
    jobs: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Records of who searched or exported what hold the searched words: a word search
    would find its own earlier searches. They are found only when asked for by type."""
    store = await env.open()
    try:
        await store.records.append(
            [
                AuditEntry(kind=AuditKind.COMMAND, room_id="!a:x", data={"text": "heron plan"}),
                AuditEntry(kind=AuditKind.ACCESS, data={"view": "search", "text": "heron"}),
                AuditEntry(kind=AuditKind.EXPORT, data={"filters": {"text": "heron"}}),
            ]
        )
    finally:
        await store.close()

    async def kinds(*argv: str) -> list[str]:
        out = env.tmp / f"trail-{jobs}-{len(argv)}.jsonl"
        rc = await env.cli("export", "--jobs", jobs, "--format", "jsonl", "-o", str(out), *argv)
        assert rc == 0, capsys.readouterr().err
        return [json.loads(line)["kind"] for line in out.read_text().splitlines()]

    assert await kinds("--text", "heron") == ["command"]
    assert await kinds("--type", "access", "--text", "heron") == ["access"]
