"""A run's resource limits, with systemd's names and meanings (pure): parsed, combined, and
written out as the cgroup v2 files that enforce them.

==============  ===========================  ===================  ==============================
job variable    systemd's                    cgroup v2 file       accepted
==============  ===========================  ===================  ==============================
``memory_max``  ``MemoryMax=``               ``memory.max``       a size (``512M``, ``2G``,
                                                                  bytes) or ``infinity``
``memory_high`` ``MemoryHigh=``              ``memory.high``      the same
``cpu_weight``  ``CPUWeight=``               ``cpu.weight``       1 to 10000 (100: the default)
``cpu_max``     ``CPUQuota=``                ``cpu.max``          a share of one CPU: ``50%``
                                                                  (``50000 100000``), ``200%``
                                                                  for two CPUs, or ``infinity``
``pids_max``    ``TasksMax=``                ``pids.max``         a number of processes and
                                                                  threads, or ``infinity``
==============  ===========================  ===================  ==============================

Sizes are systemd's: ``K``, ``M``, ``G``, ``T`` are powers of 1024 (a trailing ``B`` or
``iB`` is allowed), a bare number is bytes. ``max`` is taken for ``infinity`` too.

Where a limit comes from, first found wins (:func:`combine`): the pool's job configuration
(the base job template, whose placeholders take the job variables: see
:func:`base_job_template`), then the run's and deployment's job variables themselves (for a
pool whose template does not mention them), then the worker's settings (``run_memory_max``
…). ``infinity`` set anywhere is a choice that a later layer does not override.

A value that cannot be read is the run's configuration error (:class:`LimitError`, naming
the job variable); a limit the host cannot apply (no delegated cgroup v2) is said in the
run's logs and the run goes on without it (``process/cgroups.py``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs

NAMES: Final = ("memory_max", "memory_high", "cpu_weight", "cpu_max", "pids_max")
CONTROLLER: Final = {
    "memory_max": "memory",
    "memory_high": "memory",
    "cpu_weight": "cpu",
    "cpu_max": "cpu",
    "pids_max": "pids",
}
"""The cgroup controller each limit needs."""
UNLIMITED: Final = -1
"""``infinity``: set, and unlimited (the file says ``max``), unlike an unset limit (None)."""
CPU_PERIOD: Final = 100_000
"""``cpu.max``'s period in µs: systemd's ``CPUQuotaPeriodSec=`` default (100 ms)."""
MIN_QUOTA: Final = 1000
"""The kernel's smallest ``cpu.max`` quota (1 ms per period): ``1%``."""
_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_INFINITY: Final = frozenset({"infinity", "max"})


class LimitError(ValueError):
    """A limit's value cannot be read: the message names it and says what is accepted."""


def _text(value: Any) -> str | None:
    """A value as text to parse; None for unset (None or an empty string)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a string or a number, got {type(value).__name__} {value!r}")
    return str(value).strip()


def parse_size(value: Any) -> int | None:
    """A size in bytes (``UNLIMITED`` for ``infinity``; None: unset). ValueError if unreadable."""
    text = _text(value)
    if text is None:
        return None
    if text.lower() in _INFINITY:
        return UNLIMITED
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?", text.upper())
    if not found:
        raise ValueError(f"expected a size such as 512M or 2G, or infinity; got {text!r}")
    size = int(float(found.group(1)) * _UNITS[found.group(2)])
    if size < 1 or size >= 1 << 63:
        raise ValueError(f"a size must be from 1 byte to 8E, got {text!r}")
    return size


def parse_cpu_max(value: Any) -> int | None:
    """``cpu_max`` as a quota in µs per ``CPU_PERIOD`` (``50%`` → 50000; ``UNLIMITED`` for
    ``infinity``; None: unset). ValueError if unreadable."""
    text = _text(value)
    if text is None:
        return None
    if text.lower() in _INFINITY:
        return UNLIMITED
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
    if not found:
        raise ValueError(f"expected a share of one CPU such as 50% or 200%, or infinity; got {text!r}")
    quota = round(float(found.group(1)) * CPU_PERIOD / 100)
    if quota < MIN_QUOTA:
        raise ValueError(f"the smallest share is 1% (the kernel's 1 ms per 100 ms), got {text!r}")
    return quota


def parse_weight(value: Any) -> int | None:
    """``cpu_weight``: 1 to 10000 (None: unset). ValueError if not."""
    text = _text(value)
    if text is None:
        return None
    if not re.fullmatch(r"\d+", text) or not 1 <= int(text) <= 10000:
        raise ValueError(f"expected a whole number from 1 to 10000 (100 is the default), got {text!r}")
    return int(text)


def parse_count(value: Any) -> int | None:
    """``pids_max``: a number of tasks ≥ 1, or ``infinity`` (None: unset). ValueError if not."""
    text = _text(value)
    if text is None:
        return None
    if text.lower() in _INFINITY:
        return UNLIMITED
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise ValueError(f"expected a number of processes (1 or more), or infinity; got {text!r}")
    return int(text)


PARSERS: Final = {
    "memory_max": parse_size,
    "memory_high": parse_size,
    "cpu_weight": parse_weight,
    "cpu_max": parse_cpu_max,
    "pids_max": parse_count,
}


def format_size(size: int) -> str:
    """Bytes as systemd writes a size: ``512M``, ``1.5G``, ``100K``, ``999`` (one decimal at most)."""
    for unit in ("E", "P", "T", "G", "M", "K"):
        scale = _UNITS[unit]
        if size >= scale:
            shown = f"{size / scale:.1f}".removesuffix(".0")
            return f"{shown}{unit}"
    return str(size)


@attrs.frozen
class RunLimits:
    """One run's limits: None where unset, ``UNLIMITED`` where set to ``infinity``."""

    memory_max: int | None = None
    memory_high: int | None = None
    cpu_weight: int | None = None
    cpu_max: int | None = None
    """Quota in µs per ``CPU_PERIOD``."""
    pids_max: int | None = None

    @classmethod
    def parse(cls, values: Mapping[str, Any], where: str = "job variable") -> RunLimits:
        """The limits among ``values`` (other keys are ignored). :class:`LimitError` names
        the first that cannot be read, as ``{where} 'memory_max'``."""
        found: dict[str, int | None] = {}
        for name in NAMES:
            try:
                found[name] = PARSERS[name](values.get(name))
            except ValueError as exc:
                raise LimitError(f"{where} {name!r}: {exc}") from None
        return cls(**found)

    def over(self, *below: RunLimits) -> RunLimits:
        """Each limit from this one, else from the first of ``below`` that sets it."""
        picked = {}
        for name in NAMES:
            value = getattr(self, name)
            for layer in below:
                if value is not None:
                    break
                value = getattr(layer, name)
            picked[name] = value
        return RunLimits(**picked)

    def items(self) -> dict[str, int]:
        """The limits that are set, by name."""
        return {name: value for name in NAMES if (value := getattr(self, name)) is not None}

    def __bool__(self) -> bool:
        return bool(self.items())

    def said(self, name: str) -> str:
        """One limit as a user writes it: ``512M``, ``50%``, ``infinity``."""
        value = getattr(self, name)
        if value == UNLIMITED:
            return "infinity"
        if name in ("memory_max", "memory_high"):
            return format_size(value)
        if name == "cpu_max":
            return f"{value * 100 / CPU_PERIOD:g}%"
        return str(value)

    def describe(self, names: tuple[str, ...] | list[str] = NAMES) -> str:
        """``memory_max=256M cpu_max=50%``: the set limits among ``names``."""
        return " ".join(f"{name}={self.said(name)}" for name in names if getattr(self, name) is not None)

    def files(self) -> dict[str, tuple[str, str]]:
        """cgroup file → (its value, the limit it carries), for the set limits."""
        out: dict[str, tuple[str, str]] = {}
        for name, value in self.items().items():
            text = "max" if value == UNLIMITED else str(value)
            if name == "cpu_max":
                out["cpu.max"] = (f"{text} {CPU_PERIOD}", name)
            else:
                out[name.replace("_", ".", 1)] = (text, name)
        return out

    def controllers(self) -> set[str]:
        return {CONTROLLER[name] for name in self.items()}


