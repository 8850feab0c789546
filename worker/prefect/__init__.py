"""The Prefect side: the REST client, its answers and outages, the events stream, the UI.

Everything the worker says to and hears from a Prefect server: the conversation (``session``: httpx,
headers, auth, retries, the call deadline), the typed calls (``api``), the one place answers
are decoded and errors named (``answers``), outages and their probe (``outage``), the
events websocket (``events``), the run-log lines and ``prefect.worker.*`` events the UI shows
(``ui``), the work pool (``pool``), and reads reused for a while (``cache``).

May import: ``worker.host``, ``worker.rules``. Knows nothing of processes or of a run's life.
"""
