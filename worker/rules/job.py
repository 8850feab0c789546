"""The process job configuration: a work pool template plus job variables → what to spawn.

This is Prefect's ``ProcessJobConfiguration`` / ``ProcessVariables`` API with attrs
instead of pydantic. Nothing here does I/O of its own: the block and variable lookups
that templates may need go through an injected :class:`Resolver` (the API client in
production, a dict in tests), and the worker's environment is passed in.

Field validation follows pydantic's lax mode, as Prefect's model does, because users'
existing deployments were written against it: a string field refuses a number, ``env``
values are turned into strings, ``stream_output`` takes the usual boolean spellings.
Every failure is a :class:`ConfigurationError` naming the field, which the supervisor
reports as the run's CRASHED message.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol

import attrs

from worker.rules import childenv, limits, runlimits, secrecy, templating
from worker.rules.models import Deployment, Flow, FlowRun, WorkPool
from worker.rules.variables import ProcessVariables

PREFECT_VERSION: Final = "3.9.1"
"""The Prefect version whose behaviour (and labels) flow-worker reproduces."""


class ConfigurationError(ValueError):
    """The run's job configuration is invalid: the deployment's, run's or pool's fault.

    The message names the field or placeholder so the user can fix it in the UI.
    """


class Resolver(Protocol):
    """Fetches what templates refer to. ``None`` means "does not exist"."""

    async def read_block_document_by_name(self, slug: str, name: str) -> dict[str, Any] | None: ...

    async def read_block_document_by_id(self, block_id: str) -> dict[str, Any] | None: ...

    async def read_variable_value(self, name: str) -> Any: ...  # templating.MISSING if absent


# ---------------------------------------------------------------- field coercion (lax mode)

_TRUE: Final = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE: Final = frozenset({"0", "off", "f", "false", "n", "no"})


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _opt_str(field: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ConfigurationError(f"job variable {field!r} must be a string or null, got {_describe(value)}")


def _to_bool(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError(f"job variable {field!r} must be a boolean, got {_describe(value)}")


def _to_env(value: Any) -> dict[str, str | None]:
    """``env`` as strings: numbers and booleans are written out (lax mode), a list or an
    object is refused; then what the OS would refuse (``limits.py``)."""
    if not isinstance(value, dict):
        raise ConfigurationError(f"job variable 'env' must be an object, got {_describe(value)}")
    env: dict[str, str | None] = {}
    for k, v in value.items():
        if v is not None and not isinstance(v, str | int | float | bool):
            # the type only: the value may be a block's secret, and this goes to the UI
            raise ConfigurationError(
                f"job variable 'env.{k}' must be a string or null, got {type(v).__name__}"
            )
        env[str(k)] = None if v is None else str(v)
    problem = next(limits.env_problems(env), None)
    if problem is not None:
        raise ConfigurationError(problem)
    return env


def _to_labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigurationError(f"job variable 'labels' must be an object, got {_describe(value)}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise ConfigurationError(f"job variable 'labels.{k}' must be a string, got {_describe(v)}")
    return dict(value)


def _to_path(value: Any) -> Path | None:
    if value is None:
        return None
    if isinstance(value, str | Path):
        path = ProcessJobConfiguration.validate_working_dir(value)
        problem = limits.working_dir_problem(path)
        if problem is not None:
            raise ConfigurationError(problem)
        return path
    raise ConfigurationError(f"job variable 'working_dir' must be a path or null, got {_describe(value)}")


# ---------------------------------------------------------------- the configuration


@attrs.define
class ProcessJobConfiguration:
    """Everything needed to spawn one flow run's process."""

    command: str | None = None
    env: dict[str, str | None] = attrs.Factory(dict)
    labels: dict[str, str] = attrs.Factory(dict)
    name: str | None = None
    stream_output: bool = True
    working_dir: Path | None = None
    command_configured: bool = False
    """Whether the user set ``command`` (else the engine command was generated)."""
    hidden: frozenset[str] = attrs.field(default=frozenset(), repr=False)
    """What the configuration may have taken from blocks and ``{{ $NAME }}`` references:
    masked wherever the command, or a message built from it, is said (:meth:`mask`)."""
    pull_steps: Any = None
    """The deployment's: where they leave the flow decides its ``PYTHONPATH`` (``launch.py``)."""
    limits: dict[str, Any] = attrs.Factory(dict)
    """The run's resource limits the configuration sets, as written (``runlimits.py`` reads them)."""

    FIELDS: ClassVar[tuple[str, ...]] = (
        "command",
        "env",
        "labels",
        "name",
        "stream_output",
        "working_dir",
    )

    @classmethod
    def json_template(cls) -> dict[str, str]:
        """The ``job_configuration`` half of the default template: ``{field: "{{ field }}"}``."""
        return {f: "{{ " + f + " }}" for f in cls.FIELDS}

    @classmethod
    def default_base_job_template(cls) -> dict[str, Any]:
        return {
            "job_configuration": cls.json_template(),
            "variables": ProcessVariables.model_json_schema(),
        }

    @staticmethod
    def validate_working_dir(value: str | Path) -> Path:
        """The working directory as a path (existence is checked when the process starts)."""
        return Path(value)

    @property
    def is_using_a_runner(self) -> bool:
        return self.command is not None and "prefect flow-run execute" in self.command

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessJobConfiguration:
        """Validate a populated ``job_configuration``; unknown keys are ignored."""
        command = _opt_str("command", data.get("command"))
        return cls(
            command=command or None,
            env=_to_env(data["env"]) if "env" in data else {},
            labels=_to_labels(data["labels"]) if "labels" in data else {},
            name=_opt_str("name", data.get("name")),
            stream_output=_to_bool("stream_output", data["stream_output"])
            if "stream_output" in data
            else True,
            working_dir=_to_path(data.get("working_dir")),
            limits={k: data[k] for k in runlimits.NAMES if data.get(k) is not None},
        )

    @staticmethod
    def populate(
        base_job_template: Mapping[str, Any],
        values: Mapping[str, Any],
        environ: Mapping[str, str],
    ) -> Any:
        """Pass 1 of the templating (pure): defaults, merged values and ``env``."""
        job_config = (
            base_job_template.get("job_configuration") if isinstance(base_job_template, Mapping) else None
        )
        schema = base_job_template.get("variables") if isinstance(base_job_template, Mapping) else None
        if not isinstance(job_config, dict) or not isinstance(schema, dict):
            raise ConfigurationError(
                "the work pool's base job template must be an object with 'job_configuration' "
                "and 'variables' objects"
            )
        job_config = dict(job_config)
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise ConfigurationError("the work pool's 'variables.properties' is not an object")
        variables = {
            k: v["default"]
            for k, v in properties.items()
            if isinstance(v, dict) and v.get("default") is not None
        }
        if variables.get("env"):
            if not isinstance(variables["env"], dict):
                raise ConfigurationError(
                    f"the work pool's default for 'env' must be an object, got {_describe(variables['env'])}"
                )
            if isinstance(job_config.get("env"), dict):
                job_config["env"] = job_config["env"] | variables["env"]
            else:
                job_config["env"] = variables["env"]
        try:
            variables.update(templating.expand_dotted(values))
        except templating.TemplateError as exc:
            raise ConfigurationError(str(exc)) from None
        if isinstance(job_config.get("env"), dict) and variables.get("env"):
            if not isinstance(variables["env"], dict):
                raise ConfigurationError(
                    f"job variable 'env' must be an object, got {_describe(variables['env'])}"
                )
            job_config["env"] = job_config["env"] | variables["env"]
        try:
            return templating.apply_values(job_config, variables, environ)
        except templating.TemplateError as exc:
            raise ConfigurationError(str(exc)) from None

    @classmethod
    async def from_template_and_values(
        cls,
        base_job_template: Mapping[str, Any],
        values: Mapping[str, Any],
        client: Resolver,
        environ: Mapping[str, str] | None = None,
    ) -> ProcessJobConfiguration:
        """Template → configuration: values, then blocks, then variables, then validation.
        What came from blocks and ``{{ $NAME }}`` is remembered (``hidden``) and masked in
        the errors said about it."""
        environ = os.environ if environ is None else environ
        hidden = secrecy.hidden_values([base_job_template, values], environ, ())
        try:
            populated = cls.populate(base_job_template, values, environ)
            refs = templating.block_references(populated)
            by_name: dict[tuple[str, str], Any] = {}
            for slug, name in sorted(refs.by_name):
                data = await client.read_block_document_by_name(slug, name)
                if data is not None:
                    by_name[(slug, name)] = data
            by_id: dict[str, Any] = {}
            for block_id in sorted(refs.by_id):
                data = await client.read_block_document_by_id(block_id)
                if data is not None:
                    by_id[block_id] = data
            hidden |= secrecy.hidden_values((), environ, [*by_name.values(), *by_id.values()])
            populated = templating.resolve_blocks(populated, by_name, by_id)
            found: dict[str, Any] = {}
            for var in sorted(templating.variable_references(populated)):
                value = await client.read_variable_value(var)
                if value is not templating.MISSING:
                    found[var] = value
            populated = templating.resolve_variables(populated, found)
            if not isinstance(populated, dict):
                raise ConfigurationError("the work pool's 'job_configuration' is not an object")
            config = cls.from_dict(populated)
        except (templating.TemplateError, ConfigurationError) as exc:
            raise ConfigurationError(secrecy.mask(str(exc), hidden)) from None
        config.hidden = hidden
        return config

    def mask(self, text: str) -> str:
        """``text`` with what came from blocks and ``{{ $NAME }}`` masked (``********``)."""
        return secrecy.mask(text, self.hidden)

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: Deployment | None = None,
        flow: Flow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        settings_env: Mapping[str, str] | None = None,
        python: str | None = None,
    ) -> None:
        """Fill in what depends on the run: env, labels, name and the default command.

        ``env`` layers, later winning: the worker's explicit Prefect settings
        (``settings_env``), the run and attribution variables, the job's ``env``; all
        laid over ``environ`` (the worker's environment) less the service manager's
        variables and ``FLOW_WORKER_*`` (``childenv.py``). Unlike Prefect, a job ``env``
        value of ``null`` *removes* an inherited variable instead of being ignored
        (pain point: PROTOCOL §7 item 11).
        """
        base = childenv.inherited(os.environ if environ is None else environ)
        attribution: dict[str, str] = {"PREFECT__FLOW_RUN_ID": flow_run.id}
        if worker_name is not None:
            attribution["PREFECT__WORKER_NAME"] = worker_name
        if flow_run.flow_id:
            attribution["PREFECT__FLOW_ID"] = flow_run.flow_id
        if flow is not None and flow.name:
            attribution["PREFECT__FLOW_NAME"] = flow.name
        if flow_run.deployment_id:
            attribution["PREFECT__DEPLOYMENT_ID"] = flow_run.deployment_id
        if deployment is not None and deployment.name:
            attribution["PREFECT__DEPLOYMENT_NAME"] = deployment.name
        layered: dict[str, str | None] = {**(settings_env or {}), **attribution, **self.env}
        for key, value in layered.items():
            if value is None:
                base.pop(key, None)
            else:
                base[key] = value
        self.env = dict(base)

        labels = {
            "prefect.io/flow-run-id": flow_run.id,
            "prefect.io/flow-run-name": flow_run.name,
            "prefect.io/version": PREFECT_VERSION,
        }
        if work_pool is not None:
            labels["prefect.io/work-pool-name"] = work_pool.name
            labels["prefect.io/work-pool-id"] = work_pool.id
        if worker_name is not None:
            labels["prefect.io/worker-name"] = worker_name
        if flow is not None:
            labels["prefect.io/flow-id"] = flow.id
            labels["prefect.io/flow-name"] = flow.name
        if deployment is not None:
            labels["prefect.io/deployment-id"] = deployment.id
            labels["prefect.io/deployment-name"] = deployment.name
            if deployment.updated:
                labels["prefect.io/deployment-updated"] = deployment.updated
        self.labels = {**labels, **self.labels}

        if self.name:
            ctx = {
                "ctx": {
                    "flow": attrs.asdict(flow) if flow is not None else {},
                    "flow_run": attrs.asdict(flow_run),
                }
            }
            rendered = templating.apply_values(self.name, ctx, {})
            if rendered is not templating.MISSING:
                self.name = rendered
        self.name = self.name or flow_run.name
        self.pull_steps = deployment.pull_steps if deployment is not None else None
        self.command_configured = self.command is not None
        if self.command is None:
            self.command = shlex.join([python or sys.executable, "-m", "prefect.engine"])
        problems = limits.spawn_problems(self.argv(), self.env, self.working_dir)
        if problems:
            raise ConfigurationError("; ".join(problems[:3]))

    def argv(self) -> list[str]:
        """The command split as a shell would (no shell is involved)."""
        if self.command is None:
            raise ConfigurationError("no command: prepare_for_flow_run was not called")
        try:
            argv = shlex.split(self.command)
        except ValueError as exc:
            raise ConfigurationError(f"job variable 'command' cannot be split: {exc}") from None
        if not argv:
            raise ConfigurationError("job variable 'command' is empty")
        return argv


def merge_job_variables(
    deployment_vars: Mapping[str, Any] | None, run_vars: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Deployment job variables with the run's on top: ``env`` merged key by key, the
    rest replaced (shallow), as Prefect does."""
    merged = dict(deployment_vars or {})
    run = dict(run_vars or {})
    if isinstance(merged.get("env"), dict):
        run_env = run.pop("env", {})
        if isinstance(run_env, dict):
            merged["env"] = {**merged["env"], **run_env}
        else:
            run["env"] = run_env
    merged.update(run)
    return merged
