"""Warm starts, the pure parts: which runs may fork, from which server, with which sys.path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine_server import run_path
from worker.warm import Key, read_at_start, start_key

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
os.write(1, b'{"ready": true, "prefect": "fake"}\\n')
mode = os.environ["FAKE_MODE"]
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

    from worker import reaper, warm

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

    from worker import warm

    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    starts = warm.WarmStarts(enabled=True, environ={"FAKE_MODE": "silent", "PATH": os.environ["PATH"]})
    launched: list[warm.EngineServer] = []
    original = warm.WarmStarts._launch

    def launch(self: warm.WarmStarts, key: Key) -> warm.EngineServer | None:
        server = original(self, key)
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
