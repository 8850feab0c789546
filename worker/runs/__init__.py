"""One run's life, from claim to report, and the runs in hand.

Claim → configure → spawn → watch → outcome → report (``run``), the previous worker's
ledger after a restart (``reconcile``), the engines' control channel (``control``), and the
check that the engine's interpreter can import Prefect (``interpreter``).

May import: ``worker.fleet`` and everything below it.
"""
