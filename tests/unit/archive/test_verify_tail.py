"""``audit verify`` on the unsigned tail: it reports the signed head and what follows it,
fails (exit 7) once a record has been unsigned longer than ``audit.checkpoint_interval``
plus the margin (the archive of a bridge that died without signing, whose tail anyone who
can write the database may have changed), and only warns with ``--tail-warning-only``.

The verifier's clock (:func:`bridge.audit.tail.now_ms`) is set from the records' own
archive times, so nothing here depends on how long the test takes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.archive import cli
from bridge.archive.setup import open_store
from bridge.audit import tail
from bridge.audit.chain import ChainFields, record_hash
from bridge.config import Config, load_config
from tests.conftest import BACKENDS, fresh_store_url

INTERVAL_S = 5
LIMIT_S = INTERVAL_S + tail.TAIL_MARGIN_S


@dataclass
class Env:
    config_path: Path
    config: Config

    async def cli(self, *args: str) -> int:
        return await asyncio.to_thread(cli.main, [args[0], "-c", str(self.config_path), *args[1:]])

    async def run_sql(self, statement: str, **params: object) -> list[tuple[object, ...]]:
        engine = create_async_engine(self.config.database.url)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(statement), params)
                return [tuple(r) for r in result] if result.returns_rows else []
        finally:
            await engine.dispose()


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    url = await fresh_store_url(request.param, tmp_path)
    cfg = {
        "appservice": {"as_token": "as-token-x-xxxxxxxxxxxxxxxxxxxxx", "hs_token": "h" * 32},
        "gate": {"token": "gate-token-x-xxxxxxxxxxxxxxxxxxx"},
        "data_dir": str(tmp_path / "data"),
        "database": {"url": url},
        "audit": {
            "signing_key": str(tmp_path / "keys" / "audit-signing.pem"),
            "checkpoint_every": 10,
            "checkpoint_interval": f"{INTERVAL_S}s",
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))
    yield Env(path, load_config(path, env={}))


def event(i: int) -> dict[str, object]:
    return {
        "event_id": f"$e{i}",
        "room_id": "!r:x",
        "sender": "@u:x",
        "type": "m.room.message",
        "origin_server_ts": 1_700_000_000_000 + i,
        "content": {"body": f"hello {i}"},
    }


async def killed_with_a_tail(env: Env) -> tuple[int, int]:
    """13 records, a checkpoint at 10, then the process dies: no shutdown checkpoint.
    Returns the archive times of records 11 and 13."""
    store = await open_store(env.config)
    for t in range(13):
        await store.queue.ingest(f"t{t}", [event(t + 1)])
    await store.db.close()  # killed: store.close() would sign the head
    rows = await env.run_sql("SELECT seq, ts FROM records WHERE seq IN (11, 13) ORDER BY seq")
    return int(rows[0][1]), int(rows[1][1])  # type: ignore[call-overload]


def clock_at(monkeypatch: pytest.MonkeyPatch, ms: int) -> None:
    monkeypatch.setattr(tail, "now_ms", lambda: ms)


async def test_verify_reports_the_signed_head_and_a_fresh_tail(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first, last = await killed_with_a_tail(env)
    clock_at(monkeypatch, first + 2_000)
    assert await env.cli("verify") == 0
    out = capsys.readouterr().out
    assert "checkpoints verified" in out
    assert "signed head: seq 10, signed " in out
    assert "unsigned tail: 3 records, the oldest unsigned for 2.0s" in out
    assert f"spanning {(last - first) / 1000:.1f}s up to the last record" in out


async def test_a_tail_unsigned_longer_than_allowed_fails_or_warns(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = await killed_with_a_tail(env)
    clock_at(monkeypatch, first + int(LIMIT_S * 1000))  # exactly the limit: still fine
    assert await env.cli("verify") == 0
    capsys.readouterr()
    clock_at(monkeypatch, first + int(LIMIT_S * 1000) + 1_000)
    assert await env.cli("verify") == cli.EXIT_STALE_TAIL == 7
    captured = capsys.readouterr()
    assert "error: records 11..13 have been unsigned for 36s, more than the 35s" in captured.err
    assert "unsigned tail: 3 records" in captured.out  # the report itself is printed
    assert await env.cli("verify", "--tail-warning-only") == 0
    assert "warning: records 11..13 have been unsigned" in capsys.readouterr().err
    assert await env.cli("verify", "--max-tail-age", "3600") == 0


async def test_a_rewritten_tail_older_than_the_interval_is_reported(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whoever can write the database deletes the last record and rewrites the one before
    (hashes recomputed): the chain still verifies, since nothing signed covers them, but the
    tail they left is older than the interval allows, so verify fails."""
    first, _ = await killed_with_a_tail(env)
    await env.run_sql("DELETE FROM records WHERE seq = 13")
    cols = (
        "seq, ts, kind, event_id_idx, room_idx, sender_idx, type_idx, key_id, nonce, "
        "ct_digest, origin_ts"
    )
    [row] = await env.run_sql(f"SELECT {cols} FROM records WHERE seq = 12")
    [(prev,)] = await env.run_sql("SELECT hash FROM records WHERE seq = 11")
    forged = ChainFields(*row)._replace(origin_ts=int(row[10]) + 60_000)  # type: ignore[arg-type]
    await env.run_sql(
        "UPDATE records SET origin_ts = :o, hash = :h WHERE seq = 12",
        o=forged.origin_ts,
        h=record_hash(bytes(prev), forged),  # type: ignore[arg-type]
    )
    clock_at(monkeypatch, first + int(LIMIT_S * 1000) + 1)
    assert await env.cli("verify") == 7
    err = capsys.readouterr().err
    assert "records 11..12 have been unsigned" in err
    assert "can change or delete them unnoticed" in err
