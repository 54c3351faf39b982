"""The test tree itself: pytest imports test files by their base name (rootdir-relative
packages are not used), so two test files with the same name anywhere under tests/ break
collection of the whole suite. Partial runs (one folder) would not notice; this does."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_file_name_is_unique() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, count in names.items() if count > 1] == []
