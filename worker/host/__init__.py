"""The host adapters: settings, logging, systemd's protocols, the ``/health`` server, metrics,
memory, private files.

How the worker meets the machine it runs on, each without knowing about runs: the frozen
``Settings`` from TOML, environment and flags (``settings``), structlog's configuration
(``logs``), sd_notify and journald (``systemd``), the h11 health server and the connection
cap it shares with the control port (``health``, ``gate``), Prometheus counters
(``metrics``), memory left for runs (``memory``), directories and files only the worker's
user can touch (``private``).

May import: ``worker.rules``. Nothing above it.
"""
