"""The fleet: the pool's workers watching each other.

The loops that reclaim a lost peer's runs and fence this worker after a heartbeat gap
(``reclaim``); their verdicts are tables in ``worker.rules.fleet``.

May import: ``worker.books`` and everything below it.
"""
