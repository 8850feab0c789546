"""The books: which runs this worker holds, and what it owes the API about them.

The on-disk ledger of owned runs (``ledger``: atomic JSON per run in a locked directory) and
the states owed to the API, written to the ledger first and delivered once, kept through
outages (``reporter``).

May import: ``worker.prefect``, ``worker.process``, ``worker.host``, ``worker.rules``.
"""
