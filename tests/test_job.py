"""The job configuration against cases recorded from Prefect 3.9.1's own implementation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.rules import templating
from worker.rules.job import (
    ConfigurationError,
    ProcessJobConfiguration,
    merge_job_variables,
)
from worker.rules.models import Deployment, Flow, FlowRun, WorkPool
from worker.rules.variables import ProcessVariables

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "job_cases.json").read_text())
CASES = FIXTURES["cases"]


class FixtureResolver:
    """The blocks and variables that existed when the cases were recorded."""

    def __init__(self) -> None:
        self.blocks = {(b["slug"], b["name"]): b["data"] for b in FIXTURES["blocks"]}
        self.block_ids: dict[str, Any] = FIXTURES["block_ids"]
        self.variables: dict[str, Any] = FIXTURES["variables"]

    async def read_block_document_by_name(self, slug: str, name: str) -> Any:
        return self.blocks.get((slug, name))

    async def read_block_document_by_id(self, block_id: str) -> Any:
        return self.block_ids.get(block_id)

    async def read_variable_value(self, name: str) -> Any:
        return self.variables.get(name, templating.MISSING)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
async def test_matches_prefect(case: dict[str, Any]) -> None:
    expected = case["expected"]
    if "error" in expected:
        with pytest.raises(ConfigurationError) as info:
            await ProcessJobConfiguration.from_template_and_values(
                case["template"], case["values"], FixtureResolver(), environ=FIXTURES["environ"]
            )
        assert str(info.value), "a configuration error must say what is wrong"
        return
    cfg = await ProcessJobConfiguration.from_template_and_values(
        case["template"], case["values"], FixtureResolver(), environ=FIXTURES["environ"]
    )
    got = {
        "command": cfg.command,
        "env": cfg.env,
        "labels": cfg.labels,
        "name": cfg.name,
        "stream_output": cfg.stream_output,
        "working_dir": None if cfg.working_dir is None else str(cfg.working_dir),
    }
    assert got == expected


def test_default_template_is_prefects() -> None:
    assert ProcessJobConfiguration.default_base_job_template() == FIXTURES["default_base_job_template"]
    shared = Path(__file__).parents[2] / "shared" / "process-base-job-template.json"
    if shared.exists():
        assert json.loads(shared.read_text())["base_job_template"] == FIXTURES["default_base_job_template"]


async def test_error_messages_name_the_problem() -> None:
    resolver = FixtureResolver()
    tmpl = ProcessJobConfiguration.default_base_job_template()
    with pytest.raises(ConfigurationError, match=r"'labels\.a' must be a string"):
        await ProcessJobConfiguration.from_template_and_values(tmpl, {"labels": {"a": 1}}, resolver)
    with pytest.raises(ConfigurationError, match="block not found: 'nope' of type 'secret'"):
        await ProcessJobConfiguration.from_template_and_values(
            tmpl, {"env": {"S": "{{ prefect.blocks.secret.nope }}"}}, resolver
        )
    with pytest.raises(ConfigurationError, match="'stream_output' must be a boolean"):
        await ProcessJobConfiguration.from_template_and_values(tmpl, {"stream_output": "maybe"}, resolver)


def test_merge_job_variables_env_key_by_key() -> None:
    merged = merge_job_variables(
        {"env": {"FOO": "dep", "BAR": "dep"}, "command": "a"},
        {"env": {"BAR": "run"}, "command": "b"},
    )
    assert merged == {"env": {"FOO": "dep", "BAR": "run"}, "command": "b"}


def _objects() -> tuple[FlowRun, Deployment, Flow, WorkPool]:
    run = FlowRun(id="r1", name="happy-cat", flow_id="f1", deployment_id="d1")
    dep = Deployment(id="d1", name="dep", updated="2026-01-01T00:00:00+00:00")
    return run, dep, Flow(id="f1", name="hello"), WorkPool(id="p1", name="pool")


def test_prepare_for_flow_run_env_layers() -> None:
    run, dep, flow, pool = _objects()
    cfg = ProcessJobConfiguration(env={"JOB": "j", "PREFECT_API_URL": "from-job", "DROP": None})
    cfg.prepare_for_flow_run(
        run,
        dep,
        flow,
        pool,
        "w1",
        environ={"INHERITED": "i", "DROP": "inherited", "PREFECT_API_URL": "env"},
        settings_env={"PREFECT_API_URL": "settings"},
        python="/py",
    )
    assert cfg.env["INHERITED"] == "i"
    assert "DROP" not in cfg.env  # null unsets an inherited variable
    assert cfg.env["PREFECT_API_URL"] == "from-job"  # job env wins over settings
    assert cfg.env["PREFECT__FLOW_RUN_ID"] == "r1"
    assert cfg.env["PREFECT__DEPLOYMENT_NAME"] == "dep"
    assert cfg.env["PREFECT__FLOW_NAME"] == "hello"
    assert cfg.env["PREFECT__WORKER_NAME"] == "w1"
    assert cfg.command == "/py -m prefect.engine"
    assert not cfg.command_configured
    assert cfg.name == "happy-cat"
    assert cfg.labels["prefect.io/deployment-updated"] == "2026-01-01T00:00:00+00:00"
    assert cfg.labels["prefect.io/work-pool-name"] == "pool"


def test_prepare_keeps_configured_command_and_renders_name() -> None:
    run, dep, flow, pool = _objects()
    cfg = ProcessJobConfiguration(
        command="sh -c 'exit 3'", name="{{ ctx.flow.name }}-{{ ctx.flow_run.name }}"
    )
    cfg.prepare_for_flow_run(run, dep, flow, pool, "w1", environ={})
    assert cfg.command_configured
    assert cfg.argv() == ["sh", "-c", "exit 3"]
    assert cfg.name == "hello-happy-cat"


def test_is_using_a_runner() -> None:
    assert ProcessJobConfiguration(command="prefect flow-run execute x").is_using_a_runner
    assert not ProcessJobConfiguration(command="python -m prefect.engine").is_using_a_runner


def test_variables_schema_has_every_field() -> None:
    assert set(ProcessVariables.model_json_schema()["properties"]) == set(ProcessJobConfiguration.FIELDS)
