"""The base-job-template rules of a Prefect work pool, as pure functions.

Theory of operation
-------------------
A work pool's ``base_job_template`` has two halves: ``job_configuration`` (a JSON
document whose strings may hold ``{{ placeholders }}``) and ``variables`` (a JSON
schema whose ``default`` values seed the placeholders). A run is configured in
three passes over ``job_configuration``, in this order, each pass a pure function
here:

1. :func:`apply_values` fills standard placeholders from the job variables and
   ``{{ $NAME }}`` from the worker's environment.
2. :func:`resolve_blocks` replaces ``{{ prefect.blocks.<slug>.<name>[.path] }}`` and
   ``{"$ref": {"block_document_id": …}}`` with block data.
3. :func:`resolve_variables` replaces ``{{ prefect.variables.<name> }}``.

Passes 2 and 3 need data from the API. This module never does I/O: the caller
collects the references with :func:`block_references` / :func:`variable_references`,
fetches them, and hands the results back as plain mappings. The rules (which were
checked against Prefect 3.9.1's own implementation, see ``tests/fixtures``):

========================  ==============================================================
placeholder form          result
========================  ==============================================================
whole string, found       the raw value, type kept (int, bool, dict, list, None)
whole string, missing     the key (or list item) is dropped; the model default applies
inline, found             ``str(value)`` substituted; inserted text is not re-templated
inline, missing           ``""``
``{{ $NAME }}``            always inline: ``str(os.environ[NAME])``, or ``""`` if unset
block, whole string       the block's data; ``{"value": x}`` alone unwraps to ``x``
block, inline             ``str(value)``; a dict or list is an error
variable, whole string    the variable's JSON value, type kept; missing gives ``""``
variable, inline          ``str(value)``; missing gives ``""``
========================  ==============================================================
"""

from __future__ import annotations

import copy
import enum
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

PLACEHOLDER_RE: Final = re.compile(r"({{\s*([\w\.\-\[\]$]+)\s*}})")
BLOCK_PREFIX: Final = "prefect.blocks."
VARIABLE_PREFIX: Final = "prefect.variables."
ENV_PREFIX: Final = "$"


class TemplateError(ValueError):
    """A template or the data it refers to cannot produce a configuration.

    This is the deployment's or the work pool's fault, never the worker's: the
    message says which placeholder and why, so a user can fix the template.
    """


class _Missing(enum.Enum):
    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing.MISSING
"""Sentinel: a placeholder had no value (distinct from a value of ``None``)."""


class Kind(enum.Enum):
    STANDARD = "standard"
    BLOCK = "block_document"
    VARIABLE = "variable"
    ENV = "env_var"


@attrs.frozen
class Placeholder:
    full_match: str
    name: str

    @property
    def kind(self) -> Kind:
        if self.name.startswith(BLOCK_PREFIX):
            return Kind.BLOCK
        if self.name.startswith(VARIABLE_PREFIX):
            return Kind.VARIABLE
        if self.name.startswith(ENV_PREFIX):
            return Kind.ENV
        return Kind.STANDARD


def placeholders_in(text: str) -> set[Placeholder]:
    """The distinct placeholders in one string."""
    return {Placeholder(full, name) for full, name in PLACEHOLDER_RE.findall(text)}


def _is_whole(text: str, found: set[Placeholder], kind: Kind) -> Placeholder | None:
    """The placeholder if ``text`` is exactly one placeholder of ``kind``."""
    if len(found) == 1:
        (only,) = found
        if only.full_match == text and only.kind is kind:
            return only
    return None


def _strings(template: Any) -> list[str]:
    """Every string leaf of a JSON-like value (dict values and list items)."""
    if isinstance(template, str):
        return [template]
    if isinstance(template, dict):
        return [s for v in template.values() for s in _strings(v)]
    if isinstance(template, list):
        return [s for v in template for s in _strings(v)]
    return []


# ---------------------------------------------------------------- paths


def _split_path(path: str) -> list[str]:
    return path.replace("[", ".").replace("]", "").split(".")


