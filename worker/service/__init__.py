"""The daemon as a whole: the supervisor's nursery and loops, the stop policy, what it says
about itself.

The nursery tree and start-up order (``supervisor``), the poll, cancel and heartbeat loops
(``loops``), a bug in a loop (``guard``), the stop policy (``stopping``), the watchdog's
verdict (``liveness``), and ``STATUS=``, ``/health`` and ``/metrics`` (``status``).

May import: every package below it (``runs`` down to ``rules``); only ``worker.cli`` imports it.
"""
