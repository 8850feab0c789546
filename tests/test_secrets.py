"""Secrets stay secret (issue 24): a secret setting in a wrong shape is named by key and
source, never quoted; templated values are masked where a command is said; files holding
a secret that others can read are found. A run's environment holds none of the service
manager's variables, nor the worker's settings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import cli
from worker.host import private
from worker.host.settings import FIELDS, SettingsError, load
from worker.rules import childenv, secrecy, templating
from worker.rules.job import ConfigurationError, ProcessJobConfiguration
from worker.rules.models import FlowRun

SECRET = "s3cr3t-VALUE-4242"
"""Every wrong-shaped secret below holds this (or is this number), so one check finds any echo."""
NUMBER = 4242424242424242

TOML_CASES = [
    ("api_key", f'api_key = {{ value = "{SECRET}" }}', "expected a string"),
    ("api_key", f"api_key = {NUMBER}", "expected a string"),
    ("api_key", f'api_key = "{SECRET} with spaces"', "printable ASCII without spaces"),
    ("api_auth_string", f'api_auth_string = ["user:{SECRET}"]', "expected a string"),
    ("api_auth_string", f"api_auth_string = {NUMBER}", "expected a string"),
    (
        "client_custom_headers",
        f'client_custom_headers = {{ CF-Access-Client-Secret = "{SECRET}", X-Count = {NUMBER} }}',
        "header 'X-Count': its value must be a string, not int",
    ),
    ("client_custom_headers", f"client_custom_headers = {NUMBER}", "expected a table or a JSON object"),
    ("client_custom_headers", f'client_custom_headers = ["{SECRET}"]', "expected a table or a JSON object"),
    ("client_custom_headers", f'client_custom_headers = {{ "bad name" = "{SECRET}" }}', "header 1 is not"),
    ("client_custom_headers", f'client_custom_headers = \'{{"X-Key": "{SECRET}\\n"}}\'', "line break"),
    ("client_custom_headers", f"client_custom_headers = 'not json {SECRET}'", "is not JSON: Expecting value"),
    (
        "client_custom_headers",
        f"client_custom_headers = '[\"{SECRET}\"]'",
        "must be a JSON object of strings",
    ),
]
ENV_CASES = [
    ("PREFECT_API_KEY", f"{SECRET}\nInjected: header", "printable ASCII without spaces"),
    ("FLOW_WORKER_API_KEY", f"sécret-{SECRET}", "printable ASCII without spaces"),
    ("PREFECT_API_AUTH_STRING", f"user:{SECRET}\udcff", "cannot be encoded as UTF-8"),
    ("PREFECT_CLIENT_CUSTOM_HEADERS", json.dumps({"X-Count": NUMBER}), "not int"),
    ("PREFECT_CLIENT_CUSTOM_HEADERS", json.dumps({"X-Key": f"{SECRET}\r\nX-Evil: 1"}), "line break"),
    ("FLOW_WORKER_CLIENT_CUSTOM_HEADERS", f'{{"X-Key": "{SECRET}"', "is not JSON"),
    ("PREFECT_CLIENT_CUSTOM_HEADERS", json.dumps([SECRET]), "must be a JSON object of strings"),
]


def leaks(text: str) -> bool:
    return SECRET in text or str(NUMBER) in text


@pytest.fixture(autouse=True)
def no_settings_from_the_test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cli.main`` reads the environment: only what a test sets counts."""
    for name in [*os.environ]:
        if name.startswith(("PREFECT_", "FLOW_WORKER_")):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(("key", "line", "why"), TOML_CASES)
