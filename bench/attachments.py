"""Attachment extraction throughput per format, against the library's own floor in the
same run, and the cost the media gate adds over HTTP (no Synapse module available here:
see BENCHMARKS.md).

    PYTHONPATH=. python bench/attachments.py
"""

from __future__ import annotations

import asyncio
import io
import statistics
import time
import zipfile
from collections.abc import Callable

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
    for page in PdfReader(io.BytesIO(data)).pages:
        page.extract_text()


def floor_zip_text(data: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in zf.namelist():
            zf.read(name).decode("utf-8")


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


def main() -> None:
    limits = Limits()
    files = {
        "pdf": (d.pdf(*[LINE] * 400), floor_pdf),
        "docx": (d.docx(*[LINE] * 3000), floor_docx),
        "xlsx": (d.xlsx([[LINE, 4111111111111111, i] for i in range(5000)]), floor_xlsx),
        "text": ((LINE * 8000).encode(), lambda b: b.decode("utf-8")),
        "zip": (d.zip_of({f"{i}.txt": (LINE * 400).encode() for i in range(20)}), floor_zip_text),
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

    async def pooled() -> None:
        pool = ExtractionPool(1, 768 * 1024 * 1024)
        await pool.start()
        pdf = d.pdf(*[LINE] * 2000)  # about 1 MB
        try:
            direct = statistics.median(
                [best(lambda: extract(pdf, limits), runs=1) for _ in range(7)]
            )
            through = []
            for _ in range(7):
                t = time.perf_counter()
                await pool.extract(pdf, limits)
                through.append(time.perf_counter() - t)
            bomb = d.ratio_bomb(200 * 1024 * 1024)
            t = time.perf_counter()
            result, _ = await pool.extract(bomb, limits)
            bomb_s = time.perf_counter() - t
        finally:
            pool.close()
        med = statistics.median(through)
        print()
        print(
            f"1 MB PDF ({len(pdf) / 1e6:.2f} MB): in-process {direct * 1000:.1f} ms, through the"
            f" worker pool {med * 1000:.1f} ms (pool overhead {(med - direct) * 1000:.1f} ms,"
            f" ratio {med / direct:.2f})"
        )
        print(
            f"200 MB ratio bomb ({len(bomb) / 1024:.0f} KiB): refused in {bomb_s * 1000:.0f} ms"
            f" ({result.reason}: {result.detail})"
        )

    asyncio.run(pooled())


if __name__ == "__main__":
    main()
