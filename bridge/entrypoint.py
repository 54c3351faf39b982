"""Container entrypoint: ``python -m bridge.entrypoint [COMMAND [ARGS...]]``.

First start (no ``config.yaml`` in the data directory): write the bundled default config with
container settings (``data_dir`` = the data directory, listen on ``0.0.0.0``), generate the
appservice registration with fresh tokens, tell the operator what to edit, and exit 0.

Later starts: make sure ``registration.yaml`` still matches the config (same tokens, current
address, domain and bot), then replace this process with
``python -m bridge COMMAND ARGS -c <data>/config.yaml`` (COMMAND defaults to ``run``), so the
bridge itself is PID 1 and receives the container's stop signal.

Environment:
  BRIDGE_DATA_DIR            data directory (default ``/data``)
  BRIDGE_SYNC_REGISTRATION   ``0`` leaves an existing registration.yaml untouched
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from ruamel.yaml import YAML

from bridge.cli import EXIT_CONFIG, EXIT_ERROR, EXIT_OK
from bridge.cli import main as cli_main
from bridge.config import (
    ENV_PREFIX,
    Config,
    ConfigError,
    _plain,
    _yaml,
    default_config_text,
    load_config,
    read_yaml,
    update_config_file,
    write_private,
)
from bridge.registration import registration_dict

DATA_DIR_ENV = "BRIDGE_DATA_DIR"
SYNC_ENV = "BRIDGE_SYNC_REGISTRATION"
DEFAULT_DATA_DIR = Path("/data")
CONFIG_NAME = "config.yaml"
REGISTRATION_NAME = "registration.yaml"
LISTEN_ALL = "0.0.0.0"

ExecFn = Callable[[list[str], Path], Any]


def exec_in(argv: list[str], cwd: Path) -> NoReturn:
    """Replace this process with ``argv`` run in ``cwd``."""
    os.chdir(cwd)
    os.execv(argv[0], argv)  # noqa: S606 - fixed argv, no shell on purpose


def data_dir_from_env(env: Mapping[str, str]) -> Path:
    """The data directory: ``$BRIDGE_DATA_DIR`` or ``/data``, made absolute."""
    raw = env.get(DATA_DIR_ENV, "").strip()
    return Path(raw).resolve() if raw else DEFAULT_DATA_DIR


def bridge_argv(config_path: Path, args: Sequence[str]) -> list[str]:
    """The command line the entrypoint execs: the bridge CLI with the container's config.

    ``-c`` is appended after the (sub)command, the form every subcommand accepts
    (``run``, ``check-config``, ``generate-registration``, ``audit verify`` …), unless the
    arguments already name a config.
    """
    args = list(args) or ["run"]
    if not any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        args += ["-c", str(config_path)]
    return [sys.executable, "-m", "bridge", *args]


def _check_writable(data_dir: Path, err: TextIO) -> bool:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err.write(f"policy-bridge: cannot create the data directory {data_dir}: {e.strerror}\n")
        return False
    if os.access(data_dir, os.W_OK | os.X_OK):
        return True
    uid, gid = os.getuid(), os.getgid()
    err.write(
        f"policy-bridge: the data directory {data_dir} is not writable by this container's "
        f"user (uid {uid}, gid {gid}).\n"
        f"  Give the volume to that user, e.g. on the host: sudo chown -R {uid}:{gid} <dir>\n"
        f"  (for a bind mount <dir> is the host directory mounted at {data_dir}).\n"
    )
    return False


def _set_data_dir(config_path: Path, data_dir: Path) -> None:
    """Set the top-level ``data_dir`` key, keeping comments (update_config_file does sections)."""
    y = _yaml()
    doc = y.load(config_path.read_text("utf-8"))
    doc["data_dir"] = str(data_dir)
    write_private(config_path, lambda fh: y.dump(doc, fh))


def _env_override_name(env: Mapping[str, str], dotted: str) -> str | None:
    """The ``POLICY_BRIDGE__…`` variable that overrides ``dotted``, if one is set."""
    want = dotted.lower().split(".")
    for name in env:
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if parts == want:
            return name
    return None


def first_start_message(
    config: Config, config_path: Path, registration_path: Path, env: Mapping[str, str]
) -> str:
    """What the operator must do after the first start, with the values now in effect."""

    def row(key: str, value: str, hint: str) -> str:
        source = _env_override_name(env, key)
        origin = f"   (set by ${source})" if source else ""
        return f"    {key:<20} {value}{origin}\n        {hint}\n"

    perms = ", ".join(f"{who}: {role}" for who, role in config.bridge.permissions.items())
    gate_url = f"{config.appservice.address}{config.gate.base_path}"
    return (
        "\n"
        "policy-bridge: first start. Wrote a new configuration and appservice registration:\n"
        f"    {config_path}\n"
        f"    {registration_path}   (fresh random tokens; keep it secret)\n"
        "\n"
        "1. Edit the configuration. At least these values (now in effect) must fit your setup:\n"
        + row("homeserver.url", config.homeserver.url, "how the bridge reaches Synapse")
        + row("homeserver.domain", config.homeserver.domain, "your server name (user IDs)")
        + row(
            "appservice.address",
            config.appservice.address,
            "how Synapse reaches the bridge, e.g. http://bridge:29330",
        )
        + row("bridge.permissions", perms or "(none)", "who may administer or audit")
        + "   Secrets can be given as env:NAME or file:/run/secrets/NAME values.\n"
        "\n"
        "2. Register the bridge with Synapse (homeserver.yaml), then restart Synapse:\n"
        "       app_service_config_files:\n"
        f"         - /path/readable/by/synapse/{registration_path.name}\n"
        "       modules:\n"
        "         - module: policy_bridge_synapse.PolicyBridgeModule   # synapse_module/\n"
        "           config:\n"
        f"             base_url: {gate_url}\n"
        f"             authorization: <gate.token from {config_path.name}>\n"
        "   (it gates messages, invites, joins, new rooms, state events and uploads; with\n"
        "   synapse-http-antispam instead, list its enabled_callbacks: docs/deployment.md)\n"
        "   The registration is rewritten to match the config at every start of this\n"
        "   container (same tokens); copy it to Synapse again after changing the address,\n"
        "   the domain or the bot. Details: docs/deployment.md.\n"
        "\n"
        "3. Start this container again. It runs the bridge from now on.\n"
    )


def first_start(
    data_dir: Path, env: Mapping[str, str], out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Write config + registration into an empty data directory; returns the exit code."""
    config_path = data_dir / CONFIG_NAME
    registration_path = data_dir / REGISTRATION_NAME
    tmp = config_path.with_suffix(".yaml.new")
    write_private(tmp, lambda fh: fh.write(default_config_text()))
    update_config_file(tmp, {"appservice": {"hostname": LISTEN_ALL}})
    _set_data_dir(tmp, data_dir)
    tmp.replace(config_path)
    # Same code path as `python -m bridge generate-registration -c … -r …`.
    code = cli_main(["generate-registration", "-c", str(config_path), "-r", str(registration_path)])
    if code != EXIT_OK:
        err.write(
            f"policy-bridge: wrote {config_path}, but generating the registration failed "
            f"(exit {code}; see above). Fix the problem, then run the container with "
            "`generate-registration`.\n"
        )
        return code
    try:
        config = load_config(config_path, env=env)
    except ConfigError as e:  # pragma: no cover - generate-registration loaded it just now
        err.write(f"{e}\n")
        return EXIT_CONFIG
    out.write(first_start_message(config, config_path, registration_path, env))
    out.flush()
    return EXIT_OK


