"""Property: any job variables and any template give a configuration or a ConfigurationError.

Never another exception: a bad deployment must fail its own run with a message, not
take the worker down.
"""

from __future__ import annotations

from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.rules import templating
from worker.rules.job import ConfigurationError, ProcessJobConfiguration

names = st.sampled_from(
    [*ProcessJobConfiguration.FIELDS, "x", "env.FOO", "a.b", "default", "$ref", "block_document_id"]
)
placeholders = st.sampled_from(
    [
        "{{ command }}",
        "{{ env }}",
        "{{ x }}",
        "{{ a.b[0] }}",
        "{{ $HOME }}",
        "{{ prefect.blocks.secret.s }}",
        "{{ prefect.blocks.x }}",
        "{{ prefect.variables.v }}",
        "{{ prefect.blocks.json.j.value.k }}",
        "pre {{ x }} post",
    ]
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8), placeholders
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5) | names, inner, max_size=3)
    ),
    max_leaves=10,
)
templates = st.one_of(
    st.just(ProcessJobConfiguration.default_base_job_template()),
    st.fixed_dictionaries(
        {
            "job_configuration": st.one_of(st.dictionaries(names, json_values, max_size=6), json_values),
            "variables": st.one_of(
                st.fixed_dictionaries(
                    {
                        "properties": st.dictionaries(
                            names,
                            st.fixed_dictionaries({}, optional={"default": json_values}) | json_values,
                            max_size=4,
                        )
                    }
                ),
                json_values,
            ),
        }
    ),
    json_values,
)


class Store:
    async def read_block_document_by_name(self, slug: str, name: str) -> Any:
        return {"value": {"k": [1, 2]}} if slug == "json" else ({"value": "s"} if slug == "secret" else None)

    async def read_block_document_by_id(self, block_id: str) -> Any:
        return None

    async def read_variable_value(self, name: str) -> Any:
        return {"v": [1, {"a": None}]}.get(name, templating.MISSING)


@settings(max_examples=500, deadline=None)
@given(template=templates, values=st.dictionaries(names | st.text(max_size=6), json_values, max_size=5))
def test_configuration_or_configuration_error(template: Any, values: dict[str, Any]) -> None:
    async def attempt() -> None:
        try:
            cfg = await ProcessJobConfiguration.from_template_and_values(
                template, values, Store(), environ={"HOME": "/h"}
            )
        except ConfigurationError as exc:
            assert str(exc)
            return
        assert isinstance(cfg, ProcessJobConfiguration)
        assert all(isinstance(v, str) or v is None for v in cfg.env.values())

    trio.run(attempt)
