"""What the API answered: the errors that say whose fault it was, and the one place answers
are decoded.

* :class:`ApiUnavailable`: the server or the network (connection refused, timeouts,
  5xx, 429 after the retries ran out). Callers back off and try again later.
* :class:`ApiRefused`: the server understood and said no (4xx): a wrong key, a
  missing object, a bad name. :class:`ApiNotFound` is the 404 case.
* :class:`~worker.rules.models.ProtocolError`: an answer that is not the API's: a 2xx whose
  body is not JSON of the documented shape, an HTML page, a redirect. Every answer is read
  through :func:`decode` and a reader here: its shape is data, never a code path, so a
  ``KeyError`` or ``JSONDecodeError`` never escapes. The error says what came back and from
  where, with a hint when it is a web page.
"""

from __future__ import annotations

import re
import ssl
from typing import Any, Final, TypeVar

import httpx

from worker.rules.models import FlowRun, ProtocolError, structure

T = TypeVar("T")

EXCERPT: Final = 120
"""Characters of a strange answer quoted in its error."""
HTML_HINT: Final = (
    "the API answered a web page: is PREFECT_API_URL the UI's address? the API is under /api "
    "(e.g. http://host:4200/api); a login page or a proxy in the way answers HTML too"
)
ROUTE_HINT: Final = (
    "the server has no such route: is PREFECT_API_URL the UI's address? the API is under /api "
    "(e.g. http://host:4200/api)"
)
"""For a 404 that names no object (Prefect's own say which object is missing) from an
address without ``/api``: Prefect 3.9's UI answers an API client so at every other path."""
REDIRECT_HINT: Final = (
    "the API never redirects: check PREFECT_API_URL (https rather than http? the /api suffix?); "
    "a login page or a proxy in the way redirects too"
)


class ApiError(Exception):
    def __init__(
        self, method: str, path: str, status: int | None, detail: str, *, hint: str | None = None
    ) -> None:
        self.method, self.path, self.status, self.detail = method, path, status, detail
        self.hint = hint
        """What a user can do about it, when the answer says (a wrong ``PREFECT_API_URL``)."""
        code = f" {status}" if status is not None else ""
        super().__init__(f"{method} {path}{code}: {detail}")


class ApiUnavailable(ApiError):
    """Not our fault: the API could not be reached or is overloaded; try again later."""


class ApiRefused(ApiError):
    """The API refused the request (4xx): a configuration or a programming error."""


class ApiNotFound(ApiRefused):
    """404: the object does not exist (any more)."""


class ApiNoAnswer(ApiUnavailable):
    """No answer within :data:`CALL_DEADLINE`: the server accepted the request and hung.

    Its ``status`` is None, as for a server that cannot be reached at all, and on purpose:
    the loops then wait in a pause that the ``GET /health`` probe ends (``outage.py``)
    instead of backing off for up to a minute. A hung server and a black-holed network
    look the same from here (a timeout), the probe costs a hung server one tiny request
    at a time, and it notices the moment the server answers again; backoff exists for a
    server that answers "not now" (429/503), which a hung one does not."""


def describe(exc: BaseException) -> str:
    """A transport error with its root cause: httpx on trio often says only "ConnectError"
    while the cause (a refused certificate, a refused connection) is in the chain."""
    text = f"{type(exc).__name__}: {exc}".rstrip(": ")
    cause, seen = exc.__cause__ or exc.__context__, 0
    while cause is not None and seen < 8:
        if str(cause) and str(cause) not in text:
            text += f" ({type(cause).__name__}: {cause})"
            break
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return text


def is_certificate_error(exc: BaseException) -> bool:
    """Whether a failure is the API's certificate being refused (a configuration problem)."""
    return "CERTIFICATE_VERIFY_FAILED" in str(exc) or isinstance(exc, ssl.SSLCertVerificationError)


def detail_of(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return excerpt(response.content, 200) or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("exception_message") or body)[:500]
    return str(body)[:500]


# ---------------------------------------------------------------- answers are data


_ID_SEGMENT: Final = re.compile(
    r"/[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(?=/|$)"
)