def test_a_secret_in_a_wrong_shape_in_the_file_is_named_not_shown(
    key: str, line: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "worker.toml"
    cfg.write_text(f'pool = "p"\napi_url = "http://127.0.0.1:9/api"\n{line}\n')
    with pytest.raises(SettingsError) as raised:
        load({}, {}, cfg)
    said = str(raised.value)
    assert said.startswith(f"{cfg} line 3: '{key}' (a secret, not shown): ") and why in said, said
    assert not leaks(said) and not leaks(repr(raised.value))
    assert cli.main(["--config", str(cfg)]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert err == f"flow-worker: {said}\n" and not leaks(out + err)


@pytest.mark.parametrize(("variable", "value", "why"), ENV_CASES)
def test_a_secret_in_a_wrong_shape_in_the_environment_is_named_not_shown(
    variable: str, value: str, why: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = next(k for k, f in FIELDS.items() if variable in (*f.metadata["env"], f"FLOW_WORKER_{k.upper()}"))
    with pytest.raises(SettingsError) as raised:
        load({}, {"PREFECT_API_URL": "http://127.0.0.1:9/api", variable: value})
    said = str(raised.value)
    assert (
        said.startswith(f"environment variable {variable}: '{key}' (a secret, not shown): ") and why in said
    )
    assert not leaks(said)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv(variable, value)
    assert cli.main(["--pool", "p"]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert err == f"flow-worker: {said}\n" and not leaks(out + err)


def test_headers_as_a_toml_table_work_and_secrets_stay_out_of_repr(tmp_path: Path) -> None:
    cfg = tmp_path / "worker.toml"
    cfg.write_text(
        f'api_key = "{SECRET}"\nclient_custom_headers = {{ CF-Access-Client-Secret = "{SECRET}" }}\n'
    )
    settings = load({}, {}, cfg)
    assert settings.custom_headers() == {"CF-Access-Client-Secret": SECRET}
    assert settings.child_prefect_env()["PREFECT_API_KEY"] == SECRET, "flows still get what they need"
    assert settings.config_file == str(cfg)
    assert not leaks(repr(settings)) and "api_key='********'" in repr(settings)
    assert {k for k, f in FIELDS.items() if f.repr is secrecy.masked_repr} == secrecy.SECRET_SETTINGS


def test_the_secret_variables_are_the_settings_variables() -> None:
    named = {
        v for k in secrecy.SECRET_SETTINGS for v in (*FIELDS[k].metadata["env"], f"FLOW_WORKER_{k.upper()}")
    }
    assert named == secrecy.SECRET_VARIABLES


MARKED = st.text(min_size=4).map(lambda text: f"Zq9{text}")
"""A value no message of ours could contain unless it quoted it."""


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.one_of(MARKED, st.integers(min_value=10**8), st.lists(MARKED, max_size=2)),
        max_size=4,
    )
)
def test_no_header_problem_quotes_a_value(headers: dict[str, Any]) -> None:
    problem = secrecy.headers_problem(json.dumps(headers))
    for value in headers.values():
        assert problem is None or (json.dumps(value) not in problem and str(value) not in problem)


@given(st.one_of(MARKED, st.integers(min_value=10**8), st.dictionaries(st.text(), MARKED)))
def test_no_settings_error_quotes_a_secret(value: Any) -> None:
    for key in sorted(secrecy.SECRET_SETTINGS):
        try:
            load({key: value}, {})
        except SettingsError as exc:
            shown = [str(value)] + ([str(v) for v in value.values()] if isinstance(value, dict) else [])
            assert not any(s in str(exc) for s in shown), str(exc)


# ---------------------------------------------------------------- files others can read


def test_a_config_file_holding_a_secret_that_others_can_read_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(private, "ENV_DIR", tmp_path)
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'pool = "p"\napi_key = "{SECRET}"\n')
    env_file = tmp_path / "p.env"
    env_file.write_text(f"PREFECT_API_URL=http://x/api\nPREFECT_API_AUTH_STRING=u:{SECRET}\n")
    for path in (cfg, env_file):
        path.chmod(0o644)
    assert private.exposed_secrets(str(cfg), "p", {}) == [
        (str(cfg), 0o644, ["api_key"]),
        (str(env_file), 0o644, ["PREFECT_API_AUTH_STRING"]),
    ]
    cfg.chmod(0o640)
    env_file.chmod(0o600)
    assert private.exposed_secrets(str(cfg), "p", {}) == [(str(cfg), 0o640, ["api_key"])]
    cfg.chmod(0o600)
    assert private.exposed_secrets(str(cfg), "p", {}) == []
    cfg.write_text('pool = "p"\nlimit = 2\n')
    cfg.chmod(0o644)
    assert private.exposed_secrets(str(cfg), "other-pool", {}) == [], "no secret in it, no env file"


# ---------------------------------------------------------------- templated values, masked


class Blocks:
    def __init__(self, blocks: dict[tuple[str, str], Any]) -> None:
        self.blocks = blocks

    async def read_block_document_by_name(self, slug: str, name: str) -> Any:
        return self.blocks.get((slug, name))

    async def read_block_document_by_id(self, block_id: str) -> Any:
        return None

    async def read_variable_value(self, name: str) -> Any:
        return templating.MISSING


TEMPLATE = {
    "job_configuration": {"command": "{{ command }} --token {{ $FW_TOKEN }}", "env": "{{ env }}"},
    "variables": {"properties": {"command": {"type": "string"}, "env": {"type": "object"}}},
}


async def test_what_came_from_blocks_and_env_references_is_masked() -> None:
    password, port = "{{ prefect.blocks.secret.db }}", "{{ prefect.blocks.json.cfg.port }}"
    values = {"command": f"deploy --password {password} --port {port}"}
    blocks = Blocks({("secret", "db"): {"value": SECRET}, ("json", "cfg"): {"port": 5432, "debug": True}})
    config = await ProcessJobConfiguration.from_template_and_values(
        TEMPLATE, values, blocks, environ={"FW_TOKEN": "env-token-77"}
    )
    assert config.command == f"deploy --password {SECRET} --port 5432 --token env-token-77"
    assert config.mask(config.command) == "deploy --password ******** --port ******** --token ********"
    assert "True" not in config.hidden, "booleans hide nothing and are everywhere"


async def test_a_configuration_error_masks_what_it_quotes() -> None:
    values = {"command": "{{ prefect.blocks.json.cfg }}"}  # a whole object where a string goes
    blocks = Blocks({("json", "cfg"): {"password": SECRET}})
    whole = {**TEMPLATE, "job_configuration": {"command": "{{ command }}"}}
    with pytest.raises(ConfigurationError) as raised:
        await ProcessJobConfiguration.from_template_and_values(whole, values, blocks, environ={})
    assert SECRET not in str(raised.value) and "********" in str(raised.value)


def test_mask_takes_the_longest_first_and_leaves_short_values() -> None:
    assert secrecy.mask("a abc abcdef abcdefgh", {"abcdef", "abcdefgh", "abc"}) == "a abc ******** ********"


# ---------------------------------------------------------------- the run's environment


def test_a_run_inherits_neither_the_service_managers_variables_nor_the_workers_settings() -> None:
    worker_env = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        **{name: "x" for name in childenv.SERVICE_MANAGER},
        "FLOW_WORKER_STATE_DIR": "/var/lib/flow-worker/p",
        "FLOW_WORKER_API_KEY": SECRET,
    }
    config = ProcessJobConfiguration(command="true", env={"FLOW_WORKER_CHOSEN": "by the job", "FOO": "bar"})
    config.prepare_for_flow_run(
        FlowRun("run-1", "r"), environ=worker_env, settings_env={"PREFECT_API_URL": "http://x/api"}
    )
    assert config.env == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "PREFECT_API_URL": "http://x/api",
        "PREFECT__FLOW_RUN_ID": "run-1",
        "FLOW_WORKER_CHOSEN": "by the job",
        "FOO": "bar",
    }
