"""One frozen :class:`Settings`, from Prefect's own sources < a TOML file < environment <
command-line flags (Prefect's sources: its profile, ``prefect.toml``, ``.env``, read by
``prefect_sources.py``; a ``--profile`` profile wins over the environment, as in Prefect).

Every setting has one key (its name in the TOML file), the environment variables that
set it (``FLOW_WORKER_<KEY>`` always, plus the ``PREFECT_*`` name Prefect's worker
reads, where there is one), and a flag where ``prefect worker start`` has one. Values
are converted by one cattrs converter with strict hooks (``"false"`` is false, ``"3.5"``
is not an int), one key at a time, so an error names the key, the value and where it
came from: ``/etc/flow-worker/p.toml line 4: 'limit' = "two": expected an integer``. A
secret setting's value is never shown, in an error or in ``repr`` (``rules/secrecy.py``).

This is the only module that reads the environment; everything else gets ``Settings``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
import types
import typing
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import cattrs

from worker.host import strict
from worker.host.strict import converter
from worker.rules import secrecy
from worker.rules.runlimits import RunLimits


class SettingsError(ValueError):
    """A setting is missing or bad: the user's configuration, not the worker, is at fault."""


LogFormat = Literal["auto", "console", "json"]


def _setting(
    default: Any, *, env: Sequence[str] = (), validator: Any = None, doc: str = "", secret: bool = False
) -> Any:
    return attrs.field(
        default=default,
        validator=validator,
        repr=secrecy.masked_repr if secret else True,
        metadata={"env": tuple(env), "doc": doc, "secret": secret},
    )


