"""The command line as an operator meets it: ``python -m bridge …`` in a child process."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from bridge import __version__

TIMEOUT = 60


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
    )


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    data: dict[str, Any] = {
        "homeserver": {"domain": "corp.example", "url": "http://127.0.0.1:8008"},
        "appservice": {
            "as_token": "as-secret-1-xxxxxxxxxxxxxxxxxxxx",
            "hs_token": "hs-secret-1-xxxxxxxxxxxxxxxxxxxx",
            "hostname": "127.0.0.1",
            "port": closed_port(),
        },
        "gate": {"token": "gate-secret-1-xxxxxxxxxxxxxxxxxx"},
        "data_dir": str(tmp_path / "data"),
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = tmp_path / "config.yaml"
    with path.open("w", encoding="utf-8") as fh:
        YAML().dump(data, fh)
    return path


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"policy-bridge {__version__}"


def test_check_config_accepts_a_good_config(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{path}: OK" in result.stdout
    assert "bot @policybot:corp.example" in result.stdout
    assert "database sqlite" in result.stdout


def test_check_config_names_every_bad_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        appservice={"port": "eighty"},
        logging={"format": "xml"},
        homeservr={"url": "http://typo"},
    )
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 3
    assert f"invalid configuration in {path}" in result.stderr
    assert "appservice.port: got 'eighty', expected an integer from 1 to 65535" in result.stderr
    assert "logging.format: got 'xml'" in result.stderr
    assert "homeservr: unknown option" in result.stderr
    assert result.stdout == ""


def test_check_config_with_placeholder_tokens_fails(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("homeserver:\n  domain: corp.example\n", encoding="utf-8")
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 3
    assert "appservice.as_token" in result.stderr
    assert "placeholder" in result.stderr


def test_run_with_a_missing_config_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_cli("run", "-c", str(missing))
    assert result.returncode == 3
    assert str(missing) in result.stderr
    # Also when run is implied by a bare -c.
    assert run_cli("-c", str(missing)).returncode == 3


def test_run_gives_up_on_an_unreachable_homeserver(tmp_path: Path) -> None:
    port = closed_port()
    path = write_config(
        tmp_path, homeserver={"url": f"http://127.0.0.1:{port}", "startup_timeout": 1}
    )
    result = run_cli("run", "-c", str(path))
    assert result.returncode == 4, result.stderr
    assert f"homeserver http://127.0.0.1:{port} not reachable after 1s" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://nobody@127.0.0.1:{port}/x",
        "sqlite+aiosqlite:///{tmp}/file-not-dir/bridge.db",
    ],
)
def test_run_with_an_unusable_database_is_a_database_error(tmp_path: Path, url: str) -> None:
    (tmp_path / "file-not-dir").write_text("in the way", encoding="utf-8")
    path = write_config(tmp_path, database={"url": url.format(port=closed_port(), tmp=tmp_path)})
    result = run_cli("run", "-c", str(path))
    assert result.returncode == 5, result.stderr
    assert "database error" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_registration_writes_both_files(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "# my bridge\nhomeserver:\n  domain: corp.example  # our server\n", encoding="utf-8"
    )
    reg = tmp_path / "reg" / "registration.yaml"
    reg.parent.mkdir()
    result = run_cli("generate-registration", "-c", str(path), "-r", str(reg))
    assert result.returncode == 0, result.stderr
    assert f"wrote {reg}" in result.stdout

    registration = YAML(typ="safe").load(reg.read_text("utf-8"))
    config = YAML(typ="safe").load(path.read_text("utf-8"))
    assert registration["as_token"] == config["appservice"]["as_token"]
    assert registration["hs_token"] == config["appservice"]["hs_token"]
    assert len(registration["as_token"]) >= 32
    assert registration["as_token"] != registration["hs_token"]
    assert config["gate"]["token"] not in ("", registration["as_token"])
    assert registration["rate_limited"] is False
    assert registration["namespaces"]["rooms"] == [{"exclusive": False, "regex": "!.*"}]
    assert registration["sender_localpart"] == "policybot"
    # The config keeps the operator's comments.
    text = path.read_text("utf-8")
    assert "# my bridge" in text and "# our server" in text
    # The result is a usable config.
    assert run_cli("check-config", "-c", str(path)).returncode == 0

    # Running it again issues fresh tokens.
    assert run_cli("generate-registration", "-c", str(path), "-r", str(reg)).returncode == 0
    again = YAML(typ="safe").load(reg.read_text("utf-8"))
    assert again["as_token"] != registration["as_token"]


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_the_example_registration_is_what_generate_registration_writes(tmp_path: Path) -> None:
    """registration.yaml in the repository matches config.example.yaml but for its tokens,
    which are the placeholders the bridge refuses."""
    root = Path(__file__).resolve().parents[2]
    config = tmp_path / "config.yaml"
    config.write_text((root / "config.example.yaml").read_text("utf-8"), encoding="utf-8")
    generated = tmp_path / "registration.yaml"
    assert run_cli("generate-registration", "-c", str(config), "-r", str(generated)).returncode == 0
    example = YAML(typ="safe").load((root / "registration.yaml").read_text("utf-8"))
    fresh = YAML(typ="safe").load(generated.read_text("utf-8"))
    tokens = ("as_token", "hs_token")
    assert {k: v for k, v in example.items() if k not in tokens} == {
        k: v for k, v in fresh.items() if k not in tokens
    }
    placeholders = YAML(typ="safe").load((root / "config.example.yaml").read_text("utf-8"))
    assert example["as_token"] == placeholders["appservice"]["as_token"]
    assert example["hs_token"] == placeholders["appservice"]["hs_token"]
