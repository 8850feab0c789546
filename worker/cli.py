"""``flow-worker``: parse arguments, load settings, run the supervisor, map the outcome
to an exit code.

Exit codes: 0 all good (with ``--once``: every child exited 0), 1 a run crashed or
could not start (``--once``), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from worker import __version__

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flow-worker",
        description="A lightweight drop-in replacement for `prefect worker start --type process`.",
        argument_default=argparse.SUPPRESS,  # only flags that were given override file/env
    )
    p.add_argument("-p", "--pool", help="work pool to serve")
    p.add_argument("-t", "--type", dest="worker_type", help="worker type: only 'process' (Prefect's flag)")
    p.add_argument("--base-job-template", help="JSON job template for a pool the worker creates")
    p.add_argument(
        "--install-policy",
        choices=["always", "if-not-present", "never", "prompt"],
        help="accepted for Prefect's compatibility; a process worker has nothing to install",
    )
    p.add_argument("-q", "--work-queue", dest="work_queues", action="append", help="queue name (repeatable)")
    p.add_argument("-n", "--name", help="worker name (default: 'ProcessWorker <uuid>')")
    p.add_argument("-l", "--limit", type=int, help="most flow runs at once")
    p.add_argument("--prefetch-seconds", type=float, help="claim runs due this many seconds ahead")
    p.add_argument("--once", action="store_true", help="drain the runs due now, wait for them, exit")
    p.add_argument("--run-once", dest="once", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--with-healthcheck", action="store_true", help="serve GET /health")
    p.add_argument("--state-dir", help="directory for the ledger of owned runs")
    p.add_argument(
        "--hook-timeout-seconds", type=float, help="time a flow's on_crashed / on_cancellation hooks may take"
    )
    p.add_argument(
        "--config", dest="config_path", type=Path, help="TOML config file ('-PATH': only if it exists)"
    )
    p.add_argument("--log-format", choices=["auto", "console", "json", "journald"])
    p.add_argument("--version", action="version", version=f"flow-worker {__version__}")
    return p


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return (before, after).

    Each live run holds about five descriptors (two output files, a pidfd, the control
    connection, a meter's reads), and systemd's default soft limit is 1024. The worker
    uses no ``select()``, so, as systemd.exec(5) advises for such programs, it takes the
    hard limit (``LimitNOFILE=`` in the unit) itself. Runs inherit the raised limit.
    Running short anyway only delays runs: see ``decisions.shortage``."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, hard
    return soft, soft


async def _amain(settings: Any, ledger: Any) -> int:
    from worker.prefect.api import PrefectClient
    from worker.service.supervisor import Supervisor

    client = PrefectClient.from_settings(settings)
    try:
        return await Supervisor(settings, client, ledger).run()
    finally:
        await client.aclose()
        ledger.close()


def main(argv: Sequence[str] | None = None) -> int:
    import structlog

    from worker.books.ledger import Ledger, LedgerError, default_state_dir
    from worker.host import logs
    from worker.host import settings as settings_mod
    from worker.prefect import ui

    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config_path", None)
    worker_type = args.pop("worker_type", "process")
    install_policy = args.pop("install_policy", None)
    if worker_type != "process":
        print(
            f"flow-worker: --type {worker_type!r} is not supported: flow-worker is a process worker "
            "(use `prefect worker start` for other types)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        settings = settings_mod.validated(settings_mod.load(args, config_path=config_path))
    except settings_mod.SettingsError as exc:
        print(f"flow-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ledger = Ledger(
        Path(settings.state_dir) if settings.state_dir else default_state_dir(os.environ, settings.pool or "")
    )
    try:
        ledger.open()
    except LedgerError as exc:
        print(f"flow-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(settings.log_format, settings.log_level, taps=[ui.TAP])
    before, after = raise_open_files_limit()
    structlog.get_logger("flow_worker").debug("worker.open_files_limit", before=before, after=after)
    if install_policy is not None:
        structlog.get_logger("flow_worker").info(
            "worker.install_policy_ignored", install_policy=install_policy, reason="nothing to install"
        )
    return trio.run(_amain, settings, ledger)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