@attrs.frozen
class Settings:
    """Everything flow-worker can be told. Defaults are Prefect's worker's unless noted."""

    api_url: str | None = _setting(
        None, env=["PREFECT_API_URL"], doc="Prefect API, e.g. http://127.0.0.1:4200/api"
    )
    api_key: str | None = _setting(None, env=["PREFECT_API_KEY"], doc="sent as Bearer", secret=True)
    api_auth_string: str | None = _setting(
        None,
        env=["PREFECT_API_AUTH_STRING"],
        doc="user:password, sent as Basic; wins over api_key",
        secret=True,
    )
    api_ssl_cert_file: str | None = _setting(
        None, env=["PREFECT_API_SSL_CERT_FILE"], doc="CA bundle for an HTTPS API; default: the system's"
    )
    api_tls_insecure_skip_verify: bool = _setting(
        False, env=["PREFECT_API_TLS_INSECURE_SKIP_VERIFY"], doc="do not verify the API's certificate"
    )
    client_custom_headers: str | None = _setting(
        None,
        env=["PREFECT_CLIENT_CUSTOM_HEADERS"],
        doc='JSON object of extra HTTP headers, e.g. {"X-Env": "prod"} (in the file: also a table)',
        secret=True,
    )
    api_request_timeout: float = _setting(
        60.0,
        env=["PREFECT_API_REQUEST_TIMEOUT"],
        validator=strict.positive,
        doc="seconds per HTTP request",
    )
    pool: str | None = _setting(None, doc="the work pool to serve (required)")
    work_queues: tuple[str, ...] = _setting((), doc="queue names; empty means every queue of the pool")
    name: str | None = _setting(
        None,
        validator=strict.worker_name,
        doc="worker name; default '<hostname> <pool>' under systemd, else 'ProcessWorker <uuid>'",
    )
    limit: int | None = _setting(
        None, validator=strict.positive, doc="most flow runs at once; unset means no limit, as Prefect"
    )
    prefetch_seconds: float = _setting(10.0, env=["PREFECT_WORKER_PREFETCH_SECONDS"])
    query_seconds: float = _setting(10.0, env=["PREFECT_WORKER_QUERY_SECONDS"], validator=strict.positive)
    heartbeat_seconds: float = _setting(
        30.0, env=["PREFECT_WORKER_HEARTBEAT_SECONDS"], validator=strict.positive
    )
    cancel_poll_seconds: float = _setting(
        10.0, validator=strict.positive, doc="how often CANCELLING runs are looked for"
    )
    cancel_grace_seconds: float = _setting(
        30.0, validator=strict.positive, doc="SIGTERM → SIGKILL grace when a run is cancelled"
    )
    hook_timeout_seconds: float = _setting(
        300.0,
        validator=strict.positive,
        doc="how long a flow's on_crashed / on_cancellation hooks may take, loading the flow included",
    )
    create_pool_if_not_found: bool = _setting(True)
    events: bool = _setting(
        True, doc="subscribe to the server's event stream for instant pickup and cancellation"
    )
    once: bool = _setting(False, doc="drain what is due now, wait for it, exit")
    with_healthcheck: bool = _setting(False)
    webserver_host: str = _setting(
        "127.0.0.1",
        env=["PREFECT_WORKER_WEBSERVER_HOST"],
        doc="differs from Prefect's 0.0.0.0: loopback unless asked",
    )
    webserver_port: int = _setting(8080, env=["PREFECT_WORKER_WEBSERVER_PORT"], validator=strict.port)
    log_format: str = _setting(
        "auto", validator=strict.log_format, doc="console on a TTY, JSON lines otherwise"
    )
    log_level: str = _setting("INFO", doc="DEBUG, INFO, WARNING, ERROR")
    state_dir: str | None = _setting(
        None, doc="ledger of owned runs; default $STATE_DIRECTORY, else ~/.local/state/flow-worker/POOL"
    )
    drain_timeout: float = _setting(
        600.0,
        validator=strict.positive,
        doc="on SIGTERM, how long running flows may finish before being stopped",
    )
    on_stop: str = _setting(
        "crash",
        validator=strict.crash_or_reschedule,
        doc="runs still going when the drain ends: 'crash' or 'reschedule'",
    )
    reclaim_after: float = _setting(
        300.0,
        validator=strict.not_negative,
        doc="seconds a worker of the pool may be silent before its runs are reclaimed; 0: never",
    )
    on_lost: str = _setting(
        "crash",
        validator=strict.crash_or_reschedule,
        doc="a lost worker's RUNNING runs: 'crash' them, or 'reschedule' them (idempotent flows)",
    )
    memory_reserve: str | None = _setting(
        None,
        validator=strict.memory_reserve,
        doc="memory to keep free when admitting runs: a size (512M, 2G) or a share (10%); 0: off; "
        "default 10% of RAM (or of the cgroup's limit), at least 256M",
    )
    python: str | None = _setting(
        None,
        doc="interpreter for the default 'python -m prefect.engine' command; default: the worker's own",
    )
    warm_start: bool = _setting(
        False,
        doc="fork engine-command runs from a preloaded Prefect (faster starts, shared memory); "
        "anything it cannot do exactly as a cold start starts cold",
    )
    log_to_api: bool = _setting(
        True,
        env=["PREFECT_LOGGING_TO_API_ENABLED"],
        doc="send the worker's lines about a run to the run's logs in the Prefect UI",
    )
    base_job_template: str | None = _setting(
        None, doc="JSON file: the job template of a pool the worker creates (Prefect's default otherwise)"
    )
    cgroups: bool = _setting(
        True,
        doc="each run in a cgroup of its own where the unit delegates a cgroup v2 subtree (Delegate=yes)",
    )
    run_memory_max: str | None = _setting(None, validator=strict.run_limit, doc="a run's default memory_max")
    run_memory_high: str | None = _setting(
        None, validator=strict.run_limit, doc="a run's default memory_high"
    )
    run_cpu_weight: str | None = _setting(None, validator=strict.run_limit, doc="a run's default cpu_weight")
    run_cpu_max: str | None = _setting(None, validator=strict.run_limit, doc="a run's default cpu_max")
    run_pids_max: str | None = _setting(None, validator=strict.run_limit, doc="a run's default pids_max")

    service_host: str | None = attrs.field(default=None, metadata={"env": (), "doc": "", "internal": True})
    """The host name when running as a systemd service (``INVOCATION_ID`` set), else None."""
    config_file: str | None = attrs.field(default=None, metadata={"env": (), "doc": "", "internal": True})
    """The TOML file the settings were read from, if any (checked for secrets others can read)."""
    prefect_env: tuple[tuple[str, str], ...] = attrs.field(default=(), metadata={"internal": True})
    """Prefect settings set in its own sources (profile, prefect.toml, .env), for the flows."""
    prefect_read: tuple[str, ...] = attrs.field(default=(), metadata={"internal": True})
    """Which of Prefect's sources were read, for messages."""

    @property
    def worker_name(self) -> str:
        """The name given; else, under systemd, ``<hostname> <pool>`` (stable across
        restarts, unique per host and pool, so peers recognise its runs after a restart);
        else Prefect's default, fixed for this Settings object."""
        if self.name:
            return self.name
        if self.service_host and self.pool:  # --once (the drain timer) beside the daemon: its own name
            return f"{self.service_host} {self.pool}" + (" once" if self.once else "")
        return _DEFAULT_NAME

    def child_prefect_env(self) -> dict[str, str]:
        """Prefect settings that were set explicitly, as env vars for flow-run processes:
        every one set in Prefect's sources (not in the environment), and the API's."""
        env = dict(self.prefect_env)
        if self.api_url:
            env["PREFECT_API_URL"] = self.api_url
        if self.api_key:
            env["PREFECT_API_KEY"] = self.api_key
        if self.api_auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.api_auth_string
        if self.api_ssl_cert_file:
            env["PREFECT_API_SSL_CERT_FILE"] = self.api_ssl_cert_file
        if self.api_tls_insecure_skip_verify:
            env["PREFECT_API_TLS_INSECURE_SKIP_VERIFY"] = "true"
        if self.client_custom_headers:
            env["PREFECT_CLIENT_CUSTOM_HEADERS"] = self.client_custom_headers
        return env

    def run_limits(self) -> RunLimits:
        """Every run's limits unless its job says otherwise (``run_memory_max`` …)."""
        return RunLimits.parse(
            {k.removeprefix("run_"): getattr(self, k) for k in FIELDS if k.startswith("run_")}, "setting"
        )

    def custom_headers(self) -> dict[str, str]:
        """``client_custom_headers`` as a dict (checked by :func:`validated`)."""
        return dict(json.loads(self.client_custom_headers)) if self.client_custom_headers else {}


