"""What a run's process inherits of the worker's environment.

Prefect's worker passes its whole ``os.environ`` to a flow run, and so does flow-worker,
less what belongs to the worker alone:

* **the service manager's variables** (:data:`SERVICE_MANAGER`): a flow that inherits
  ``NOTIFY_SOCKET`` could tell systemd the worker is ready or stopping, ``WATCHDOG_*``
  and ``LISTEN_*`` describe the worker's process and descriptors, the ``*_DIRECTORY``
  variables name the worker's private directories (its ledger);
* **the worker's own settings** (``FLOW_WORKER_*``).

What a flow is documented to get stays: the Prefect settings the worker was given
(``PREFECT_API_URL`` …), ``PREFECT__FLOW_RUN_ID`` and the other run variables, the
control channel's ``PREFECT__CONTROL_PORT`` and ``PREFECT__CONTROL_TOKEN``, and anything
the job's ``env`` sets, even one of these names. Every process the worker starts for
runs (spawned runs, engine servers, the interpreter check) starts from :func:`inherited`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

SERVICE_MANAGER: Final = frozenset(
    {
        "NOTIFY_SOCKET",
        "WATCHDOG_PID",
        "WATCHDOG_USEC",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
        "CACHE_DIRECTORY",
        "LOGS_DIRECTORY",
        "CONFIGURATION_DIRECTORY",
        "CREDENTIALS_DIRECTORY",
        "MANAGERPID",
        "MAINPID",
        "SYSTEMD_EXEC_PID",
        "PIDFILE",
        "FDSTORE",
        "MEMORY_PRESSURE_WATCH",
        "MEMORY_PRESSURE_WRITE",
        "TRIGGER_UNIT",
        "TRIGGER_PATH",
        "TRIGGER_TIMER_REALTIME_USEC",
        "TRIGGER_TIMER_MONOTONIC_USEC",
    }
)
"""What systemd (systemd.exec(5), "Environment Variables in Spawned Processes") sets for
the worker's own process, and no flow should act on."""

WORKER_PREFIX: Final = "FLOW_WORKER_"


def inherited(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less the service manager's variables and ``FLOW_WORKER_*``."""
    return {
        name: value
        for name, value in environ.items()
        if name not in SERVICE_MANAGER and not name.startswith(WORKER_PREFIX)
    }
