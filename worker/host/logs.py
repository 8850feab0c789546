"""structlog configuration: journald under systemd, console lines on a terminal, JSON lines otherwise.

Events are names with fields (``log.info("run.claimed", flow_run_id=…)``). The chain is
small composable processors; the renderer at the end is chosen once:

=============  ==============================================================================
format         when (``auto``)
=============  ==============================================================================
``journald``   stderr is the journal (``$JOURNAL_STREAM``): one native entry per event, with
               ``PRIORITY``, ``SYSLOG_IDENTIFIER=flow-worker``, ``FLOW_WORKER_EVENT`` and the
               run's ``FLOW_RUN_ID``, ``FLOW_RUN_NAME``, ``DEPLOYMENT_ID``, ``DEPLOYMENT_NAME``,
               ``WORK_POOL``, so ``journalctl FLOW_RUN_ID=…`` tells a run's whole story
``console``    stderr is a terminal
``json``       anything else (a file, a pipe, a container log)
=============  ==============================================================================
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Hashable, MutableMapping, Sequence
from typing import Any, Final, TextIO

import attrs
import structlog

from worker.host import systemd

LEVELS: Final = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
}
PRIORITIES: Final = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
RESERVED: Final = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "SYSLOG_PID",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
    }
)
"""Journal fields an event's own keys must not overwrite (an event's ``message`` becomes
``FLOW_WORKER_MESSAGE``)."""
RUN_FIELDS: Final = {
    "flow_run_id": "FLOW_RUN_ID",
    "flow_run_name": "FLOW_RUN_NAME",
    "deployment_id": "DEPLOYMENT_ID",
    "deployment_name": "DEPLOYMENT_NAME",
    "work_pool": "WORK_POOL",
}


class JournaldRenderer:
    """The last processor under systemd: sends the event to journald, then drops it.

    If the journal socket refuses the entry, the event falls through as a JSON line on
    stderr (which systemd also collects), so nothing is lost.
    """

    def __init__(self, sender: systemd.JournalSender | None = None) -> None:
        self.sender = sender or systemd.JournalSender()

    def fields(self, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
        data = dict(event_dict)
        event = str(data.pop("event", ""))
        level = str(data.pop("level", "info"))
        data.pop("timestamp", None)
        out: dict[str, Any] = {
            "PRIORITY": PRIORITIES.get(level, 6),
            "SYSLOG_IDENTIFIER": "flow-worker",
            "FLOW_WORKER_EVENT": event,
        }
        if event == "run.output":
            out["MESSAGE"] = data.pop("line", "")
        else:
            rest = " ".join(f"{k}={v}" for k, v in data.items() if k not in RUN_FIELDS)
            run = data.get("flow_run_name") or data.get("flow_run_id")
            out["MESSAGE"] = " ".join(p for p in (event, f"[{run}]" if run else "", rest) if p)
        for key, value in data.items():
            if value is not None:
                name = RUN_FIELDS.get(key) or systemd.field_name(key)
                out["FLOW_WORKER_" + name if name in RESERVED else name] = value
        return out

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        if self.sender.send(self.fields(event_dict)):
            raise structlog.DropEvent
        return json.dumps(dict(event_dict), default=str)


CONSOLE_WIDTH: Final = 160
"""The console's lines are cut to this width (with "…"); JSON and journald keep it all."""
CONSOLE_FACTS: Final[dict[str, tuple[str, ...]]] = {
    "run.claimed": (),
    "run.started": ("pid", "command"),
    "run.exited": ("returncode", "stderr_tail"),
    "run.finished": ("state",),
    "run.reported": ("outcome", "message"),
    "run.adopted": ("pid",),
    "run.cancelling": ("via",),
    "run.terminating": ("reason",),
    "worker.starting": ("work_pool", "limit", "once"),
    "worker.synced": ("work_pool",),
    "worker.stopping": ("reason",),
    "worker.stopped": ("failed_runs",),
}
"""The one or two facts a person wants per event; other events show their first fields
that are not ids or context. Ids are never shown on the console."""
_CONTEXT: Final = frozenset({"timestamp", "level", "event", "flow_run_name", "work_pool", "deployment_name"})
_COLORS: Final = {"debug": "\x1b[2m", "info": "", "warning": "\x1b[33m", "error": "\x1b[31;1m"}


class ConsoleLine:
    """The console renderer, for people: ``time level who event facts``, one short line.

    ``who`` is the run's name (or ``worker``); a run's own output is ``who │ line``.
    """

    def __init__(self, colors: bool = False, width: int = CONSOLE_WIDTH) -> None:
        self.colors, self.width = colors, width

    def facts(self, event: str, data: MutableMapping[str, Any]) -> str:
        keys = CONSOLE_FACTS.get(event)
        if keys is None:
            keys = tuple(k for k in data if k not in _CONTEXT and not k.endswith("_id"))[:3]
        shown = []
        for key in keys:
            value = data.get(key)
            if value is None or value == "":
                continue
            text = " ".join(str(value).split())  # one line: a multi-line tail is folded
            shown.append(f"{key}={text}")
        return " ".join(shown)

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        data = event_dict
        event = str(data.get("event", ""))
        level = str(data.get("level", "info"))
        stamp = str(data.get("timestamp", ""))[11:19]
        who = str(data.get("flow_run_name") or "worker")[:24]
        if event == "run.output":
            line = f"{stamp} {'':<7} {who:<24} │ {data.get('line', '')}"
        else:
            line = f"{stamp} {level.upper():<7} {who:<24} {event} {self.facts(event, data)}".rstrip()
        if len(line) > self.width:
            line = line[: self.width - 1] + "…"
        if self.colors and _COLORS.get(level):
            return f"{_COLORS[level]}{line}\x1b[0m"
        return line


def choose_format(log_format: str, stream: TextIO) -> str:
    if log_format != "auto":
        return log_format
    if systemd.journal_stream_is_stderr():
        return "journald"
    return "console" if stream.isatty() else "json"


def configure(
    log_format: str = "auto",
    level: str = "INFO",
    stream: TextIO | None = None,
    taps: Sequence[structlog.typing.Processor] = (),
) -> str:
    """Configure structlog once, at start-up. Returns the format chosen. ``taps`` come first
    in the chain (the CLI passes ``ui.TAP``, the run-log lines for the Prefect UI: the host
    layer does not import the Prefect side)."""
    stream = stream or sys.stderr
    chosen = choose_format(log_format, stream)
    renderer: Any
    if chosen == "journald":
        renderer = JournaldRenderer()
    elif chosen == "console":
        renderer = ConsoleLine(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(default=str)
    structlog.configure(
        processors=[
            *taps,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    return chosen


@attrs.define
class Once:
    """Says a condition once while it lasts (and again only after :meth:`clear`), with a
    bounded memory of what it has said: a poll every few seconds must not repeat itself."""

    limit: int = 4096
    _said: dict[Hashable, None] = attrs.Factory(dict)

    def say(self, key: Hashable, logger: Any, level: str, event: str, **fields: Any) -> None:
        if key in self._said:
            return
        self._said[key] = None
        if len(self._said) > self.limit:
            self._said.pop(next(iter(self._said)))
        getattr(logger, level)(event, **fields)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._said

    def __len__(self) -> int:
        return len(self._said)

    def clear(self, key: Hashable) -> None:
        self._said.pop(key, None)