def _write_registration(path: Path, reg: Mapping[str, Any]) -> None:
    y = YAML()
    y.default_flow_style = False

    def write(fh: TextIO) -> None:
        fh.write("# Appservice registration for the policy bridge. Generated; keep it secret.\n")
        y.dump(dict(reg), fh)

    write_private(path, write)


def sync_registration(
    config_path: Path,
    registration_path: Path,
    env: Mapping[str, str],
    out: TextIO = sys.stdout,
) -> bool:
    """Rewrite the registration if it no longer matches the config. True if rewritten.

    Uses the tokens from the config, so nothing is regenerated: only the url, namespaces
    and ids follow the config. A config that does not load is left to the bridge to report.
    """
    try:
        config = load_config(config_path, env=env)
    except ConfigError:
        return False
    wanted = registration_dict(config, config.appservice.as_token, config.appservice.hs_token)
    if registration_path.exists():
        try:
            current = read_yaml(registration_path)
        except ConfigError:
            current = None
        if _plain(current) == wanted:
            return False
    try:
        _write_registration(registration_path, wanted)
    except OSError as e:
        out.write(
            f"policy-bridge: WARNING: {registration_path} does not match {config_path} and "
            f"cannot be rewritten ({e.strerror}); Synapse may reject the bridge.\n"
        )
        return False
    out.write(
        f"policy-bridge: updated {registration_path} to match {config_path} "
        f"(url {wanted['url']}, bot {config.bot_mxid}; tokens unchanged). Copy it to "
        "Synapse and restart Synapse if it changed there.\n"
    )
    out.flush()
    return True


def main(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    exec_fn: ExecFn = exec_in,
) -> int:
    """Run the entrypoint logic. Execs the bridge (does not return) unless it is a first start
    or the data directory is unusable; the return value is the exit code in those cases."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    data_dir = data_dir_from_env(env)
    config_path = data_dir / CONFIG_NAME
    if args[:1] in (["-h"], ["--help"], ["--version"]):
        exec_fn([sys.executable, "-m", "bridge", *args], Path.cwd())
        return EXIT_OK  # only reached with a test exec_fn
    if not config_path.exists():
        if not _check_writable(data_dir, sys.stderr):
            return EXIT_ERROR
        return first_start(data_dir, env)
    if env.get(SYNC_ENV, "1").strip().lower() not in ("0", "false", "no", "off"):
        sync_registration(config_path, data_dir / REGISTRATION_NAME, env)
    # Run in the data directory: relative paths given to subcommands (e.g.
    # generate-registration's default registration.yaml) land there.
    exec_fn(bridge_argv(config_path, args), data_dir)
    return EXIT_OK  # only reached with a test exec_fn


def _run() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    _run()
