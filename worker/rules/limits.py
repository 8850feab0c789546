"""What the operating system accepts of a run's command, environment and working directory.

Pure checks, run on a job configuration before anything is spawned, so that a job
variable the kernel (or Python's ``subprocess``) would refuse fails *that run* with a
message naming the variable, never the worker (issue 19: ``{"env": {"A=B": "1"}}`` made
the spawn raise ``ValueError`` in the worker's task).

The rules, and whose they are:

==========================  ==========================================================
rule                        why
==========================  ==========================================================
env name not empty          ``execve`` would pass ``=VALUE``, which no program can read
env name without ``=``      the first ``=`` ends the name: ``A=B=1`` would set ``A``
no NUL anywhere             C strings end at NUL: Python refuses ("embedded null byte")
one env entry ≤ 128 KiB     Linux's ``MAX_ARG_STRLEN`` (32 pages) for one ``NAME=VALUE``
one argument ≤ 128 KiB      the same limit for each word of ``command``
all of it ≤ 1 MiB           ``ARG_MAX`` is a quarter of the stack limit (2 MiB with the
                            usual 8 MiB stack); half of it leaves room for the worker's
                            own environment and a smaller stack limit
working_dir ≤ 4095 bytes    ``PATH_MAX`` (4096, with its NUL)
==========================  ==========================================================

Every failure is a :class:`~worker.job.ConfigurationError` (raised by the caller with
:func:`problems`' first message): the deployment's or the run's fault, shown as the run's
CRASHED message in the UI.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

ENTRY_MAX: Final = 128 * 1024
"""Largest ``NAME=VALUE`` or argument, with its NUL (Linux ``MAX_ARG_STRLEN``)."""

TOTAL_MAX: Final = 1024 * 1024
"""Largest command plus environment (half of the usual ``ARG_MAX``: see the module doc)."""

PATH_MAX: Final = 4096
"""Longest working directory, with its NUL."""


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def env_problems(env: Mapping[str, str | None], what: str = "env") -> Iterator[str]:
    """Why each entry of ``env`` cannot be passed to a process (none: it can)."""
    for name, value in env.items():
        if not name:
            yield f"job variable '{what}' has an empty variable name"
            continue
        shown = name if len(name) <= 80 else name[:80] + "…"
        if "=" in name:
            yield f"job variable '{what}.{shown}': a variable name cannot contain '='"
        if "\0" in name:
            yield f"job variable '{what}.{shown!r}': a variable name cannot contain a NUL character"
        if value is None:
            continue
        if "\0" in value:
            yield f"job variable '{what}.{shown}': the value contains a NUL character"
        size = _size(name) + _size(value) + 2
        if size > ENTRY_MAX:
            yield (
                f"job variable '{what}.{shown}' is {size} bytes; one environment variable "
                f"may be at most {ENTRY_MAX} bytes (Linux's MAX_ARG_STRLEN)"
            )


def argv_problems(argv: Sequence[str]) -> Iterator[str]:
    """Why each word of the command cannot be passed to ``execve`` (none: it can)."""
    for word in argv:
        if "\0" in word:
            yield "job variable 'command' contains a NUL character"
            return
        if _size(word) + 1 > ENTRY_MAX:
            yield (
                f"job variable 'command' has a word of {_size(word)} bytes; "
                f"at most {ENTRY_MAX - 1} (Linux's MAX_ARG_STRLEN)"
            )
            return


def total_problem(argv: Sequence[str], env: Mapping[str, str | None]) -> str | None:
    """Whether command and environment together fit what ``execve`` takes."""
    total = sum(_size(w) + 1 for w in argv) + sum(
        _size(k) + _size(v) + 2 for k, v in env.items() if v is not None
    )
    if total > TOTAL_MAX:
        return (
            f"job variables 'command' and 'env' come to {total} bytes with the worker's environment; "
            f"a process may be given at most {TOTAL_MAX}"
        )
    return None


def working_dir_problem(path: Path | None) -> str | None:
    if path is None:
        return None
    text = str(path)
    if "\0" in text:
        return "job variable 'working_dir' contains a NUL character"
    if _size(text) + 1 > PATH_MAX:
        return f"job variable 'working_dir' is {_size(text)} bytes long; at most {PATH_MAX - 1} (PATH_MAX)"
    return None


def spawn_problems(argv: Sequence[str], env: Mapping[str, str | None], working_dir: Path | None) -> list[str]:
    """Everything wrong with spawning ``argv`` in ``working_dir`` with ``env``."""
    found = [*argv_problems(argv), *env_problems(env)]
    for extra in (working_dir_problem(working_dir), None if found else total_problem(argv, env)):
        if extra is not None:
            found.append(extra)
    return found