attrs.resolve_types(Settings)
_DEFAULT_NAME: Final = f"ProcessWorker {uuid.uuid4()}"
FIELDS: Final = {f.name: f for f in attrs.fields(Settings) if not f.metadata.get("internal")}
"""The settings a user can set (``service_host`` is read off the environment, not set)."""


@attrs.frozen
class Sourced:
    """A raw value and where it came from, for error messages."""

    value: Any
    source: str
    label: str | None = None
    """The key as the source names it (``PREFECT_API_URL``, ``api.url``); default: the setting's."""


def _convert(key: str, raw: Sourced) -> Any:
    field = FIELDS[key]
    secret = key in secrecy.SECRET_SETTINGS
    try:
        if raw.value is None or (raw.value == "" and field.default is None):
            return None
        target: Any = field.type
        if isinstance(target, types.UnionType):  # X | None: None was handled above
            target = next(a for a in typing.get_args(target) if a is not type(None))
        given = secrecy.headers_text(raw.value) if key == "client_custom_headers" else raw.value
        if key.startswith("run_") and isinstance(given, int) and not isinstance(given, bool):
            given = str(given)  # run_pids_max = 64 in TOML
        value = converter.structure(given, target)
        problem = secrecy.setting_problem(key, value) if secret else None
        if problem is not None:
            raise ValueError(problem)
        if field.validator is not None:
            field.validator(None, field, value)
        return value
    except Exception as exc:
        reason = exc.exceptions[0] if isinstance(exc, cattrs.BaseValidationError) else exc
        name = raw.label or repr(key)
        if secret:  # the key and where it was given, never the value
            raise SettingsError(f"{raw.source}: {name} (a secret, not shown): {reason}") from None
        raise SettingsError(f"{raw.source}: {name} = {raw.value!r}: {reason}") from None


def _toml_line(text: str, key: str) -> int | None:
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(key)}\s*=", line):
            return number
    return None


def read_file(path: Path) -> dict[str, Sourced]:
    """Raw values from a TOML file (flat keys, as the field names)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    out: dict[str, Sourced] = {}
    for key, value in data.items():
        line = _toml_line(text, key)
        where = f"{path} line {line}" if line else str(path)
        if key not in FIELDS:
            known = ", ".join(sorted(FIELDS))
            raise SettingsError(f"{where}: unknown key {key!r} (known keys: {known})")
        out[key] = Sourced(value, where)
    return out


def read_env(environ: Mapping[str, str]) -> dict[str, Sourced]:
    """Raw values from ``FLOW_WORKER_*`` (unknown names rejected) and Prefect's names."""
    out: dict[str, Sourced] = {}
    for key, field in FIELDS.items():
        for var in field.metadata["env"]:
            if var in environ:
                out[key] = Sourced(environ[var], f"environment variable {var}")
    for var, value in environ.items():
        if var.startswith("FLOW_WORKER_"):
            key = var.removeprefix("FLOW_WORKER_").lower()
            if key not in FIELDS:
                raise SettingsError(f"environment variable {var}: unknown setting {key!r}")
            out[key] = Sourced(value, f"environment variable {var}")
    return out


