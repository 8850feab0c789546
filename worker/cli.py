"""``flow-worker``: parse arguments, load settings, run the supervisor, map the outcome
to an exit code.

Exit codes: 0 all good (with ``--once``: every child exited 0), 1 a run crashed or
could not start (``--once``; with Prefect's ``--run-once`` that is 0, as Prefect's worker
exits), 2 usage or configuration error.

Every flag of ``prefect worker start`` (3.9.1) is accepted with Prefect's meaning:
``-n -p -q --empty-work-queue -t --prefetch-seconds --[no-]run-once -l
--[no-]with-healthcheck --install-policy --base-job-template
--[no-]create-pool-if-not-found --profile --[no-]prompt``; a ``--type`` other than
``process`` is refused with one line that says why.

``flow-worker base-job-template`` prints Prefect's default process base job template with
the per-run resource limits added as job variables (``runlimits.py``), for ``prefect
work-pool create|update --base-job-template``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker import __version__

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flow-worker",
        description="A lightweight drop-in replacement for `prefect worker start --type process`.",
        epilog="`flow-worker base-job-template` prints the pool job template with the per-run "
        "limits (memory_max, memory_high, cpu_weight, cpu_max, pids_max) as job variables.",
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
    p.add_argument(
        "--empty-work-queue",
        dest="work_queues",
        action="store_const",
        const=[],
        help="every queue of the pool (Prefect's flag: no -q given before it)",
    )
    p.add_argument("-n", "--name", help="worker name (default: 'ProcessWorker <uuid>')")
    p.add_argument("-l", "--limit", type=int, help="most flow runs at once")
    p.add_argument("--prefetch-seconds", type=float, help="claim runs due this many seconds ahead")
    p.add_argument(
        "--once", action="store_true", help="drain the runs due now, wait for them, exit (1 if one crashed)"
    )
    p.add_argument(
        "--run-once",
        action=argparse.BooleanOptionalAction,
        help="Prefect's flag: as --once, but exit 0 after a crashed run, as Prefect's worker does",
    )
    p.add_argument("--with-healthcheck", action=argparse.BooleanOptionalAction, help="serve GET /health")
    p.add_argument(
        "--create-pool-if-not-found",
        action=argparse.BooleanOptionalAction,
        help="create the work pool if it does not exist (default: yes)",
    )
    p.add_argument("--profile", help="the Prefect profile to read; its settings win over the environment")
    p.add_argument(
        "--prompt",
        action=argparse.BooleanOptionalAction,
        help="accepted (Prefect's flag): flow-worker never prompts",
    )
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
        supervisor = Supervisor(settings, client, ledger)
        gc.enable()  # see `main`
        return await supervisor.run()
    finally:
        await client.aclose()
        ledger.close()


def base_job_template() -> str:
    """Prefect's default process template with the per-run limits as job variables (JSON)."""
    import json

    from worker.rules import runlimits
    from worker.rules.job import ProcessJobConfiguration

    template = runlimits.base_job_template(ProcessJobConfiguration.default_base_job_template())
    return json.dumps(template, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    """The command. The garbage collector is off while the worker starts, until the
    supervisor is built: its imports and set-up make about 100,000 objects that live as
    long as the process, and the collections they would set off cost start-up about 20 ms
    for nothing (issue 22: start to first poll). (Not frozen with ``gc.freeze`` then: the
    start's cyclic garbage would be kept for good, 1.1 MiB of idle RSS side by side.)"""
    gc.disable()
    try:
        return _main(argv)
    finally:
        gc.enable()


def _main(argv: Sequence[str] | None) -> int:
    import structlog
    import trio

    from worker.books.ledger import Ledger, LedgerError, default_state_dir
    from worker.host import logs, private
    from worker.host import settings as settings_mod
    from worker.prefect import ui

    if list(sys.argv[1:] if argv is None else argv)[:1] == ["base-job-template"]:
        print(base_job_template())
        return EXIT_OK
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config_path", None)
    worker_type = args.pop("worker_type", "process")
    install_policy = args.pop("install_policy", None)
    profile = args.pop("profile", None)
    args.pop("prompt", None)  # nothing is ever asked
    run_once = args.pop("run_once", None)
    if run_once is not None and "once" not in args:
        args["once"] = run_once
    if worker_type != "process":
        print(
            f"flow-worker: --type {worker_type!r} is not supported: flow-worker is a process worker "
            "(use `prefect worker start` for other types)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        settings = settings_mod.validated(settings_mod.load(args, config_path=config_path, profile=profile))
    except settings_mod.SettingsError as exc:
        print(f"flow-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        where = settings.state_dir
        ledger = Ledger(Path(where) if where else default_state_dir(os.environ, settings.pool or ""))
        ledger.open()
    except LedgerError as exc:
        print(f"flow-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(settings.log_format, settings.log_level, taps=[ui.TAP])
    for path, mode, names in private.exposed_secrets(settings.config_file, settings.pool, os.environ):
        structlog.get_logger("flow_worker").warning(
            "config.secret_readable",
            path=path,
            mode=f"{mode:04o}",
            secrets=",".join(names),
            detail=f"{path} holds {', '.join(names)} and its group or others can read it: "
            f"chmod 600 {path} (owned by the user that reads it), or keep secrets in the unit's "
            "EnvironmentFile= (mode 0600)",
        )
    before, after = raise_open_files_limit()
    structlog.get_logger("flow_worker").debug("worker.open_files_limit", before=before, after=after)
    if install_policy is not None:
        structlog.get_logger("flow_worker").info(
            "worker.install_policy_ignored", install_policy=install_policy, reason="nothing to install"
        )
    code = trio.run(_amain, settings, ledger)
    return EXIT_OK if run_once and code == EXIT_RUN_FAILED else code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
