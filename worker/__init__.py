"""flow-worker: a lightweight, systemd-native Prefect process worker that never imports prefect."""

__version__ = "0.1.0"
