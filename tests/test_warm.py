"""Warm starts: which runs may fork, from which server, with which sys.path; and the engine
servers themselves (fakes that speak the protocol): conversations gone wrong, one server
per key, the cap, least recently used first, idle retirement."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from tests.said import Said
from worker.process.engine_server import run_path
from worker.process.startkey import Key, read_at_start, start_key

ENGINE = [sys.executable, "-m", "prefect.engine"]


def test_only_the_engine_command_forks() -> None:
    env = {"PATH": os.environ["PATH"]}
    assert isinstance(start_key(ENGINE, env, "/tmp"), Key)
    for argv in (
        [sys.executable, "-u", "-m", "prefect.engine"],
        [sys.executable, "-m", "prefect.engine", "extra"],
        [sys.executable, "-m", "prefect.engine.other"],
        ["prefect", "flow-run", "execute"],
        ["sh", "-c", "python -m prefect.engine"],
    ):
        assert start_key(argv, env, "/tmp") == "the run's command is not `<python> -m prefect.engine`"


def test_the_interpreter_is_resolved_as_a_cold_start_would(tmp_path: Path) -> None:
    bare = start_key(["python3", "-m", "prefect.engine"], {"PATH": str(Path(sys.executable).parent)}, "/")
    assert isinstance(bare, Key) and bare.python == str(Path(sys.executable).parent / "python3")
    assert start_key(["python3", "-m", "prefect.engine"], {"PATH": str(tmp_path)}, "/") == (
        "'python3' is not on the run's PATH"
    )
    relative = start_key(["venv/bin/python", "-m", "prefect.engine"], {}, "/srv/flows")
    assert isinstance(relative, Key) and relative.python == "/srv/flows/venv/bin/python"


def test_variables_read_at_start_pick_the_server() -> None:
    for name in ("PYTHONUNBUFFERED", "PYTHONHASHSEED", "LC_ALL", "LANG", "LD_PRELOAD", "HOME", "TZ"):
        assert read_at_start(name), name
    for name in ("PYTHONPATH", "PREFECT_LOGGING_LEVEL", "PATH", "FOO"):
        assert not read_at_start(name), name
    base = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "PREFECT_API_URL": "a"}
    one = start_key(ENGINE, base, "/")
    same = start_key(ENGINE, {**base, "PREFECT_API_URL": "b", "PYTHONPATH": "/x"}, "/")
    other = start_key(ENGINE, {**base, "PYTHONUNBUFFERED": "1"}, "/")
    assert one == same, "settings and PYTHONPATH are applied in the forked run"
    assert one != other, "an interpreter-start variable needs a server of its own"
    assert isinstance(other, Key)
    assert other.server_env({"PYTHONPATH": "/y", "PYTHONUNBUFFERED": "0", "KEEP": "1"}) == {
        "KEEP": "1",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.mark.parametrize(
    "pythonpath",
    ["", "sub", "sub::/nonexistent", "/abs:sub:/abs", "lib:{base}"],
)
def test_run_path_is_what_python_dash_m_builds(tmp_path: Path, pythonpath: str) -> None:
    """Compared with a real ``python -m`` started in the same directory and environment."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "show_path.py").write_text("import json, sys; print(json.dumps(sys.path))")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base = json.loads(
        subprocess.run(
            [sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
            env=clean,
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    value = pythonpath.format(base=base[-1])
    env = {**clean, "PYTHONPATH": value} if value else clean
    argv = [sys.executable, "-m", "show_path"]
    cold = json.loads(
        subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    )
    assert run_path(str(tmp_path), env, base) == cold


FAKE_SERVER = """
import json, os, sys
os.write(1, b'printed at start by a sitecustomize: not the protocol\\n')
mode = os.environ["FAKE_MODE"]
if mode == "unready":
    os.write(1, b'{"ready": false, "error": "no prefect here"}\\n')
    sys.exit(0)
os.write(1, b'{"ready": true, "prefect": "fake"}\\n')
for line in sys.stdin.buffer:
    request = json.loads(line)
    if mode == "out-of-turn":
        os.write(1, b'{"id": 999, "pid": 1}\\n')
    elif mode == "garbage":
        os.write(1, b'not json\\n')
    elif mode == "failed-fork":
        os.write(1, json.dumps({"id": request["id"], "error": "fork failed: no memory"}).encode() + b"\\n")
    # "silent": never answers
"""


@pytest.mark.parametrize("mode", ["silent", "out-of-turn", "garbage", "failed-fork"])
async def test_a_conversation_gone_wrong_retires_the_server(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the server answers wrongly, the caller gets ``Unavailable`` (the run starts
    cold) and, unless the server said it could not fork, the server is retired (killed).
    (Noise before the ready message is skipped.)"""
    import trio

    from worker.process import reaper, warm

    monkeypatch.setattr(warm, "ANSWER_TIMEOUT", 0.5)
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    server = warm.EngineServer(Key(sys.executable, ()), script=script)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run, {"FAKE_MODE": mode, "PATH": os.environ["PATH"]})
        await server.ready.wait()
        assert server.problem is None and server.process is not None
        with reaper.CHILDREN.spawning(), pytest.raises(warm.Unavailable) as raised:
            await server.fork({"argv": ENGINE, "cwd": "/", "env": {}, "stdout": None, "stderr": None})
        if mode == "failed-fork":
            assert server.problem is None, "a failed fork does not retire a working server"
            assert "no memory" in str(raised.value)
            await server.stop()
        else:
            assert server.problem == str(raised.value)
            with trio.fail_after(10):
                await server.process.wait()  # killed
    assert 1 not in reaper.CHILDREN.spawned and 999 not in reaper.CHILDREN.spawned


async def test_runs_arriving_at_once_share_one_server(tmp_path: Path) -> None:
    """However many first runs of a key ask at once, one server is started for them."""
    import trio

    from worker.process import warm

    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    starts = warm.WarmStarts(enabled=True, environ={"FAKE_MODE": "silent", "PATH": os.environ["PATH"]})
    launched: list[warm.EngineServer] = []
    original = warm.WarmStarts._launch

    def launch(
        self: warm.WarmStarts, key: Key, after: warm.EngineServer | None = None
    ) -> warm.EngineServer | None:
        server = original(self, key, after)
        if server is not None:
            server.script = script  # the fake: ready at once
            launched.append(server)
        return server

    answers: list[object] = []

    async def ask() -> None:
        answers.append(await starts.server_for(ENGINE, {"PATH": os.environ["PATH"]}, "/"))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(warm.WarmStarts, "_launch", launch)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(starts.serve)
            async with trio.open_nursery() as askers:
                for _ in range(10):
                    askers.start_soon(ask)
            nursery.cancel_scope.cancel()
    assert len(launched) == 1
    assert len(answers) == 10 and all(a is launched[0] for a in answers)


# ---------------------------------------------------------------- how many servers, and when they go
# (issue 19: a run per TZ value made a preloaded server per run, none ever retired)

FORK_REQUEST: dict[str, Any] = {"argv": ENGINE, "cwd": "/", "env": {}, "stdout": None, "stderr": None}


def fake_servers_alive(script: Path) -> list[int]:
    """This process's live children running ``script`` (a zombie's cmdline is empty)."""
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me and state != "Z" and str(script).encode() in cmdline:
            pids.append(int(entry))
    return pids


def reaped(pid: int) -> bool:
    """Gone from the process table: neither alive nor a zombie."""
    return not os.path.exists(f"/proc/{pid}")


@attrs.define
class Fakes:
    starts: Any
    script: Path
    said: Said
    launched: list[Any] = attrs.Factory(list)
    most_alive: int = 0

    async def use(self, tz: str) -> Any:
        """A run of start key ``tz`` forks from its server (the fake answers that the fork
        failed, which leaves the server as a real fork would: used, and idle again)."""
        from worker.process import reaper, warm

        server = await self.held(tz)
        with reaper.CHILDREN.spawning(), pytest.raises(warm.Unavailable, match="no memory"):
            await server.fork(FORK_REQUEST)
        return server

    async def held(self, tz: str) -> Any:
        """The server a run of ``tz`` is handed, not yet forked from (so it is busy)."""
        from worker.process import warm

        server = await self.starts.server_for(ENGINE, {"PATH": os.environ["PATH"], "TZ": tz}, "/")
        assert isinstance(server, warm.EngineServer), server
        return server

    def order(self) -> list[str]:
        """The start keys' TZ, least recently used first."""
        return [dict(key.start_env)["TZ"] for key in self.starts.servers]

    async def sample(self) -> None:
        while True:
            self.most_alive = max(self.most_alive, len(fake_servers_alive(self.script)))
            await trio.sleep(0.005)


@contextlib.asynccontextmanager
async def fake_starts(tmp_path: Path, mode: str = "failed-fork") -> AsyncIterator[Fakes]:
    """``WarmStarts`` serving, its servers the fake (ready at once); a task samples how
    many are alive in /proc."""
    from worker.process import warm

    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    fakes = Fakes(
        warm.WarmStarts(enabled=True, environ={"FAKE_MODE": mode, "PATH": os.environ["PATH"]}), script, Said()
    )
    original = warm.WarmStarts._launch

    def launch(
        self: warm.WarmStarts, key: Key, after: warm.EngineServer | None = None
    ) -> warm.EngineServer | None:
        server = original(self, key, after)
        if server is not None:
            server.script = script
            fakes.launched.append(server)
        return server

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(warm.WarmStarts, "_launch", launch)
        patch.setattr(warm, "log", fakes.said)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fakes.starts.serve)
            nursery.start_soon(fakes.sample)
            yield fakes
            nursery.cancel_scope.cancel()
    for server in fakes.launched:  # the worker stopping ends every server, by EOF
        assert server.exited.is_set() and server.process.returncode == 0
        assert reaped(server.process.pid)


async def test_thirty_start_keys_never_make_more_servers_than_the_cap(tmp_path: Path) -> None:
    """30 runs one after another, each with its own TZ: each forks warm, from a server of
    its own, but never more than ``MAX_SERVERS`` are alive; the least recently used is
    retired for the next, by EOF, and reaped."""
    from worker.process import warm

    async with fake_starts(tmp_path) as fakes:
        for i in range(30):
            server = await fakes.use(f"Etc/GMT+{i}")
            assert server is fakes.launched[i]
            assert len(fake_servers_alive(fakes.script)) <= warm.MAX_SERVERS
            assert fakes.starts.alive() <= warm.MAX_SERVERS
        assert len(fakes.launched) == 30
        retired = fakes.launched[: 30 - warm.MAX_SERVERS]
        for server in retired:
            assert server.exited.is_set() and server.process.returncode == 0, "ended by EOF, not killed"
            assert reaped(server.process.pid), "no zombie"
            assert server.problem.startswith("the engine server was retired (least recently used")
        assert sorted(fake_servers_alive(fakes.script)) == sorted(
            s.process.pid for s in fakes.launched[30 - warm.MAX_SERVERS :]
        )
        assert len(fakes.said.of("warm_start.retired")) == 30 - warm.MAX_SERVERS
        assert fakes.said.of("warm_start.cold") == []
    assert 1 <= fakes.most_alive <= warm.MAX_SERVERS


async def test_thirty_start_keys_at_once_past_the_cap_start_cold_said_once(tmp_path: Path) -> None:
    """30 first runs of 30 keys at once: servers busy preloading for their first runs are
    never retired, so ``MAX_SERVERS`` runs wait for a server and the rest start cold,
    with the reason said once."""
    from worker.process import warm

    answers: list[object] = []
    async with fake_starts(tmp_path) as fakes:

        async def ask(i: int) -> None:
            answers.append(
                await fakes.starts.server_for(ENGINE, {"PATH": os.environ["PATH"], "TZ": f"Etc/GMT-{i}"}, "/")
            )

        async with trio.open_nursery() as askers:
            for i in range(30):
                askers.start_soon(ask, i)
        servers = [a for a in answers if isinstance(a, warm.EngineServer)]
        assert len(servers) == warm.MAX_SERVERS == len(fakes.launched)
        assert answers.count(f"engine server cap reached ({warm.MAX_SERVERS})") == 30 - warm.MAX_SERVERS
        assert [f["reason"] for f in fakes.said.of("warm_start.cold")] == [
            f"engine server cap reached ({warm.MAX_SERVERS})"
        ]
        for server in servers:  # the runs handed a server fork from it
            with pytest.raises(warm.Unavailable):
                await server.fork(FORK_REQUEST)
    assert fakes.most_alive == warm.MAX_SERVERS


async def test_the_least_recently_used_idle_server_makes_room(tmp_path: Path) -> None:
    from worker.process import warm

    assert warm.MAX_SERVERS == 4, "the scenario below is written for a cap of 4"
    async with fake_starts(tmp_path) as fakes:
        servers = {tz: await fakes.use(tz) for tz in "ABCD"}
        await fakes.use("A")  # A used again: B is now the least recently used
        assert fakes.order() == ["B", "C", "D", "A"]
        servers["E"] = await fakes.use("E")
        assert servers["B"].exited.is_set() and servers["B"].process.returncode == 0
        assert fakes.order() == ["C", "D", "A", "E"]

        # a server a run was handed and has not forked from yet is never retired, however
        # long ago it was used: C is held, then the least recently used; D goes instead
        held = await fakes.held("C")
        for tz in "DAE":
            await fakes.use(tz)
        assert fakes.order() == ["C", "D", "A", "E"]
        servers["F"] = await fakes.use("F")
        assert servers["D"].exited.is_set() and not servers["C"].exited.is_set()
        assert fakes.order() == ["C", "A", "E", "F"]
        with pytest.raises(warm.Unavailable, match="no memory"):
            await held.fork(FORK_REQUEST)  # C's run forks from it as if nothing happened

        # every server busy: a new key starts cold, said once, and nothing is retired
        holds = [await fakes.held(tz) for tz in "CAEF"]
        cold = await fakes.starts.server_for(ENGINE, {"PATH": os.environ["PATH"], "TZ": "G"}, "/")
        cold_again = await fakes.starts.server_for(ENGINE, {"PATH": os.environ["PATH"], "TZ": "H"}, "/")
        assert cold == cold_again == f"engine server cap reached ({warm.MAX_SERVERS})"
        assert len(fakes.said.of("warm_start.cold")) == 1
        assert fakes.order() == ["C", "A", "E", "F"]
        for server in holds:
            with pytest.raises(warm.Unavailable):
                await server.fork(FORK_REQUEST)
        await fakes.use("G")  # idle again: the least recently used (C) makes room
        assert fakes.order() == ["A", "E", "F", "G"]
        retired = [f["reason"] for f in fakes.said.of("warm_start.retired")]
        assert retired == [f"least recently used, to make room (cap {warm.MAX_SERVERS})"] * 3
    assert fakes.most_alive == warm.MAX_SERVERS


async def test_a_server_idle_for_a_while_is_retired(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Retired ``IDLE_RETIRE`` after its last fork (each fork starts the wait again); a
    server a run holds is not; the next run of the key starts a new one."""
    from worker.process import warm

    mock_clock.rate = 1.0  # real time flows (the fakes start and exit), and jumps skip minutes
    async with fake_starts(tmp_path) as fakes:
        first = await fakes.use("A")
        held = await fakes.held("B")
        mock_clock.jump(warm.IDLE_RETIRE - 30)
        await trio.sleep(0.2)
        assert fakes.order() == ["A", "B"]
        await fakes.use("A")  # used again: another IDLE_RETIRE from now
        mock_clock.jump(60)
        await trio.sleep(0.2)
        assert fakes.order() == ["B", "A"] and not first.exited.is_set()
        mock_clock.jump(warm.IDLE_RETIRE)
        with trio.fail_after(10):
            await first.exited.wait()
        assert first.process.returncode == 0, "ended by EOF"
        assert reaped(first.process.pid)
        assert fakes.said.of("warm_start.retired")[0]["reason"] == f"idle for {warm.IDLE_RETIRE:g} s"
        assert fakes.order() == ["B"], "B is held by a run: not retired"
        assert fakes.starts.alive() == 1
        with pytest.raises(warm.Unavailable):
            await held.fork(FORK_REQUEST)
        again = await fakes.use("A")
        assert again is not first and fakes.order() == ["B", "A"]
        mock_clock.jump(warm.IDLE_RETIRE + 1)
        with trio.fail_after(10):
            await held.exited.wait()
            await again.exited.wait()
        assert fakes.order() == [] and fakes.starts.alive() == 0


async def test_failed_preloads_neither_count_against_the_cap_nor_pile_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key whose preload failed answers its runs cold at once (no new preload each
    time); such dead servers hold no place under the cap, and only the last
    ``REMEMBERED`` are kept."""
    from worker.process import warm

    monkeypatch.setattr(warm, "REMEMBERED", 6)  # fewer fake starts, the same rule
    keys = warm.MAX_SERVERS + warm.REMEMBERED + 10
    async with fake_starts(tmp_path, mode="unready") as fakes:
        for i in range(keys):
            answer = await fakes.starts.server_for(ENGINE, {"PATH": os.environ["PATH"], "TZ": str(i)}, "/")
            assert answer == "no prefect here"
            assert fakes.starts.alive() <= warm.MAX_SERVERS  # a failed one may not have exited yet
        assert len(fakes.launched) == keys
        assert len(fakes.starts.servers) == warm.MAX_SERVERS + warm.REMEMBERED
        again = await fakes.starts.server_for(ENGINE, {"PATH": os.environ["PATH"], "TZ": str(keys - 1)}, "/")
        assert again == "no prefect here" and len(fakes.launched) == keys, "remembered: no new preload"
        with trio.fail_after(10):
            for server in fakes.launched:
                await server.exited.wait()
        assert all(reaped(s.process.pid) for s in fakes.launched)
        assert fakes.starts.alive() == 0
    assert fakes.most_alive <= warm.MAX_SERVERS
