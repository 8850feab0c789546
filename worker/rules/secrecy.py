"""What is secret, and how it stays out of what the worker says.

* **Secret settings** (:data:`SECRET_SETTINGS`): ``api_key``, ``api_auth_string``,
  ``client_custom_headers``. An error about one names the key and where it came from
  (the file and line, or the variable), never the value; their shapes are checked where
  they enter (:func:`setting_problem`), so no HTTP library meets a value it would quote
  back in an error (``Illegal header value b'Bearer …'``).
* **Templated values** (:func:`hidden_values`): what a run's configuration took from
  block documents and ``{{ $NAME }}`` references (the worker's environment) is masked
  with :data:`MASK`, as Prefect's ``obfuscate`` does, wherever the rendered command or a
  message built from the configuration is said (:func:`mask`): the worker's log, the
  journal, the run's logs in the UI, its CRASHED message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from worker.rules import templating

SECRET_SETTINGS: Final = frozenset({"api_key", "api_auth_string", "client_custom_headers"})
SECRET_VARIABLES: Final = frozenset(
    {"PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_CLIENT_CUSTOM_HEADERS"}
    | {f"FLOW_WORKER_{key.upper()}" for key in SECRET_SETTINGS}
)
"""The environment variables that set a secret setting."""

MASK: Final = "********"
MIN_MASKED: Final = 4
"""Shorter templated values are not masked: they hide nothing (a secret of 3 characters is
guessed), and masking every ``1`` or ``on`` would garble the command past reading."""

_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""An HTTP header name (RFC 9110 ``token``)."""
_FIELD_VALUE: Final = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?")
"""An HTTP header value httpx and h11 send as given: printable ASCII, no line break, no
whitespace at either end."""
_API_KEY: Final = re.compile(r"[\x21-\x7e]+")


def headers_text(value: Any) -> str:
    """``client_custom_headers`` as its JSON text: a JSON string as given, or a TOML table
    written out; ``ValueError`` (without the value) for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value)
    raise ValueError(f"expected a table or a JSON object in a string, got {type(value).__name__}")


def headers_problem(text: str) -> str | None:
    """What is wrong with ``client_custom_headers`` (JSON text), without its values; None if fine."""
    try:
        headers = json.loads(text)
    except json.JSONDecodeError as exc:  # its message quotes no part of the text
        return f"is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    if not isinstance(headers, dict):
        return f'must be a JSON object of strings, e.g. {{"X-Env": "prod"}}, not a {type(headers).__name__}'
    for position, (name, value) in enumerate(headers.items(), 1):
        if not _TOKEN.fullmatch(name):
            return f"the name of header {position} is not a valid HTTP header name"
        if not isinstance(value, str):
            return f"header {name!r}: its value must be a string, not {type(value).__name__}"
        if not _FIELD_VALUE.fullmatch(value):
            return (
                f"header {name!r}: its value must be printable ASCII, without a line break or "
                "whitespace at either end"
            )
    return None


def setting_problem(key: str, value: str) -> str | None:
    """What is wrong with the (string) value of a secret setting, never quoting it."""
    if key == "api_key" and not _API_KEY.fullmatch(value):
        return "must be printable ASCII without spaces or line breaks (it is sent in an HTTP header)"
    if key == "api_auth_string":
        try:
            value.encode()
        except UnicodeEncodeError:
            return "cannot be encoded as UTF-8"
    if key == "client_custom_headers":
        return headers_problem(value)
    return None


def masked_repr(value: Any) -> str:
    """A secret setting in ``repr(settings)``."""
    return "None" if value is None else repr(MASK)


# ---------------------------------------------------------------- templated values


def _leaves(data: Any) -> Iterable[str]:
    if isinstance(data, dict):
        for item in data.values():
            yield from _leaves(item)
    elif isinstance(data, list):
        for item in data:
            yield from _leaves(item)
    elif isinstance(data, str | int | float) and not isinstance(data, bool):
        yield str(data)


def env_values(template: Any, environ: Mapping[str, str]) -> set[str]:
    """The values of the ``{{ $NAME }}`` references in ``template``'s strings."""
    found: set[str] = set()
    for text in _leaves(template):
        for ph in templating.placeholders_in(text):
            if ph.kind is templating.Kind.ENV:
                found.add(environ.get(ph.name.removeprefix(templating.ENV_PREFIX), ""))
    return found


def hidden_values(
    templates: Iterable[Any], environ: Mapping[str, str], blocks: Iterable[Any]
) -> frozenset[str]:
    """What a configuration may have taken from ``{{ $NAME }}`` references in ``templates``
    and from the block documents ``blocks`` (every scalar of their data): the substrings
    :func:`mask` hides."""
    found = set().union(*(env_values(template, environ) for template in templates))
    found.update(leaf for block in blocks for leaf in _leaves(block))
    return frozenset(value for value in found if len(value) >= MIN_MASKED)


def mask(text: str, hidden: Iterable[str]) -> str:
    """``text`` with every occurrence of a hidden value replaced by :data:`MASK` (the
    longest first, so a value containing another is masked whole)."""
    for value in sorted(hidden, key=len, reverse=True):
        if len(value) >= MIN_MASKED:
            text = text.replace(value, MASK)
    return text
