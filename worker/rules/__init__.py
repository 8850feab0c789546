"""Pure rules: what the worker decides, with no I/O.

The API's objects (``models``), every decision as a table (``decisions``), the base job
template, the job variables and the job configuration (``templating``, ``variables``,
``job``), what the OS accepts of a run (``limits``), admission by memory (``admission``),
the fleet's tables (``fleet``), the retry policy (``retry``), what is secret and how it
is masked (``secrecy``), what a run inherits of the worker's environment (``childenv``)
and a run's resource limits (``runlimits``). Functions of their arguments: tested
without a server, a process or a clock.

May import: the standard library, attrs, cattrs, and other ``worker.rules`` modules. Nothing
that does I/O (no trio, httpx, structlog configuration, files, processes), and no other
``worker`` package.
"""
