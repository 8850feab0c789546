"""Warm engine starts (``warm_start``): which runs may fork from a preloaded engine, and
the engine servers they fork from.

A cold run pays for ``import prefect`` (about a CPU-second and 80 MiB) before the engine
does anything. With ``warm_start`` on, a run whose command is the engine's own
(``<python> -m prefect.engine``, the default) is forked from an engine server
(``engine_server.py``) that imported Prefect once; its process then shares those pages.

Policy, stated once:

* **Never wrong, only slower.** Anything the warm path cannot do exactly as a cold start
  would starts the run cold, said once per reason (``warm_start.cold``): a custom
  command, an interpreter whose Prefect cannot refresh its settings for a run (before
  3.6), a failed preload, a server that died or whose ``sys.path`` changed (a ``pip
  install``) since it started, an answer that did not come in time.
* **One server per start key** (:func:`start_key`): the interpreter the command names,
  resolved as the cold start would resolve it, and the environment variables read when
  an interpreter starts (:func:`read_at_start`). Most pools need one.
* **Started lazily**, by the first run that needs it, which waits for the preload (at most
  ``PRELOAD_TIMEOUT``, then cold); later runs fork in milliseconds. A server runs in its
  own session; its stdin is the worker's pipe, and EOF ends it.
* **Few, and only while used.** At most ``MAX_SERVERS`` servers are alive. A run whose
  key has no server, when the cap is reached, makes room by retiring the least recently
  used *idle* server (no run waiting for it or forking from it); if every server is busy,
  the run starts cold ("engine server cap reached"). A server no run forked from for
  ``IDLE_RETIRE`` seconds is retired. Retiring closes the server's stdin (it exits at
  EOF; killed if it has not after 5 s) and reaps it; the next server starts only once it
  is gone, so no more than ``MAX_SERVERS`` ever live at once. The runs it forked are
  the worker's children, not its own: they go on untouched (as when a server dies).
* **Supervised like a spawned child.** The server forks each run through an
  intermediate child, so the run's process is re-parented to the worker (a child
  subreaper, ``reaper.become_subreaper``) and the worker reads its true exit status; a
  server that dies loses none of its runs. The fork is requested inside
  ``reaper.CHILDREN.spawning()`` and the process only starts the engine after the worker
  registered its pid and said go (``engine_server.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import structlog
import trio

from worker.host.logs import Once
from worker.process import reaper
from worker.process.startkey import Key, start_key
from worker.rules import childenv

log = structlog.get_logger("flow_worker")

SERVER: Final = Path(__file__).with_name("engine_server.py")
LOADER: Final = "import sys;exec(compile(open(sys.argv[1],'rb').read(),sys.argv[1],'exec'))"
"""``-c`` code that runs the server file: ``sys.path[0]`` is then ``''`` (the server runs in
``/``), not the worker package's directory, whose modules could shadow a flow's imports."""
PRELOAD_TIMEOUT: Final = 120.0
"""How long runs wait for a server's preload before starting cold: ``import prefect``
takes seconds on a loaded small host; a server that hangs must not hold runs for ever."""
ANSWER_TIMEOUT: Final = 10.0
"""How long a fork may take to be answered (milliseconds normally). On a timeout the
server is killed, so the process it may have forked never starts the engine."""
MAX_SERVERS: Final = 4
"""Engine servers alive at once. Most pools need one (one interpreter, one environment);
a few deployments with their own interpreter or ``TZ``/``LANG``/``PYTHON*`` fit beside it.
Each holds ~80 MiB that no run needs until one forks from it, so the cap bounds what warm
starts hold ahead of need to ~320 MiB, however many start keys the runs bring (a run per
``TZ`` would otherwise make a server per run). Past it a run starts cold: what every run
cost before ``warm_start``, never wrong, only slower."""
IDLE_RETIRE: Final = 600.0
"""Seconds a server may go without a fork before it is retired. A burst of runs, or a
schedule every few minutes, keeps reusing it; an hourly schedule pays one preload per run
(about what its cold start would cost, and the run waits for it the same) instead of
holding ~80 MiB for the hour."""
REMEMBERED: Final = 64
"""Dead servers (failed preloads) kept to answer their key's runs cold at once without a
new preload; beyond it the oldest are forgotten (a run of its key tries a preload again)."""
CAP_REACHED: Final = "engine server cap reached"


class Unavailable(Exception):
    """The server cannot fork this run; the message is the reason the run starts cold."""


@attrs.define(eq=False)
class EngineServer:
    """One engine server process and the conversation with it (one fork at a time)."""

    key: Key
    script: Path = SERVER
    process: trio.Process | None = None
    ready: trio.Event = attrs.Factory(trio.Event)
    """Set once the preload is done or failed (then ``problem`` says why)."""
    problem: str | None = None
    """Why it cannot fork (failed preload, dead, stale, unanswered); None while it can."""
    preload_failed: bool = False
    prefect_version: str = ""
    exited: trio.Event = attrs.Factory(trio.Event)
    """Set once its process is reaped (or could not start)."""
    last_used: float = attrs.Factory(trio.current_time)
    """When a run last asked for it or a fork from it ended (trio's clock)."""
    wanted: int = 0
    """Runs that asked for it and have not finished forking (waiting for the preload, or
    handed it by :meth:`WarmStarts.server_for`): while any do, it is not retired."""
    _lock: trio.Lock = attrs.Factory(trio.Lock)
    _buffer: bytes = b""
    _next_id: int = 0

    def idle(self) -> bool:
        """Ready to fork, and no run waiting for it or forking from it: it may be retired."""
        return (
            self.ready.is_set()
            and self.problem is None
            and not self.exited.is_set()
            and not self.wanted
            and not self._lock.locked()
        )

    def retire(self, why: str) -> None:
        """No run may fork from it any more (:meth:`stop` then ends it)."""
        self._fail(f"the engine server was retired ({why})")
        pid = self.process.pid if self.process is not None else None
        log.info("warm_start.retired", python=self.key.python, reason=why, pid=pid)

    async def run(self, environ: Mapping[str, str], after: EngineServer | None = None) -> None:
        """Start the server (once ``after``, the one it replaces, has ended), wait for its
        preload, then wait for its exit (reaping it)."""
        try:
            if after is not None:
                await after.stop()
        except BaseException:
            self._fail("the worker is stopping", preload=True)
            self.ready.set()
            self.exited.set()
            raise
        try:
            with reaper.CHILDREN.spawning():
                self.process = await trio.lowlevel.open_process(
                    [self.key.python, "-c", LOADER, str(self.script)],
                    cwd="/",
                    env=self.key.server_env(environ),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                reaper.CHILDREN.spawned.add(self.process.pid)
        except Exception as exc:  # OSError, or ValueError for a value no process can take
            self._fail(f"the engine server could not start: {type(exc).__name__}: {exc}", preload=True)
            self.ready.set()
            self.exited.set()
            return
        proc = self.process
        log.info("warm_start.starting", python=self.key.python, pid=proc.pid)
        try:
            try:
                with trio.move_on_after(PRELOAD_TIMEOUT) as scope:
                    ready = await self._ready_message()
                if scope.cancelled_caught:
                    self._fail(f"the preload took longer than {PRELOAD_TIMEOUT:g} s", preload=True)
                    self.kill()
                elif ready is None:
                    self._fail("the engine server exited during its preload", preload=True)
                elif ready.get("ready"):
                    self.prefect_version = str(ready.get("prefect", "?"))
                    log.info(
                        "warm_start.ready", python=self.key.python, prefect=self.prefect_version, pid=proc.pid
                    )
                else:
                    self._fail(str(ready.get("error", "the preload failed")), preload=True)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(f"the engine server's pipe failed during its preload: {exc}", preload=True)
                self.kill()
            self.ready.set()
            await proc.wait()
            self._fail(f"the engine server exited (status {proc.returncode})")
        finally:
            with trio.CancelScope(shield=True):
                self.ready.set()
                if proc.returncode is None:
                    await self.stop()
                reaper.CHILDREN.spawned.discard(proc.pid)
                self._fail("the engine server was stopped")
                self.exited.set()

    async def _ready_message(self) -> dict[str, Any] | None:
        """The server's first JSON object; lines before it that are not one (something the
        interpreter printed at start, e.g. a ``sitecustomize``) are skipped."""
        while (line := await self._line()) is not None:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and "ready" in message:
                return message
        return None

    def _fail(self, problem: str, preload: bool = False) -> None:
        if self.problem is None:
            self.problem = problem
            self.preload_failed = preload

    async def _line(self) -> bytes | None:
        assert self.process is not None and self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.send_all((json.dumps(message) + "\n").encode())

    async def fork(
        self, request: dict[str, Any], before_go: Callable[[int], Awaitable[None]] | None = None
    ) -> int:
        """Fork a run's process; its pid is registered in ``reaper.CHILDREN``, and
        ``before_go(pid)`` called (the move into the run's cgroup), before it is told to go:
        the process waits on its go pipe until then. Call inside ``reaper.CHILDREN.spawning()``. Raises
        :class:`Unavailable` if it cannot (then nothing of the run was started).

        A conversation that does not end as the protocol says (a timeout, a broken pipe,
        a garbled answer, or the caller cancelled half-way) retires the server: it is
        killed, so a process it forked and never heard go for exits having run nothing,
        and it is no longer asked."""
        try:
            return await self._fork(request, before_go)
        finally:
            if self.wanted:
                self.wanted -= 1  # the run that server_for handed this server to
            self.last_used = trio.current_time()

    async def _fork(self, request: dict[str, Any], before_go: Callable[[int], Awaitable[None]] | None) -> int:
        async with self._lock:
            if self.problem is not None:
                raise Unavailable(self.problem)
            self._next_id += 1
            ident = self._next_id
            pid: int | None = None
            finished = False
            try:
                with trio.fail_after(ANSWER_TIMEOUT):
                    await self._send({**request, "id": ident})
                    line = await self._line()
                if line is None:
                    raise Unavailable("the engine server is gone")
                answer = json.loads(line)
                if not isinstance(answer, dict) or answer.get("id") != ident:
                    raise Unavailable(f"the engine server answered out of turn: {line[:200]!r}")
                if "pid" not in answer:
                    error = str(answer.get("error", "no pid in the answer"))
                    if not error.startswith("stale"):
                        finished = True  # e.g. a failed fork: the server itself is fine
                    raise Unavailable(error)
                pid = int(answer["pid"])
                reaper.CHILDREN.spawned.add(pid)
                if before_go is not None:
                    await before_go(pid)
                await self._send({"go": ident})
                finished = True
                return pid
            except trio.TooSlowError:
                raise Unavailable(f"the engine server did not answer within {ANSWER_TIMEOUT:g} s") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise Unavailable(f"the engine server is gone ({exc})") from None
            except (ValueError, TypeError) as exc:
                raise Unavailable(f"the engine server's answer is not what it should be ({exc})") from None
            finally:
                if not finished:
                    if pid is not None:  # never told go: it exits, and the orphan reaper takes it
                        reaper.CHILDREN.spawned.discard(pid)
                    exc_now = sys.exc_info()[1]
                    self._fail(str(exc_now) if isinstance(exc_now, Unavailable) else "a fork was interrupted")
                    self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def stop(self) -> None:
        """Close its stdin (it exits at EOF); kill it if it has not after 5 s."""
        if self.process is None:
            return
        if self.process.stdin is not None:
            try:
                await self.process.stdin.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with trio.move_on_after(5):
            await self.process.wait()
        self.kill()
        await self.process.wait()


@attrs.define
class WarmStarts:
    """The worker's engine servers, by start key (least recently used first); started
    lazily, retired when idle or to make room, stopped with the worker."""

    enabled: bool = False
    environ: Mapping[str, str] = attrs.Factory(lambda: childenv.inherited(os.environ))
    """What a server's environment starts from (its start-time variables are the key's): the
    worker's, less the service manager's variables and ``FLOW_WORKER_*`` (``childenv.py``),
    as a cold run's; a forked run's ``/proc/PID/environ`` is the server's."""
    servers: dict[Key, EngineServer] = attrs.Factory(dict)
    """By key, the least recently used first."""
    once: Once = attrs.Factory(Once)
    _retiring: set[EngineServer] = attrs.Factory(set)
    """Retired for idleness and not yet ended (they count against the cap until then)."""
    _nursery: trio.Nursery | None = None
    _ready: trio.Event = attrs.Factory(trio.Event)

    async def serve(self) -> None:
        """The task that owns the servers (in the supervisor's loops nursery) and retires
        those idle for ``IDLE_RETIRE``."""
        if not self.enabled:
            return
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._ready.set()
                while True:
                    await trio.sleep_until(self._retire_idle())
        finally:
            self._nursery = None

    def alive(self) -> int:
        """Servers whose process lives or is about to start: what the cap counts."""
        servers = [*self._retiring, *self.servers.values()]
        return sum(1 for server in servers if not server.exited.is_set())

    def _retire_idle(self) -> float:
        """Retire the servers idle for ``IDLE_RETIRE``; when to look again."""
        now = trio.current_time()
        due = now + IDLE_RETIRE  # a server used from now on is due no earlier
        for server in list(self.servers.values()):
            if not server.idle():
                continue  # busy: its fork's end makes it due later; dead: not alive
            if server.last_used + IDLE_RETIRE > now:
                due = min(due, server.last_used + IDLE_RETIRE)
                continue
            del self.servers[server.key]
            server.retire(f"idle for {IDLE_RETIRE:g} s")
            self._retiring.add(server)
            assert self._nursery is not None
            self._nursery.start_soon(self._end_retired, server)
        return due

    async def _end_retired(self, server: EngineServer) -> None:
        try:
            await server.stop()
        finally:
            self._retiring.discard(server)

    async def server_for(self, argv: list[str], env: Mapping[str, str], cwd: str) -> EngineServer | str:
        """The ready server this run may fork from, or why it starts cold (said once).

        A server returned is counted as wanted until the run's :meth:`EngineServer.fork`
        ends, so call that next, with no checkpoint in between."""
        key = start_key(argv, env, cwd)
        if isinstance(key, str):
            return self._cold(key, key)
        server = self.servers.get(key)
        if server is not None and server.problem is not None and not server.preload_failed:
            reason = server.problem  # died or went stale: this run cold, later ones a fresh server
            self._replace(server)
            return self._cold((key, reason), reason, python=key.python)
        if server is None:
            await self._ready.wait()
            # look again, with no checkpoint before the launch: a run that asked meanwhile
            # may have launched it (one server per key, however many runs arrive at once)
            found = self.servers.get(key) or self._launch_within_cap(key)
            if isinstance(found, str):
                return self._cold(CAP_REACHED, found, python=key.python)
            if found is None:
                return "the worker is stopping"
            server = found
        self.servers[key] = self.servers.pop(key)  # the most recently used last
        server.last_used = trio.current_time()
        server.wanted += 1
        handed = False
        try:
            await server.ready.wait()
            if server.problem is not None:
                return self._cold((key, server.problem), server.problem, python=key.python)
            handed = True
            return server
        finally:
            if not handed:
                server.wanted -= 1

    def _launch_within_cap(self, key: Key) -> EngineServer | str | None:
        """Launch a server for ``key``, retiring the least recently used idle one if the
        cap is reached; the reason the run starts cold if none is idle."""
        if self._nursery is None:
            return None  # the worker is stopping
        victim = None
        if self.alive() >= MAX_SERVERS:
            victim = next((s for s in self.servers.values() if s.idle()), None)
            if victim is None:
                return f"{CAP_REACHED} ({MAX_SERVERS})"
            del self.servers[victim.key]
            victim.retire(f"least recently used, to make room (cap {MAX_SERVERS})")
        else:
            self.once.clear(CAP_REACHED)
        return self._launch(key, after=victim)

    def _launch(self, key: Key, after: EngineServer | None = None) -> EngineServer | None:
        if self._nursery is None:
            return None
        server = self.servers[key] = EngineServer(key)
        self._nursery.start_soon(server.run, self.environ, after)
        if len(self.servers) > MAX_SERVERS + REMEMBERED:
            dead = [k for k, s in self.servers.items() if s.exited.is_set()]
            for old in dead[: len(self.servers) - MAX_SERVERS - REMEMBERED]:
                del self.servers[old]
        return server

    def _replace(self, server: EngineServer) -> None:
        """Replace a server that can no longer fork (it died, went stale or hung): the
        next run of its key waits for a fresh one, started once this one has ended."""
        if self.servers.get(server.key) is server:
            del self.servers[server.key]
            server.kill()
            self._launch(server.key, after=server)

    def said_cold(self, server: EngineServer, reason: str) -> None:
        """A fork that could not be made: this run starts cold (said once per reason)."""
        if server.problem is not None:
            self._replace(server)
        self._cold((server.key, reason), reason, python=server.key.python)

    def _cold(self, said: Any, reason: str, **fields: Any) -> str:
        self.once.say(said, log, "info", "warm_start.cold", reason=reason, effect="started cold", **fields)
        return reason
