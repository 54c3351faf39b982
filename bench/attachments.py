"""Attachment extraction throughput per format, against the library's own floor in the
same run; the PDF readers compared (PDFium, which the bridge uses, and pypdf, which it used
before); the text-heavy PDF through the extraction pool with one worker and with two
(read in parts at once); and the upload latency the gate adds through real Synapse: the
same 1 MB PDFs uploaded to a Synapse with the project's module (and the bridge behind it)
and to one without, alternately, in the same run.

    PYTHONPATH=. python bench/attachments.py [--uploads N] [--no-synapse | --only-synapse]
        [--links 0,1000,100]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import random
import statistics
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pypdfium2 as pdfium
from pypdf import PdfReader

from bridge.attachments.extract import extract
from bridge.attachments.limits import Limits
from bridge.attachments.pool import ExtractionPool
from tests.kit import documents as d

LINE = "Quarterly minutes: revenue grew, the card 4111 1111 1111 1111 was seen. " * 2


def best(fn: Callable[[], object], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def floor_pdf(data: bytes) -> None:
    """PDFium's own text path (what the bridge's reader wraps)."""
    doc = pdfium.PdfDocument(data)
    for i in range(len(doc)):
        page = doc[i]
        page.get_textpage().get_text_range()
        page.close()
    doc.close()


def pypdf_text(data: bytes) -> None:
    """pypdf's text path (the reader before PDFium)."""
    for page in PdfReader(io.BytesIO(data)).pages:
        page.extract_text()


