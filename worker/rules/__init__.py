"""Pure rules: what the worker decides, with no I/O.

The API's objects (``models``), every decision as a table (``decisions``), the base job
template and the job configuration (``templating``, ``job``), what the OS accepts of a run
(``limits``), admission by memory (``admission``), the fleet's tables (``fleet``), the
retry policy (``retry``) and a run's resource limits (``runlimits``). Functions of their
arguments: tested without a server, a process or a clock.

May import: the standard library, attrs, cattrs, and other ``worker.rules`` modules. Nothing
that does I/O (no trio, httpx, structlog configuration, files, processes), and no other
``worker`` package.
"""
