"""Settings: precedence and errors that name the key, the value and the source."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.host.settings import SettingsError, load, validated


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('pool = "from-file"\nlimit = 1\nquery_seconds = 5\nwork_queues = ["a", "b"]\n')
    s = load({"pool": "from-flag"}, {"FLOW_WORKER_LIMIT": "4"}, cfg)
    assert s.pool == "from-flag"
    assert s.limit == 4
    assert s.query_seconds == 5.0
    assert s.work_queues == ("a", "b")


def test_prefect_env_names() -> None:
    s = load(
        {},
        {
            "PREFECT_API_URL": "http://x/api",
            "PREFECT_WORKER_QUERY_SECONDS": "2.5",
            "PREFECT_WORKER_WEBSERVER_PORT": "9000",
        },
    )
    assert s.api_url == "http://x/api"
    assert s.query_seconds == 2.5
    assert s.webserver_port == 9000


def test_bad_value_in_file_names_key_line_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('pool = "p"\n\nlimit = "two"\n')
    with pytest.raises(SettingsError) as info:
        load({}, {}, cfg)
    assert str(info.value) == f"{cfg} line 3: 'limit' = 'two': expected an integer"


def test_unknown_key_in_file(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('pool = "p"\nlimt = 2\n')
    with pytest.raises(SettingsError, match=rf"{cfg} line 2: unknown key 'limt'"):
        load({}, {}, cfg)


def test_bad_env_value_names_variable() -> None:
    with pytest.raises(
        SettingsError,
        match="environment variable FLOW_WORKER_ONCE: 'once' = 'perhaps': expected true or false",
    ):
        load({}, {"FLOW_WORKER_ONCE": "perhaps"})
    with pytest.raises(SettingsError, match="environment variable FLOW_WORKER_LIMT: unknown setting 'limt'"):
        load({}, {"FLOW_WORKER_LIMT": "2"})


def test_validators_name_the_source() -> None:
    with pytest.raises(SettingsError, match="flag --limit: 'limit' = 0: must be greater than 0"):
        load({"limit": 0}, {})
    with pytest.raises(SettingsError, match="flag --name: 'name' = 'a/b'"):
        load({"name": "a/b"}, {})


def test_bad_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text("pool = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load({}, {}, cfg)


def test_missing_api_url() -> None:
    with pytest.raises(SettingsError, match="PREFECT_API_URL is not set"):
        validated(load({"pool": "p"}, {}))


def test_default_name_is_stable() -> None:
    s = load({}, {})
    assert s.worker_name.startswith("ProcessWorker ")
    assert s.worker_name == s.worker_name


def test_optional_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    assert load({"pool": "p"}, {"FLOW_WORKER_CONFIG": f"-{missing}"}).pool == "p"
    with pytest.raises(SettingsError, match="cannot read config file"):
        load({"pool": "p"}, {"FLOW_WORKER_CONFIG": str(missing)})
    present = tmp_path / "p.toml"
    present.write_text("limit = 3\n")
    assert load({}, {"FLOW_WORKER_CONFIG": f"-{present}"}).limit == 3
