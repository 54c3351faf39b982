"""The console rig (tests/kit/console.py) as a fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.kit.console import ConsoleRig, make_rig


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[ConsoleRig]:
    async for r in make_rig(tmp_path):
        yield r
