"""Job variables the OS would refuse fail their run with the variable named (``limits.py``).

Unit cases for each rule, and a property: random job variables driven through configure
(template + values + ``prepare_for_flow_run``) and a real spawn (``RunHandle.start``)
give a started process, a ``ConfigurationError`` or a ``StartError``: nothing else ever
comes out of a run's start (issue 19).
"""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.process.handle import StartError
from worker.process.spawned import RunHandle
from worker.rules import decisions, limits
from worker.rules.job import ConfigurationError, ProcessJobConfiguration
from worker.rules.models import FlowRun

TEMPLATE = ProcessJobConfiguration.default_base_job_template()
FLOW_RUN = FlowRun(id="00000000-0000-0000-0000-000000000001", name="r")


class NoBlocks:
    async def read_block_document_by_name(self, slug: str, name: str) -> Any:
        return None

    async def read_block_document_by_id(self, block_id: str) -> Any:
        return None

    async def read_variable_value(self, name: str) -> Any:
        from worker.rules import templating

        return templating.MISSING


async def configure(values: dict[str, Any]) -> ProcessJobConfiguration:
    config = await ProcessJobConfiguration.from_template_and_values(
        TEMPLATE, values, NoBlocks(), environ={"HOME": "/h"}
    )
    config.prepare_for_flow_run(FLOW_RUN, environ={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    return config


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"env": {"A=B": "1"}}, "'env.A=B'"),
        ({"env": {"": "1"}}, "empty variable name"),
        ({"env": {"X": "a\u0000b"}}, "'env.X'"),
        ({"command": "true\u0000"}, "'command'"),
        ({"working_dir": "/tmp/a\u0000b"}, "'working_dir'"),
        ({"env": {"X": ["a", "b"]}}, "'env.X' must be a string or null, got list"),
        ({"env": {"X": {"a": 1}}}, "'env.X' must be a string or null, got dict"),
        ({"env": {"X": "v" * (1024 * 1024)}}, "'env.X' is 1048579 bytes"),
        ({"command": "true " + "w" * (200 * 1024)}, "'command' has a word of"),
        ({"working_dir": "/" + "d" * 5000}, "'working_dir' is 5001 bytes"),
        ({"env": {f"V{i}": "v" * 60000 for i in range(20)}}, "come to"),
    ],
)
async def test_a_bad_job_variable_is_a_configuration_error_naming_it(
    values: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        await configure(values)
    assert named in str(caught.value)
    assert len(str(caught.value)) < 600, "a message for the UI, not the value echoed back"


async def test_a_secret_in_a_wrong_shape_is_not_echoed() -> None:
    with pytest.raises(ConfigurationError) as caught:
        await configure({"env": {"CREDS": {"password": "hunter2"}}})
    assert "hunter2" not in str(caught.value)


async def test_numbers_and_booleans_in_env_are_still_written_out() -> None:
    config = await configure({"env": {"N": 3, "B": True, "F": 1.5, "GONE": None}})
    assert (config.env["N"], config.env["B"], config.env["F"]) == ("3", "True", "1.5")


def test_the_limits_match_what_the_kernel_refuses() -> None:
    """One byte under the entry limit is spawnable; the limit is Linux's MAX_ARG_STRLEN."""
    assert os.sysconf("SC_PAGE_SIZE") * 32 == limits.ENTRY_MAX
    largest, too_large = "v" * (limits.ENTRY_MAX - 3), "v" * (limits.ENTRY_MAX - 2)
    assert not list(limits.env_problems({"X": largest}))
    assert list(limits.env_problems({"X": too_large}))
    subprocess.run(["true"], env={"X": largest}, check=True)  # the kernel agrees, both ways
    with pytest.raises(OSError) as refused:
        subprocess.run(["true"], env={"X": too_large}, check=True)
    assert refused.value.errno == errno.E2BIG
    assert decisions.shortage(OSError(24, "Too many open files")) is not None
    assert decisions.shortage(OSError(2, "No such file")) is None


texts = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from(["=", "\0", " ", "'", '"', "$"])),
    max_size=12,
)
env_values = st.one_of(
    st.none(),
    texts,
    st.integers(),
    st.booleans(),
    st.lists(texts, max_size=2),
    st.dictionaries(texts, texts, max_size=1),
    st.builds(lambda n: "x" * n, st.sampled_from([10, limits.ENTRY_MAX, 2 * limits.ENTRY_MAX])),
)
job_variables = st.fixed_dictionaries(
    {},
    optional={
        "env": st.one_of(st.dictionaries(texts, env_values, max_size=4), env_values),
        # always a harmless program first: the rest of the words are random
        "command": st.one_of(
            texts.map(lambda t: "true " + t),
            st.lists(texts, max_size=3).map(lambda words: shlex.join(["true", *words])),
            st.integers(),
        ),
        "working_dir": st.one_of(st.none(), texts, st.just(tempfile.gettempdir()), st.integers()),
        "stream_output": st.one_of(st.booleans(), texts),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=job_variables)
def test_random_job_variables_start_or_fail_that_run_with_its_own_error(values: dict[str, Any]) -> None:
    async def attempt() -> None:
        try:
            config = await configure(values)
            handle = RunHandle(
                "run-p", _Quiet(), grace=1.0, config=config, output_dir=Path(tempfile.mkdtemp())
            )
            await handle.start()
        except (ConfigurationError, StartError) as exc:
            assert str(exc)
            return
        await handle.wait()

    trio.run(attempt)


class _Quiet:
    def _drop(self, *args: Any, **kwargs: Any) -> None:
        pass

    info = warning = error = debug = _drop