_SECRET_PATHS: Final = re.compile(r"/(block_documents|block_types|variables|csrf-token)(/|$)")
"""Endpoints whose answers may carry secrets: never quoted in a message."""


def excerpt(body: bytes, limit: int = EXCERPT) -> str:
    """A short, printable, one-line quote of a body (for a log line, never the whole page)."""
    text = " ".join(body[: limit * 4].decode("utf-8", "replace").split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_html(response: httpx.Response) -> bool:
    """Whether an answer is a web page (Prefect's API never answers one)."""
    content_type = response.headers.get("content-type", "").lower()
    return "text/html" in content_type or response.content.lstrip()[:1] == b"<"


def _request_of(response: httpx.Response) -> tuple[str, str]:
    try:
        return response.request.method, response.request.url.path
    except RuntimeError:  # a response built by hand, without its request
        return "?", "?"


def endpoint(response: httpx.Response) -> str:
    """The endpoint an answer came from, ids left out ("POST /api/flow_runs/{id}/set_state"):
    what the outage's episodes of strange answers are counted by."""
    method, path = _request_of(response)
    return f"{method} {_ID_SEGMENT.sub('/{id}', path)}"


def unexpected_answer(response: httpx.Response, what: str) -> ProtocolError:
    """A :class:`ProtocolError` that says what came back and from where."""
    method, path = _request_of(response)
    content_type = response.headers.get("content-type") or "no content-type"
    quoted = excerpt(response.content)
    body = repr(quoted) if quoted else "an empty body"
    if quoted and _SECRET_PATHS.search(path):  # a block's or variable's value, a CSRF token
        body = f"a body of {len(response.content)} bytes (not quoted: it may hold a secret)"
    hint = None
    if is_html(response):
        hint = HTML_HINT
    elif response.is_redirect:
        hint = REDIRECT_HINT
    return ProtocolError(
        f"{method} {path} answered {response.status_code} ({content_type}) {what}: {body}",
        hint=hint,
        endpoint=endpoint(response),
    )


def decode(response: httpx.Response, expect: type | None = None) -> Any:
    """The JSON body of an answer (of type ``expect`` if given), or :class:`ProtocolError`."""
    try:
        body = response.json()
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError), too deep
        raise unexpected_answer(response, "which is not JSON") from None
    if expect is not None and not isinstance(body, expect):
        raise unexpected_answer(response, f"with a JSON {json_type(body)}, not {_JSON_TYPES[expect]}")
    return body


_JSON_TYPES: Final[dict[type, str]] = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    type(None): "null",
    int: "number",
    float: "number",
}


def json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_rows(body: Any, cls: type[T]) -> list[T]:
    """A JSON array of API objects."""
    if not isinstance(body, list):
        raise ProtocolError(f"a JSON {json_type(body)}, not an array of {cls.__name__}")
    return [structure(row, cls) for row in body]


def scheduled_rows(body: Any) -> tuple[list[FlowRun], list[tuple[str | None, str]]]:
    """The due runs, and (run id, problem) for each row that could not be read."""
    if not isinstance(body, list):
        raise ProtocolError(f"a JSON {json_type(body)}, not an array of runs")
    runs: list[FlowRun] = []
    problems: list[tuple[str | None, str]] = []
    for row in body:
        payload = row.get("flow_run") if isinstance(row, dict) else None
        try:
            runs.append(structure(payload, FlowRun))
        except ProtocolError as exc:
            run_id = payload.get("id") if isinstance(payload, dict) else None
            problems.append((run_id if isinstance(run_id, str) and run_id else None, str(exc)))
    return runs, problems


def variable_value(body: Any) -> tuple[Any]:
    """A variable's value (in a tuple: a variable may hold null)."""
    if not isinstance(body, dict):
        raise ProtocolError(f"a JSON {json_type(body)}, not a variable")
    return (body.get("value"),)


def block_data(doc: Any) -> dict[str, Any]:
    """A block document's ``data``."""
    if not isinstance(doc, dict):
        raise ProtocolError(f"a JSON {json_type(doc)}, not a block document")
    data = doc.get("data")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProtocolError(f"block data is a JSON {json_type(data)}, not an object")
    return data
