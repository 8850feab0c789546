"""Prefect's own settings sources (``worker/host/prefect_sources.py``): read as Prefect 3.9.1
reads them, checked against Prefect itself and against python-dotenv; errors name the file
and the key and never show a secret."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import dotenv
import dotenv.parser
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from worker.host import prefect_sources as ps
from worker.host.settings import FIELDS, SettingsError, load, validated

URL = "http://profile:4200/api"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- .env


def _dotenv_says(text: str, interpolate: bool) -> dict[str, str | None] | None:
    """python-dotenv's reading of ``text``; None if it skips a line it cannot read."""
    if any(b.error for b in dotenv.parser.parse_stream(io.StringIO(text))):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(dotenv.dotenv_values(stream=io.StringIO(text), interpolate=interpolate))


ENV_CHARS = st.sampled_from([*"AB_x=#'\"\\ \t\n\r$:{}-e0", "export ", "${A}", "${ZZ_FW:-d}", "\\n"])
LINE = st.tuples(
    st.sampled_from(["", "export ", "  "]),
    st.sampled_from(["A", "B_1", "'q k'", "PREFECT_API_URL", "prefect_logging_level"]),
    st.sampled_from(["=", " = ", "= ", ""]),
    st.sampled_from(["", "v", "v # c", "'s \\' q'", '"d \\n \\" e"', '"multi\nline"', "${A}", "#x", " #x"]),
    st.sampled_from(["", "  # note", " \t"]),
).map("".join)


@given(st.one_of(st.lists(ENV_CHARS, max_size=40).map("".join), st.lists(LINE, max_size=6).map("\n".join)))
@settings(max_examples=400, deadline=None)
@example("A='never closed\nB=1")
@example('A="x" trailing')
@example("export =1")
def test_dotenv_reads_as_python_dotenv_does(text: str) -> None:
    expected = _dotenv_says(text, interpolate=False)
    if expected is None:
        with pytest.raises(ps.SourceError, match=r"^\.env line \d+: cannot read this line"):
            list(ps.dotenv_bindings(text, ".env"))
        return
    assert {b.key: b.value for b in ps.dotenv_bindings(text, ".env")} == expected


@given(st.lists(LINE, max_size=6).map("\n".join))
@settings(max_examples=200, deadline=None)
def test_dotenv_expands_variables_as_python_dotenv_does(text: str) -> None:
    expected = _dotenv_says(text, interpolate=True)
    if expected is not None:  # ZZ_FW is in neither environment; A is the file's own
        got = ps.parse_dotenv(text, ".env", {k: v for k, v in __import__("os").environ.items()})
        assert {k: b.value for k, b in got.items()} == expected


def test_dotenv_prefect_keys_in_any_case_and_line_numbers() -> None:
    bindings = ps.parse_dotenv(
        "# c\n\nprefect_api_url=http://x\nOTHER=1\nexport PREFECT_API_KEY='k'\n", "/s/.env", {}
    )
    found = ps.dotenv_settings(bindings, "/s/.env")
    assert found["PREFECT_API_URL"] == ps.Found("http://x", "/s/.env line 3", "prefect_api_url")
    assert found["PREFECT_API_KEY"].value == "k" and "OTHER" not in found


# ------------------------------------------------------------------------------- TOML


def test_prefect_toml_tables_are_sections_but_dict_settings() -> None:
    data = ps.parse_toml(
        'home = "/h"\n[api]\nurl = "u"\nrequest_timeout = 5\n[client.custom_headers]\nX-A = "b"\n'
        '[worker.webserver]\nport = 9\n[API]\nURL = "ignored: not a field name"\n',
        "prefect.toml",
    )
    found = ps.table_settings(data, "prefect.toml")
    assert {k: f.value for k, f in found.items()} == {
        "PREFECT_HOME": "/h",
        "PREFECT_API_URL": "u",
        "PREFECT_API_REQUEST_TIMEOUT": 5,
        "PREFECT_CLIENT_CUSTOM_HEADERS": {"X-A": "b"},
        "PREFECT_WORKER_WEBSERVER_PORT": 9,
    }
    assert found["PREFECT_API_URL"].key == "api.url"
    assert ps.env_string({"X-A": "b"}) == '{"X-A": "b"}' and ps.env_string(True) == "True"
    assert ps.env_string(["b", "a"]) == "a,b" and ps.env_string(2.5) == "2.5"