def load(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_path: Path | None = None,
    *,
    start_dir: Path | None = None,
    user_home: Path | None = None,
    profile: str | None = None,
) -> Settings:
    """Merge Prefect's sources < file < env < flags and validate. ``flags`` holds only flags
    that were given; ``profile`` is ``--profile`` (its values win over the environment).
    Prefect's sources are read in ``start_dir`` (default: the current directory), with
    ``~/.prefect`` under ``user_home`` (default: ``environ``'s ``HOME``; the user's home
    directory when ``environ`` is the process's own)."""
    from worker.host import prefect_sources

    if environ is None:
        environ = os.environ
        user_home = user_home or (Path(environ["HOME"]) if environ.get("HOME") else _home())
    elif user_home is None and environ.get("HOME"):
        user_home = Path(environ["HOME"])
    try:
        prefect = prefect_sources.read(environ, start_dir or _cwd(), user_home, profile)
    except prefect_sources.SourceError as exc:
        raise SettingsError(str(exc)) from None
    raw: dict[str, Sourced] = {}
    overriding: dict[str, Sourced] = {}
    for key, field in FIELDS.items():
        for var in field.metadata["env"]:
            if var in prefect.values:
                found = prefect.values[var]
                into = overriding if var in prefect.overriding else raw
                value = found.value  # a TOML table of custom headers → its JSON, as Prefect passes it
                if isinstance(value, dict) and var in prefect_sources.DICT_SETTINGS:
                    value = prefect_sources.env_string(value)
                into[key] = Sourced(value, found.where, found.key)
    if config_path is None and environ.get("FLOW_WORKER_CONFIG"):
        config_path = Path(environ["FLOW_WORKER_CONFIG"])
    if config_path is not None:
        # "-/etc/flow-worker/p.toml": read it if it exists (systemd's EnvironmentFile=- idiom)
        optional = str(config_path).startswith("-")
        config_path = Path(str(config_path).removeprefix("-"))
        if not (optional and not config_path.exists()):
            raw.update(read_file(config_path))
            raw["config_file"] = Sourced(str(config_path), str(config_path))
    raw.update(read_env({k: v for k, v in environ.items() if k != "FLOW_WORKER_CONFIG"}))
    raw.update(overriding)
    for key, value in flags.items():
        if key not in FIELDS:
            raise SettingsError(f"unknown setting {key!r}")
        raw[key] = Sourced(value, f"flag --{key.replace('_', '-')}")
    values: dict[str, Any] = {
        key: _convert(key, sourced) if key in FIELDS else sourced.value for key, sourced in raw.items()
    }
    if environ.get("INVOCATION_ID"):  # systemd sets it for every service it starts
        values["service_host"] = socket.gethostname()
    values["prefect_env"] = tuple(sorted(prefect.child_env(environ).items()))
    values["prefect_read"] = prefect.read
    return Settings(**values)


def _home() -> Path | None:
    try:  # the user's entry in the password database
        return Path.home()
    except (RuntimeError, KeyError):  # an uid without one (a container's)
        return None


def _cwd() -> Path:
    try:
        return Path.cwd()
    except OSError:  # removed since: relative paths then find nothing, as for Prefect
        return Path()


def validated(settings: Settings) -> Settings:
    """Check what a run needs beyond types: an API URL and a pool."""
    if not settings.api_url:
        read = "; read: " + ", ".join(settings.prefect_read) if settings.prefect_read else ""
        raise SettingsError(
            "PREFECT_API_URL is not set: point it at your Prefect server, e.g. "
            "PREFECT_API_URL=http://127.0.0.1:4200/api in the environment, or `prefect config set "
            f"PREFECT_API_URL=…` as the worker's user (or api_url in the config file){read}"
        )
    if not settings.pool:
        raise SettingsError("no work pool: pass --pool NAME (or pool in the config file)")
    if settings.base_job_template is not None:
        read_job_template(settings.base_job_template)
    for key in sorted(secrecy.SECRET_SETTINGS):  # (checked by load already; Settings may be built directly)
        value = getattr(settings, key)
        problem = secrecy.setting_problem(key, value) if isinstance(value, str) else None
        if problem is not None:
            names = ", ".join(FIELDS[key].metadata["env"])
            raise SettingsError(f"{key} ({names}; a secret, not shown): {problem}")
    if settings.api_ssl_cert_file and not Path(settings.api_ssl_cert_file).is_file():
        raise SettingsError(
            f"api_ssl_cert_file (PREFECT_API_SSL_CERT_FILE): no such file {settings.api_ssl_cert_file}"
        )
    return settings


def read_job_template(path: str) -> dict[str, Any]:
    """A base job template file, as ``prefect work-pool create --base-job-template`` takes it."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"base_job_template: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SettingsError(f"base_job_template: {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not {"job_configuration", "variables"} <= data.keys():
        raise SettingsError(
            f"base_job_template: {path} must be a JSON object with 'job_configuration' and 'variables'"
        )
    return data
