"""Benchmark of the audit store's crypto and integrity layer against the measured floors.

Run: ``python bench/audit_crypto.py`` (1,000,000-record verification) or
``python bench/audit_crypto.py --quick`` for a smoke run. Prints rates and their
ratio to the floors in DESIGN.md; exits 1 if the verifier is below 100k records/s.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.audit.chain import (
    GENESIS,
    ChainFields,
    ChainRecord,
    ChainVerifier,
    Checkpoint,
    record_hash,
    sign_checkpoint,
    verify_chain,
)
from bridge.audit.crypto import BlindIndexer, DataKey, ciphertext_digest, encrypt_record

FLOOR_AES = 300_000
FLOOR_SHA = 600_000
REQUIRED_VERIFY = 100_000
RECORD_BYTES = 400
CHUNK = 10_000
CHECKPOINT_EVERY = 10_000


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def line(name: str, per_s: float, floor: float | None = None) -> None:
    extra = f"   floor {floor:>10,.0f}/s   ratio {per_s / floor:5.2f}" if floor else ""
    print(f"{name:<44} {per_s:>12,.0f}/s{extra}")


def bench_encrypt(n: int) -> None:
    idx = BlindIndexer(os.urandom(32))
    scope = idx.room("!room:example.org")
    dk = DataKey.generate(scope)
    payloads = [os.urandom(RECORD_BYTES) for _ in range(64)]
    t = time.perf_counter()
    for i in range(n):
        encrypt_record(dk, i, scope, payloads[i & 63])
    line("AES-256-GCM encrypt_record (400 B, AAD)", rate(n, time.perf_counter() - t), FLOOR_AES)
    aead, nonce = dk.aead, os.urandom(12)
    t = time.perf_counter()
    for i in range(n):
        aead.encrypt(nonce, payloads[i & 63], None)
    line("  raw AESGCM.encrypt (400 B, reference)", rate(n, time.perf_counter() - t), FLOOR_AES)


def bench_hash(n: int) -> None:
    data = os.urandom(200)
    sha = hashlib.sha256
    h = GENESIS
    t = time.perf_counter()
    for _ in range(n):
        h = sha(h + data).digest()
    line("SHA-256 raw chaining (32+200 B)", rate(n, time.perf_counter() - t), FLOOR_SHA)
    f = ChainFields(1, 1, "event", *(os.urandom(16) for _ in range(4)), "dk1", os.urandom(12),
                    os.urandom(32))  # fmt: skip
    t = time.perf_counter()
    for _ in range(n):
        h = record_hash(h, f)
    line("record_hash (canonical encoding + SHA-256)", rate(n, time.perf_counter() - t), FLOOR_SHA)


def bench_blind_index(n: int) -> None:
    idx = BlindIndexer(os.urandom(32))
    senders = [f"@user{i}:example.org" for i in range(1000)]
    t = time.perf_counter()
    for i in range(n):
        idx("sender", senders[i % 1000])
    line("blind index (HMAC-SHA256/16, cached subkey)", rate(n, time.perf_counter() - t))


class Synth:
    """Deterministic synthetic chain, produced chunk by chunk (constant memory)."""

    def __init__(self, signing_key: Ed25519PrivateKey) -> None:
        self.sk = signing_key
        self.pool = [os.urandom(RECORD_BYTES + 16) for _ in range(256)]
        self.digests = [ciphertext_digest(c) for c in self.pool]
        self.rooms = [os.urandom(16) for _ in range(50)]
        self.senders = [os.urandom(16) for _ in range(500)]
        self.types = [os.urandom(16) for _ in range(5)]
        self.prev = GENESIS
        self.seq = 0

    def chunk(self, n: int) -> tuple[list[ChainRecord], list[Checkpoint]]:
        recs: list[ChainRecord] = []
        cps: list[Checkpoint] = []
        prev = self.prev
        for _ in range(n):
            self.seq += 1
            s = self.seq
            p = s & 255
            f = ChainFields(
                s,
                1_700_000_000_000 + s,
                "event" if s % 5 else "action",
                s.to_bytes(16, "big"),
                self.rooms[s % 50],
                self.senders[s % 500],
                self.types[s % 5],
                f"dk{s % 50}",
                s.to_bytes(12, "big"),
                self.digests[p],
            )
            prev = record_hash(prev, f)
            # one record in four has had its ciphertext expired (digest only)
            recs.append(ChainRecord(f, prev, None if s % 4 == 0 else self.pool[p]))
            if s % CHECKPOINT_EVERY == 0:
                cps.append(sign_checkpoint(self.sk, s, prev, f.ts, s))
        self.prev = prev
        return recs, cps


def bench_verify(n: int) -> float:
    sk = Ed25519PrivateKey.generate()
    synth = Synth(sk)
    # checkpoints are generated alongside the records; the verifier needs them
    # up front, so generate them in a first (untimed) pass that keeps only them.
    pre = Synth(sk)
    pre.pool, pre.digests = synth.pool, synth.digests
    pre.rooms, pre.senders, pre.types = synth.rooms, synth.senders, synth.types
    cps: list[Checkpoint] = []
    done = 0
    while done < n:
        _, c = pre.chunk(min(CHUNK, n - done))
        cps.extend(c)
        done += min(CHUNK, n - done)

    verifier = ChainVerifier(sk.public_key(), cps)
    busy = 0.0
    done = 0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    while done < n:
        recs, _ = synth.chunk(min(CHUNK, n - done))
        feed = verifier.feed
        t = time.perf_counter()
        for f, h, ct in recs:
            feed(f, h, ct)
        busy += time.perf_counter() - t
        done += len(recs)
    report = verifier.finish()
    assert report.ok, str(report)
    per_s = rate(n, busy)
    line(f"ChainVerifier over {n:,} records", per_s, REQUIRED_VERIFY)
    print(f"  {report}")
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"  max RSS {rss_after / 1024:,.1f} MiB "
        f"(growth during verify {(rss_after - rss_before) / 1024:,.1f} MiB)"
    )

    # memory: stream the same chain through verify_chain() from a generator
    def stream() -> Iterator[ChainRecord]:
        s = Synth(sk)
        s.pool, s.digests, s.rooms, s.senders, s.types = (
            synth.pool, synth.digests, synth.rooms, synth.senders, synth.types,
        )  # fmt: skip
        left = n
        while left:
            recs, _ = s.chunk(min(1000, left))
            left -= len(recs)
            yield from recs

    tracemalloc.start()
    report = verify_chain(stream(), cps, sk.public_key())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.ok, str(report)
    print(f"  tracemalloc peak while streaming {n:,} records (1k-record generator): "
          f"{peak / 1024:,.0f} KiB, {len(cps)} checkpoints held")  # fmt: skip
    return per_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small counts, a smoke run")
    args = ap.parse_args()
    n_micro = 20_000 if args.quick else 300_000
    n_verify = 50_000 if args.quick else 1_000_000
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"{'quick' if args.quick else 'full'} run"
    )
    bench_encrypt(n_micro)
    bench_hash(n_micro)
    bench_blind_index(n_micro)
    per_s = bench_verify(n_verify)
    ok = per_s >= REQUIRED_VERIFY
    print("verifier requirement (>= 100,000 records/s):", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