SECRET = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\"'#\\[]"), max_size=30
).map(lambda s: f"k3Y{s}z")
"""A secret (marked so that it cannot be mistaken for a part of the path; without the quotes,
``#`` and brackets that could close the broken lines below)."""
BROKEN = st.sampled_from(
    [
        'PREFECT_API_KEY = "{s}',  # never closed
        "PREFECT_API_KEY = {s!r}\nPREFECT_API_KEY = 'again'",  # twice
        "[profiles.p]\nPREFECT_API_KEY = {s!r} junk",
        "PREFECT_API_KEY = [{s!r}",
    ]
)


@given(SECRET, BROKEN, st.sampled_from(["profiles.toml", "prefect.toml", ".env"]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_bad_file_is_named_and_no_secret_is_shown(
    tmp_path: Path, secret: str, broken: str, name: str
) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    home, start = root / "home", root / "start"
    start.mkdir()
    text = broken.format(s=secret)
    if name == "profiles.toml":
        text = 'active = "p"\n[profiles.p]\n' + text.replace("[profiles.p]\n", "")
    write((home if name == "profiles.toml" else start) / name, text)
    try:
        load({}, {"PREFECT_HOME": str(home)}, start_dir=start)
    except SettingsError as exc:
        message = str(exc)
        assert str((home if name == "profiles.toml" else start) / name) in message
        assert secret not in message and repr(secret) not in message
    else:  # a .env takes the TOML-ish lines as values (then never shown either)
        assert name == ".env"


@pytest.mark.parametrize(
    ("file", "text", "says"),
    [
        (
            "profiles.toml",
            'active = "p"\n[profiles.p]\nPREFECT_API_KEY = 12345\n',
            "[profiles.p]: PREFECT_API_KEY",
        ),
        ("prefect.toml", "[api]\nauth_string = 12345\n", "prefect.toml: api.auth_string"),
        ("pyproject.toml", "[tool.prefect.api]\nkey = 12345\n", "pyproject.toml: tool.prefect.api.key"),
    ],
)
def test_a_secret_of_the_wrong_type_is_named_not_shown(
    tmp_path: Path, file: str, text: str, says: str
) -> None:
    write(tmp_path / file, text)
    with pytest.raises(SettingsError) as info:
        load({}, {"PREFECT_PROFILES_PATH": str(tmp_path / "profiles.toml")}, start_dir=tmp_path)
    assert says in str(info.value) and "(a secret, not shown): expected a string" in str(info.value)
    assert "12345" not in str(info.value)


def test_a_bad_value_names_file_and_key(tmp_path: Path) -> None:
    write(tmp_path / ".env", "\nPREFECT_API_REQUEST_TIMEOUT=soon\n")
    with pytest.raises(SettingsError) as info:
        load({}, {}, start_dir=tmp_path)
    assert (
        str(info.value) == f"{tmp_path}/.env line 2: PREFECT_API_REQUEST_TIMEOUT = 'soon': expected a number"
    )


# ------------------------------------------------------------------------------- profiles


def test_profiles_path_in_prefects_order(tmp_path: Path) -> None:
    dotenv_ = ps.parse_dotenv("PREFECT_PROFILES_PATH=/from/dotenv\n", ".env", {})
    toml, tool = {"profiles_path": "/from/toml"}, {"profiles_path": "/from/pyproject"}
    env = {"PREFECT_PROFILES_PATH": "/from/env", "PREFECT_HOME": "/home/p"}
    home = tmp_path
    assert ps.profiles_path(env, dotenv_, toml, tool, home) == Path("/from/env")
    env.pop("PREFECT_PROFILES_PATH")
    assert ps.profiles_path(env, dotenv_, toml, tool, home) == Path("/from/dotenv")
    assert ps.profiles_path(env, {}, toml, tool, home) == Path("/from/toml")
    assert ps.profiles_path(env, {}, {}, tool, home) == Path("/from/pyproject")
    assert ps.profiles_path(env, {}, {}, {}, home) == Path("/home/p/profiles.toml")
    assert ps.profiles_path({}, {}, {}, {}, home) is None  # no ~/.prefect/profiles.toml
    write(home / ".prefect" / "profiles.toml", "")
    assert ps.profiles_path({}, {}, {}, {}, home) == home / ".prefect" / "profiles.toml"
    with pytest.raises(ps.SourceError, match=r"prefect\.toml's profiles_path must be a path"):
        ps.profiles_path({}, {}, {"profiles_path": 3}, {}, home)


def test_profile_selection(tmp_path: Path) -> None:
    profiles = write(
        tmp_path / "home" / "profiles.toml",
        f'active = "a"\n[profiles.a]\nPREFECT_API_URL = "{URL}"\nNOT_PREFECT = "x"\n'
        '[profiles.b]\nPREFECT_API_URL = "http://b/api"\nPREFECT_LOGGING_LEVEL = "DEBUG"\n',
    )
    env = {"PREFECT_HOME": str(profiles.parent)}
    start = tmp_path / "start"
    start.mkdir()
    a = ps.read(env, start, None)
    assert a.values["PREFECT_API_URL"].value == URL and "NOT_PREFECT" not in a.values
    assert a.read == (f"profile 'a' in {profiles}",)
    b = ps.read({**env, "PREFECT_PROFILE": "b"}, start, None)
    assert b.child_env({}) == {"PREFECT_API_URL": "http://b/api", "PREFECT_LOGGING_LEVEL": "DEBUG"}
    assert b.child_env({"PREFECT_LOGGING_LEVEL": "INFO"}) == {"PREFECT_API_URL": "http://b/api"}
    flagged = ps.read({**env, "PREFECT_LOGGING_LEVEL": "INFO"}, start, None, profile="b")
    assert flagged.child_env({"PREFECT_LOGGING_LEVEL": "INFO"})["PREFECT_LOGGING_LEVEL"] == "DEBUG"
    assert ps.read({**env, "PREFECT_TEST_MODE": "1"}, start, None).values == {}
    with pytest.raises(
        ps.SourceError, match=rf"{profiles}: no profile 'c' \(selected\); its profiles: 'a', 'b'"
    ):
        ps.read({**env, "PREFECT_PROFILE": "c"}, start, None)
    write(profiles, 'active = "gone"\n[profiles.a]\n')
    with pytest.raises(ps.SourceError, match=r"no profile 'gone' \(the file's 'active'\)"):
        ps.read(env, start, None)
    write(profiles, "[profiles]\na = 1\n")
    assert ps.read(env, start, None).values == {}  # nothing active: no profile
    with pytest.raises(ps.SourceError, match=r"'profiles.a' must be a table"):
        ps.read({**env, "PREFECT_PROFILE": "a"}, start, None)


def test_settings_take_prefects_sources_in_prefects_order(tmp_path: Path) -> None:
    home, start = tmp_path / "home", tmp_path / "start"
    write(home / "profiles.toml", f'active = "p"\n[profiles.p]\nPREFECT_API_URL = "{URL}"\n')
    env = {"PREFECT_HOME": str(home)}
    assert load({}, env, start_dir=start).api_url == URL
    write(start / "pyproject.toml", '[tool.prefect.api]\nurl = "http://pyproject/api"\n')
    assert load({}, env, start_dir=start).api_url == "http://pyproject/api"
    write(start / "prefect.toml", '[api]\nurl = "http://toml/api"\n')
    assert load({}, env, start_dir=start).api_url == "http://toml/api"
    write(start / ".env", "PREFECT_API_URL=http://dotenv/api\n")
    assert load({}, env, start_dir=start).api_url == "http://dotenv/api"
    cfg = write(tmp_path / "fw.toml", 'api_url = "http://config/api"\n')
    assert load({}, env, cfg, start_dir=start).api_url == "http://config/api"
    assert load({}, {**env, "PREFECT_API_URL": "http://env/api"}, cfg, start_dir=start).api_url == (
        "http://env/api"
    )
    flagged = load({}, {**env, "PREFECT_API_URL": "http://env/api"}, cfg, start_dir=start, profile="p")
    assert flagged.api_url == URL  # `--profile`: its values win, as `prefect --profile p` does
    assert flagged.child_prefect_env()["PREFECT_API_URL"] == URL


def test_what_reaches_the_flows(tmp_path: Path) -> None:
    home, start = tmp_path / "home", tmp_path / "start"
    write(
        home / "profiles.toml",
        f'active = "p"\n[profiles.p]\nPREFECT_API_URL = "{URL}"\nPREFECT_API_KEY = "k"\n',
    )
    write(start / "prefect.toml", "[results]\npersist_by_default = true\n[logging]\nlevel = 'DEBUG'\n")
    s = load({}, {"PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "INFO"}, start_dir=start)
    assert s.child_prefect_env() == {
        "PREFECT_API_URL": URL,
        "PREFECT_API_KEY": "k",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "True",
    }  # the environment's own PREFECT_LOGGING_LEVEL wins: not passed over it


def test_no_api_url_says_where_it_looked(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write(home / "profiles.toml", 'active = "p"\n[profiles.p]\nPREFECT_LOGGING_LEVEL = "DEBUG"\n')
    with pytest.raises(SettingsError) as info:
        validated(load({"pool": "p"}, {"PREFECT_HOME": str(home)}, start_dir=tmp_path))
    assert "PREFECT_API_URL is not set" in str(info.value)
    assert f"read: profile 'p' in {home}/profiles.toml" in str(info.value)
    assert "prefect config set PREFECT_API_URL=" in str(info.value)


# ------------------------------------------------------------------------------- against Prefect

PREFECTS_VIEW = """
import json, os, sys
from prefect.settings.models.root import Settings
out = []
for case in json.loads(sys.argv[1]):
    os.chdir(case["start"])
    for k in [k for k in os.environ if k.startswith("PREFECT_")]:
        del os.environ[k]
    os.environ.update(case["env"])
    out.append(Settings().to_environment_variables(exclude_unset=True))
print(json.dumps(out))
"""


def _same(ours: dict[str, str], prefects: dict[str, str], env: dict[str, str]) -> None:
    theirs = {k: v for k, v in prefects.items() if k not in env}
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():  # Prefect writes its parsed value: "11" → "11.0", "true" → "True"
        try:
            assert float(value) == float(theirs[key]), key
        except ValueError:
            assert value.lower() == theirs[key].lower(), key


def test_what_flows_get_is_what_prefects_worker_passes(tmp_path: Path) -> None:
    """Prefect's worker layers ``to_environment_variables(exclude_unset=True)`` into a run's
    environment (``workers/base.py``); flow-worker passes the same settings."""
    home, start, other = tmp_path / "home", tmp_path / "start", tmp_path / "other"
    other.mkdir()
    write(
        home / "profiles.toml",
        'active = "p1"\n[profiles.p1]\nPREFECT_API_URL = "http://p1/api"\nPREFECT_LOGGING_LEVEL = "DEBUG"\n'
        'PREFECT_WORKER_QUERY_SECONDS = "11"\nPREFECT_RESULTS_PERSIST_BY_DEFAULT = "false"\n'
        '[profiles.p2]\nPREFECT_API_URL = "http://p2/api"\nPREFECT_API_KEY = "secret-key"\n',
    )
    write(start / ".env", "PREFECT_LOGGING_LEVEL=ERROR\nexport PREFECT_CLIENT_MAX_RETRIES='3'\n")
    write(
        start / "prefect.toml",
        "[results]\npersist_by_default = true\n[tasks]\ndefault_retries = 1\n"
        '[client.custom_headers]\nX-Team = "data"\n',
    )
    write(
        start / "pyproject.toml",
        "[tool.prefect.tasks]\ndefault_retries = 2\n[tool.prefect.worker]\nquery_seconds = 13\n",
    )
    base = {"PREFECT_HOME": str(home), "PREFECT_CLIENT_MAX_RETRIES": "7"}
    cases = [
        {"start": str(start), "env": base},
        {"start": str(other), "env": base},
        {"start": str(other), "env": {**base, "PREFECT_PROFILE": "p2"}},
        {"start": str(other), "env": {"PREFECT_PROFILES_PATH": str(home / "profiles.toml")}},
    ]
    done = subprocess.run(
        [sys.executable, "-c", PREFECTS_VIEW, json.dumps(cases)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for case, prefects in zip(cases, json.loads(done.stdout.splitlines()[-1]), strict=True):
        ours = ps.read(case["env"], Path(case["start"]), None).child_env(case["env"])
        _same(ours, prefects, case["env"])


def test_parsing_never_fails_but_with_a_source_error() -> None:
    @given(st.text(max_size=200), st.sampled_from(["profiles", "toml", "dotenv"]))
    @settings(max_examples=300, deadline=None)
    def check(text: str, kind: str) -> None:
        try:
            if kind == "dotenv":
                ps.dotenv_settings(ps.parse_dotenv(text, "f", {}), "f")
                return
            data: Any = ps.parse_toml(text, "f")
            if kind == "profiles":
                ps.profile_settings(data, "f", None)
            else:
                ps.table_settings(ps.tool_prefect(data, "f"), "f")
        except ps.SourceError as exc:
            assert str(exc).startswith("f")

    check()


DOTTED = {
    "PREFECT_API_URL": "api.url",
    "PREFECT_API_KEY": "api.key",
    "PREFECT_API_AUTH_STRING": "api.auth_string",
    "PREFECT_API_SSL_CERT_FILE": "api.ssl_cert_file",
    "PREFECT_API_TLS_INSECURE_SKIP_VERIFY": "api.tls_insecure_skip_verify",
    "PREFECT_API_REQUEST_TIMEOUT": "api.request_timeout",
    "PREFECT_CLIENT_CUSTOM_HEADERS": "client.custom_headers",
    "PREFECT_LOGGING_TO_API_ENABLED": "logging.to_api.enabled",
    "PREFECT_WORKER_PREFETCH_SECONDS": "worker.prefetch_seconds",
    "PREFECT_WORKER_QUERY_SECONDS": "worker.query_seconds",
    "PREFECT_WORKER_HEARTBEAT_SECONDS": "worker.heartbeat_seconds",
    "PREFECT_WORKER_WEBSERVER_HOST": "worker.webserver.host",
    "PREFECT_WORKER_WEBSERVER_PORT": "worker.webserver.port",
}
"""Where Prefect 3.9.1's models put each setting flow-worker reads, in ``prefect.toml``."""
SETTINGS = sorted(
    (var, key, bool(f.metadata["secret"])) for key, f in FIELDS.items() for var in f.metadata["env"]
)
TOML_VALUES = st.one_of(
    st.integers(-5, 10**9),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
)


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {v}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML refuses a raw DEL


def test_every_setting_read_from_prefects_sources_is_known() -> None:
    assert {var for var, _, _ in SETTINGS} == set(DOTTED)
    found = ps.table_settings(ps.parse_toml("\n".join(f"{d} = 1" for d in DOTTED.values()), "t"), "t")
    assert {name: f.key for name, f in found.items()} == DOTTED


@given(st.sampled_from(SETTINGS), TOML_VALUES, st.sampled_from(["profiles.toml", "prefect.toml"]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_value_of_a_setting_is_taken_or_named(
    tmp_path: Path, setting: tuple[str, str, bool], value: Any, file: str
) -> None:
    var, key, secret = setting
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    if file == "profiles.toml":
        text, label = f'active = "p"\n[profiles.p]\n{var} = {toml_value(value)}\n', f"[profiles.p]: {var}"
    else:
        text, label = f"{DOTTED[var]} = {toml_value(value)}\n", f"prefect.toml: {DOTTED[var]}"
    path = write(root / file, text)
    try:
        s = load({}, {"PREFECT_PROFILES_PATH": str(root / "profiles.toml")}, start_dir=root)
    except SettingsError as exc:
        message = str(exc)
        assert message.startswith(f"{path}") and label in message, message
        if secret:
            assert message.split(label, 1)[1].startswith(" (a secret, not shown): "), message
        return
    # taken; or an empty string (unset), or a table in prefect.toml (a section there, as for Prefect)
    assert getattr(s, key) is not None or value == "" or (isinstance(value, dict) and file == "prefect.toml")


def test_a_profile_asked_for_must_exist(tmp_path: Path) -> None:
    env = {"PREFECT_HOME": str(tmp_path / "home")}
    with pytest.raises(
        SettingsError, match=rf"--profile 'prod': there is no profiles file \(no {tmp_path}/home/"
    ):
        load({}, env, start_dir=tmp_path, profile="prod")
    write(tmp_path / "home" / "profiles.toml", '[profiles.dev]\nPREFECT_API_URL = "http://dev/api"\n')
    with pytest.raises(SettingsError, match=r"no profile 'prod' \(selected\); its profiles: 'dev'"):
        load({}, env, start_dir=tmp_path, profile="prod")
    assert load({}, env, start_dir=tmp_path, profile="dev").api_url == "http://dev/api"