def floor_zip_text(data: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in zf.namelist():
            zf.read(name).decode("utf-8")


def floor_tar_gz(data: bytes) -> None:
    """tarfile's own path: every member of the .tar.gz read and decoded."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for member in tf:
            f = tf.extractfile(member) if member.isreg() else None
            if f is not None:
                f.read().decode("utf-8")


def floor_docx(data: bytes) -> None:
    import docx

    for p in docx.Document(io.BytesIO(data)).paragraphs:
        _ = p.text


def floor_xlsx(data: bytes) -> None:
    import openpyxl

    book = openpyxl.load_workbook(io.BytesIO(data), read_only=True)
    for sheet in book.worksheets:
        for row in sheet.iter_rows(values_only=True):
            _ = row


def pdf_readers(files: dict[str, bytes]) -> None:
    """PDFium (the bridge's reader) against pypdf (the one before) on the same files."""
    print()
    print("| PDF | size | pages | pypdf MB/s | PDFium MB/s | PDFium / pypdf |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, data in files.items():
        slow = best(lambda data=data: pypdf_text(data), runs=3)
        fast = best(lambda data=data: floor_pdf(data), runs=3)
        mb = len(data) / 1e6
        pages = len(pdfium.PdfDocument(data))
        print(
            f"| {name} | {len(data) / 1024:.0f} KiB | {pages} | {mb / slow:.2f} | {mb / fast:.2f} |"
            f" {slow / fast:.1f} |"
        )


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


#: Upload ways measured: Synapse without the module (the floor), with the module sending the
#: file's bytes, with the module naming the file in a media store the bridge reads too.
WITHOUT, BODY, PATH = "without module", "module: bytes", "module: path"
CHUNK = 64 * 1024


def paced(data: bytes, mbit: float) -> Any:
    """The body as a client on a ``mbit`` Mbit/s link sends it (0: as fast as loopback)."""
    if not mbit:
        return data

    async def chunks() -> Any:
        started = time.perf_counter()
        for sent in range(0, len(data), CHUNK):
            due = started + sent * 8 / (mbit * 1e6)
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            yield data[sent : sent + CHUNK]

    return chunks()


async def upload_latency(uploads: int, links: list[float]) -> None:
    """Median and p95 of ``POST /_matrix/media/v3/upload`` of 1 MB PDFs to three Synapses
    from the same harness, uploads alternating between them in random order: one without
    the module (the floor), one whose module streams the file to the bridge, one whose
    module names the file in its media store, which the bridge reads (shared store). Per
    client link: loopback, then uploads paced as a client on an N Mbit/s link sends them."""
    from bridge.dev.devstack import BridgeProcess, prepare_stack
    from bridge.dev.devsynapse import SynapseServer

    files = {
        "text-heavy PDF": d.text_heavy_pdf(),
        "image-heavy PDF": d.image_heavy_pdf(),
        # No reader runs for a photo: what is left is the module's hop and the gate's answer.
        "PNG photo": b"\x89PNG\r\n\x1a\n" + random.randbytes(1_000_000 - 8),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dev = prepare_stack(
            work / "with",
            bridge_options={"dlp": {"detectors": {"card": ["block", "notify"]}}},
            shared_media=True,
        )
        assert dev.synapse.antispam is not None
        options = {k: v for k, v in dev.synapse.antispam.options.items() if k != "media_delivery"}
        by_body = SynapseServer(
            work / "body",
            registrations=[dev.registration_path],
            antispam=dataclasses.replace(dev.synapse.antispam, options=options),
        )
        plain = SynapseServer(work / "without", registrations=[dev.registration_path])
        bridge = BridgeProcess(dev.config_path, work / "bridge.log", dev.bridge_port)
        try:
            for server in (dev.synapse, by_body, plain):
                server.start()
            bridge.start()
            servers = {
                WITHOUT: (plain.url, plain.register_user("bench")[1]),
                BODY: (by_body.url, by_body.register_user("bench")[1]),
                PATH: (dev.synapse.url, dev.synapse.register_user("bench")[1]),
            }
            times: dict[tuple[float, str, str], list[float]] = {}
            async with aiohttp.ClientSession() as session:

                async def post(server: str, data: bytes, mbit: float) -> float:
                    url, token = servers[server]
                    headers = {
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/octet-stream",  # no thumbnails
                        "Content-Length": str(len(data)),
                    }
                    started = time.perf_counter()
                    async with session.post(
                        f"{url}/_matrix/media/v3/upload",
                        data=paced(data, mbit),
                        params={"filename": "bench.pdf"},
                        headers=headers,
                    ) as r:
                        await r.read()
                        assert r.status == 200, r.status
                    return time.perf_counter() - started

                for data in files.values():  # warm-up: connections, workers, caches
                    for server in servers:
                        for _ in range(3):
                            await post(server, data, 0)
                for mbit in links:
                    for name, data in files.items():
                        for _ in range(uploads):
                            order = list(servers)
                            random.shuffle(order)
                            for server in order:
                                took = await post(server, data, mbit)
                                times.setdefault((mbit, name, server), []).append(took)
        finally:
            bridge.stop()
            for server in (plain, by_body, dev.synapse):
                server.stop()
        if FALLBACK_LINE in (dev.synapse.log_path.read_text("utf-8")):
            print("WARNING: the path-mode module fell back to sending bytes")
    print()
    print(f"Upload of 1 MB through Synapse, {uploads} uploads each (ms; ratio: to without)")
    print()
    print(
        "| client link | file | without module: median / p95 | module, bytes: median / p95"
        " | ratio | module, path: median / p95 | ratio | added by path (median) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mbit in links:
        link = f"{mbit:g} Mbit/s" if mbit else "loopback"
        for name in files:
            base = times[(mbit, name, WITHOUT)]
            b50 = statistics.median(base) * 1000
            row = [link, name, f"{b50:.1f} / {pct(base, 0.95) * 1000:.1f}"]
            for way in (BODY, PATH):
                gated = times[(mbit, name, way)]
                g50 = statistics.median(gated) * 1000
                row += [f"{g50:.1f} / {pct(gated, 0.95) * 1000:.1f}", f"{g50 / b50:.3f}"]
            added = statistics.median(times[(mbit, name, PATH)]) * 1000 - b50
            print("| " + " | ".join(row) + f" | {added:+.1f} |")


FALLBACK_LINE = "sending the file's bytes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=30, help="uploads per PDF and server")
    parser.add_argument("--no-synapse", action="store_true", help="skip the Synapse part")
    parser.add_argument(
        "--links",
        default="0,1000,100",
        help="client links in Mbit/s for the Synapse part, 0 = loopback (default 0,1000,100)",
    )
    parser.add_argument("--only-synapse", action="store_true", help="only the Synapse part")
    args = parser.parse_args()
    links = [float(x) for x in args.links.split(",")]
    if args.only_synapse:
        asyncio.run(upload_latency(args.uploads, links))
        return
    limits = Limits()
    text_pdf, image_pdf = d.text_heavy_pdf(), d.image_heavy_pdf()
    files = {
        "pdf (text-heavy)": (text_pdf, floor_pdf),
        "pdf (image-heavy)": (image_pdf, floor_pdf),
        "docx": (d.docx(*[LINE] * 3000), floor_docx),
        "xlsx": (d.xlsx([[LINE, 4111111111111111, i] for i in range(5000)]), floor_xlsx),
        "text": ((LINE * 8000).encode(), lambda b: b.decode("utf-8")),
        "zip": (d.zip_of({f"{i}.txt": (LINE * 400).encode() for i in range(20)}), floor_zip_text),
        "tar.gz": (
            d.gz(d.tar_of({f"{i}.txt": (LINE * 400).encode() for i in range(20)})),
            floor_tar_gz,
        ),
    }
    print("| format | size | bounded pipeline MB/s | library alone MB/s | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (data, floor) in files.items():
        mine = best(lambda data=data: extract(data, limits))
        lib = best(lambda data=data, floor=floor: floor(data))
        mb = len(data) / 1e6
        print(
            f"| {name} | {len(data) / 1024:.0f} KiB | {mb / mine:.1f} | {mb / lib:.1f} |"
            f" {lib / mine:.2f} |"
        )
    gzip_bomb = d.tar_gz_bomb(1024 * 1024 * 1024)
    refused = best(lambda: extract(gzip_bomb, limits), runs=3)
    print(
        f"\n.tar.gz bomb (1 GiB of zeros in {len(gzip_bomb) / 1e6:.1f} MB): refused on its bound"
        f" in {refused * 1000:.0f} ms ({extract(gzip_bomb, limits).detail})"
    )
    pdf_readers({"text-heavy": text_pdf, "image-heavy": image_pdf})

    async def pooled() -> None:
        pool = ExtractionPool(1, 768 * 1024 * 1024)
        await pool.start()
        try:
            direct = statistics.median(
                [best(lambda: extract(text_pdf, limits), runs=1) for _ in range(5)]
            )
            through = []
            for _ in range(5):
                t = time.perf_counter()
                await pool.extract(text_pdf, limits)
                through.append(time.perf_counter() - t)
            bomb = d.ratio_bomb(200 * 1024 * 1024)
            t = time.perf_counter()
            result, _ = await pool.extract(bomb, limits)
            bomb_s = time.perf_counter() - t
            # The same PDF with 1 worker and with 2 (read in parts, one per idle worker),
            # alternating in each round.
            split_pool = ExtractionPool(2, 768 * 1024 * 1024)
            await split_pool.start()
            try:
                whole, _ = await pool.extract(text_pdf, limits)
                merged, _ = await split_pool.extract(text_pdf, limits)
                parts = min(2, split_pool.max_parts)  # 1 on a machine with one CPU
                assert merged == whole, "reading in parts must not change the extraction"
                assert split_pool.split == (1 if parts > 1 else 0)
                one: list[float] = []
                two: list[float] = []
                for _ in range(15):
                    for p, times in ((pool, one), (split_pool, two)):
                        t = time.perf_counter()
                        await p.extract(text_pdf, limits)
                        times.append(time.perf_counter() - t)
            finally:
                split_pool.close()
        finally:
            pool.close()
        med = statistics.median(through)
        print()
        print(
            f"text-heavy PDF ({len(text_pdf) / 1e6:.2f} MB): in-process {direct * 1000:.1f} ms,"
            f" through the worker pool {med * 1000:.1f} ms (pool overhead"
            f" {(med - direct) * 1000:.1f} ms, ratio {med / direct:.2f})"
        )
        print(
            f"200 MB ratio bomb ({len(bomb) / 1024:.0f} KiB): refused in {bomb_s * 1000:.0f} ms"
            f" ({result.reason}: {result.detail})"
        )
        m1, m2 = statistics.median(one), statistics.median(two)
        print(
            f"text-heavy PDF through the pool, {len(one)} runs each (median / best):"
            f" 1 worker {m1 * 1000:.1f} / {min(one) * 1000:.1f} ms, 2 workers (read in"
            f" {parts} parts) {m2 * 1000:.1f} / {min(two) * 1000:.1f} ms,"
            f" ratio {m1 / m2:.2f} (median), {min(one) / min(two):.2f} (best)"
        )

    asyncio.run(pooled())
    if not args.no_synapse:
        asyncio.run(upload_latency(args.uploads, links))


if __name__ == "__main__":
    main()