def combine(templated: Mapping[str, Any], variables: Mapping[str, Any], defaults: RunLimits) -> RunLimits:
    """A run's limits: the job configuration's (the pool's template filled in), else its job
    variables' (a template without them), else the worker's defaults. :class:`LimitError`
    names a job variable that cannot be read."""
    return RunLimits.parse(templated).over(RunLimits.parse(variables), defaults)


def oom_message(memory_max: int | None, peak: int | None) -> str:
    """The CRASHED message of a run the kernel's OOM killer ended."""
    at_peak = f" (peak {format_size(peak)})" if peak else ""
    if memory_max is not None and memory_max != UNLIMITED:
        return f"out of memory: the run reached memory_max {format_size(memory_max)}{at_peak}"
    return (
        "out of memory: a process of the run was killed by the kernel's OOM killer, the run "
        f"having no memory_max of its own (the host or the worker's unit ran short){at_peak}"
    )


SCHEMA: Final[dict[str, dict[str, Any]]] = {
    "memory_max": {
        "title": "Memory Max",
        "description": "The most memory the flow run's processes may use together (systemd's "
        "MemoryMax=): a size such as 512M or 2G, or infinity. Past it the kernel's OOM killer ends "
        "the run, reported as CRASHED 'out of memory'. Needs a flow-worker with per-run cgroups.",
    },
    "memory_high": {
        "title": "Memory High",
        "description": "Above this much memory the flow run's processes are slowed and their "
        "memory reclaimed (systemd's MemoryHigh=): a size such as 400M, or infinity.",
    },
    "cpu_weight": {
        "title": "CPU Weight",
        "description": "The flow run's share of CPU time against its neighbours when the CPUs "
        "are busy (systemd's CPUWeight=): 1 to 10000, 100 by default.",
    },
    "cpu_max": {
        "title": "CPU Max",
        "description": "The most CPU time the flow run may take (systemd's CPUQuota=): a share of "
        "one CPU such as 50%, or 200% for two CPUs, or infinity.",
    },
    "pids_max": {
        "title": "Pids Max",
        "description": "The most processes and threads the flow run may have at once (systemd's "
        "TasksMax=): a number, or infinity. A fork past it fails.",
    },
}
"""The job variables' schema (the ``variables`` of a base job template)."""


def base_job_template(default: Mapping[str, Any]) -> dict[str, Any]:
    """Prefect's default process template (``default``) with the limits added as job
    variables (no default: the worker's settings apply) wired into the job configuration."""
    template = copy.deepcopy(dict(default))
    properties = template.setdefault("variables", {}).setdefault("properties", {})
    for name in NAMES:
        properties[name] = {
            "anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}],
            "default": None,
            **SCHEMA[name],
        }
        template.setdefault("job_configuration", {})[name] = "{{ " + name + " }}"
    return template
