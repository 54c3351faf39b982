"""Helpers that start throwaway Synapse servers for integration tests.

Wire into conftest.py, e.g.::

    @pytest.fixture(scope="session")
    def synapse(tmp_path_factory):
        server = start_test_synapse(tmp_path_factory, [registration_path], antispam={...})
        yield server
        server.stop()
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from bridge.dev.devsynapse import SynapseServer


def require_synapse(antispam: bool = False) -> None:
    """Skip the calling test when matrix-synapse (or the antispam module) is missing."""
    if importlib.util.find_spec("synapse") is None:
        pytest.skip("matrix-synapse is not installed (pip install 'matrix-policy-bridge[test]')")
    if antispam and importlib.util.find_spec("synapse_http_antispam") is None:
        pytest.skip("synapse-http-antispam is not installed")


def start_test_synapse(
    tmp_path_factory: pytest.TempPathFactory,
    registrations: list[Path],
    antispam: Mapping[str, Any] | None,
    retention: bool = False,
    *,
    name: str = "synapse",
    extra_config: Mapping[str, Any] | None = None,
    timeout: float = 60.0,
) -> SynapseServer:
    """Write a config into a fresh temp directory, start Synapse and return it (running).

    ``antispam`` takes the synapse-http-antispam module's keys: ``base_url`` (required),
    ``authorization``, ``fail_open``, ``enabled_callbacks``, ``do_ping``. The caller must
    call ``stop()`` (or use the server as a context manager).
    """
    require_synapse(antispam=antispam is not None)
    workdir = tmp_path_factory.mktemp(name)
    server = SynapseServer(
        workdir,
        registrations=registrations,
        antispam=antispam,
        retention=retention,
        extra_config=extra_config,
    )
    server.start(timeout=timeout)
    return server
