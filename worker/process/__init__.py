"""Child processes: spawn, watch, kill, reap; their output and their cost; warm starts.

A run's process as the operating system sees it: the handles and their kill policy
(``handle``; ``spawned``, ``adopted``, ``forked``: one per kind of child), the true exit
status, the reaper of re-parented orphans and the leftover sweep (``reaper``), output
followed within a budget (``output``; ``inotify`` wakes it when written), the cost of a
process tree (``usage``), the preloaded engine servers of ``warm_start`` (``warm``;
``engine_server`` runs in the flow's interpreter, stdlib and Prefect only), and per-run
cgroups where systemd delegates a cgroup v2 subtree (``delegated``: the subtree and the
worker's leaf; ``cgroups``: a run's cgroup; ``placed``: a spawn started inside its cgroup).

May import: ``worker.host``, ``worker.rules``. Knows nothing of the Prefect API.
"""