def _int_key(key: str) -> int | str:
    """``"1"`` → ``1`` for canonical integers only (``"01"`` stays a string)."""
    try:
        as_int = int(key)
    except ValueError:
        return key
    return as_int if str(as_int) == key else key


def get_path(obj: Any, path: str, default: Any = MISSING) -> Any:
    """Look up ``a.b[1].c`` in nested dicts and lists; ``default`` if absent."""
    value = obj
    for key in _split_path(path):
        if isinstance(value, Mapping):
            if key in value:
                value = value[key]
                continue
            alt = _int_key(key)
            if alt in value:
                value = value[alt]
                continue
            return default
        if isinstance(value, list | tuple | str):
            try:
                value = value[int(key)]
            except (ValueError, IndexError):
                return default
            continue
        return default
    return value


def set_path(target: dict[str, Any], path: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts, creating the dicts on the way.

    Raises :class:`TemplateError` when a step of the path already holds a non-dict.
    """
    keys = _split_path(path)
    node = target
    for key in keys[:-1]:
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise TemplateError(f"job variable {path!r}: {key!r} already holds a non-object value")
        node = nxt
    node[keys[-1]] = value


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: ``over`` merged into ``base``, recursing where both sides are dicts."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def expand_dotted(values: Mapping[str, Any]) -> dict[str, Any]:
    """Job variables with dotted keys (``"env.FOO": "x"``) expanded to nested dicts.

    Dotted keys are applied first; a plain key then replaces them, or is deep-merged
    into them when both are dicts (so the nested form wins).
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        if "." in key:
            set_path(out, key, value)
    for key, value in values.items():
        if "." not in key:
            if isinstance(out.get(key), dict) and isinstance(value, dict):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = value
    return out


# ---------------------------------------------------------------- pass 1: values


def apply_values(template: Any, values: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    """Fill standard and ``$ENV`` placeholders. Returns :data:`MISSING` for a whole
    placeholder with no value; dicts and lists drop such entries."""
    if template is None or isinstance(template, bool | int | float):
        return template
    if isinstance(template, str):
        found = placeholders_in(template)
        if not found:
            return template
        whole = _is_whole(template, found, Kind.STANDARD)
        if whole is not None:
            return get_path(values, whole.name)
        replacements: dict[str, str] = {}
        for ph in found:
            if ph.kind is Kind.STANDARD:
                value = get_path(values, ph.name)
            elif ph.kind is Kind.ENV:
                value = environ.get(ph.name.lstrip(ENV_PREFIX), MISSING)
            else:
                continue
            replacements[ph.full_match] = "" if value is MISSING else str(value)
        return PLACEHOLDER_RE.sub(lambda m: replacements.get(m.group(1), m.group(1)), template)
    if isinstance(template, dict):
        out: dict[str, Any] = {}
        for key, item in template.items():
            applied = apply_values(item, values, environ)
            if applied is not MISSING:
                out[key] = applied
        return out
    if isinstance(template, list):
        return [
            applied
            for applied in (apply_values(item, values, environ) for item in template)
            if applied is not MISSING
        ]
    raise TemplateError(f"unexpected value of type {type(template).__name__} in the template")


# ---------------------------------------------------------------- pass 2: blocks


@attrs.frozen
class BlockRefs:
    """The block documents a template refers to, to be fetched by the caller."""

    by_name: frozenset[tuple[str, str]] = frozenset()
    by_id: frozenset[str] = frozenset()


def _block_parts(name: str) -> tuple[str, str, str | None]:
    parts = name.removeprefix(BLOCK_PREFIX).split(".", 2)
    if len(parts) < 2:
        raise TemplateError(
            f"invalid block placeholder {name!r}: "
            "expected prefect.blocks.<block-type-slug>.<block-document-name>"
        )
    return parts[0], parts[1], parts[2] if len(parts) > 2 else None


def _ref_id(template: dict[str, Any]) -> str | None:
    ref = template.get("$ref")
    if isinstance(ref, dict) and ref.get("block_document_id"):
        return str(ref["block_document_id"])
    return None


def block_references(template: Any) -> BlockRefs:
    by_name: set[tuple[str, str]] = set()
    by_id: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = _ref_id(node)
            if ref is not None:
                by_id.add(ref)
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            for ph in placeholders_in(node):
                if ph.kind is Kind.BLOCK:
                    slug, doc, _ = _block_parts(ph.name)
                    by_name.add((slug, doc))

    walk(template)
    return BlockRefs(frozenset(by_name), frozenset(by_id))


def _block_value(ph: Placeholder, text: str, by_name: Mapping[tuple[str, str], Any]) -> Any:
    slug, doc, keypath = _block_parts(ph.name)
    if (slug, doc) not in by_name:
        raise TemplateError(
            f"block not found: {doc!r} of type {slug!r}, referenced as {ph.full_match!r}; "
            "it may have been deleted: create it or fix the deployment or work pool"
        )
    data = by_name[(slug, doc)]
    value = data
    if isinstance(data, dict) and len(data) == 1 and "value" in data:
        if not (keypath and (keypath == "value" or keypath.startswith(("value.", "value[")))):
            data = value = data["value"]
    if keypath:
        value = get_path(data, keypath)
        if value is MISSING:
            raise TemplateError(f"{ph.full_match!r} in {text!r}: the block has no value at {keypath!r}")
    return copy.deepcopy(value)


def resolve_blocks(
    template: Any,
    by_name: Mapping[tuple[str, str], Any],
    by_id: Mapping[str, Any],
) -> Any:
    """Replace block placeholders and ``$ref`` dicts with the fetched block data.

    A reference absent from the mappings means the block does not exist.
    """
    if isinstance(template, dict):
        ref = _ref_id(template)
        if ref is not None:
            if ref not in by_id:
                raise TemplateError(f"block not found: id {ref!r}; it may have been deleted")
            return copy.deepcopy(by_id[ref])
        return {k: resolve_blocks(v, by_name, by_id) for k, v in template.items()}
    if isinstance(template, list):
        return [resolve_blocks(v, by_name, by_id) for v in template]
    if not isinstance(template, str):
        return template
    found = placeholders_in(template)
    if not any(ph.kind is Kind.BLOCK for ph in found):
        return template
    whole = _is_whole(template, found, Kind.BLOCK)
    if whole is not None:
        return _block_value(whole, template, by_name)
    result = template
    for ph in found:
        if ph.kind is not Kind.BLOCK:
            continue
        value = _block_value(ph, template, by_name)
        if isinstance(value, dict | list):
            raise TemplateError(
                f"{ph.full_match!r} in {template!r} is a {type(value).__name__}, which "
                "cannot be put inside a string: refer to one scalar field of the block"
            )
        result = result.replace(ph.full_match, str(value))
    return result


# ---------------------------------------------------------------- pass 3: variables


def variable_references(template: Any) -> frozenset[str]:
    """Names of the Prefect variables a template refers to."""
    return frozenset(
        ph.name.removeprefix(VARIABLE_PREFIX)
        for text in _strings(template)
        for ph in placeholders_in(text)
        if ph.kind is Kind.VARIABLE
    )


def resolve_variables(template: Any, values: Mapping[str, Any]) -> Any:
    """Replace variable placeholders; a name absent from ``values`` becomes ``""``."""
    if isinstance(template, dict):
        return {k: resolve_variables(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [resolve_variables(v, values) for v in template]
    if not isinstance(template, str):
        return template
    found = placeholders_in(template)
    if not any(ph.kind is Kind.VARIABLE for ph in found):
        return template
    whole = _is_whole(template, found, Kind.VARIABLE)
    if whole is not None:
        return copy.deepcopy(values.get(whole.name.removeprefix(VARIABLE_PREFIX), ""))
    result = template
    for ph in found:
        if ph.kind is Kind.VARIABLE:
            name = ph.name.removeprefix(VARIABLE_PREFIX)
            result = result.replace(ph.full_match, str(values[name]) if name in values else "")
    return result
