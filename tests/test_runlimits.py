"""A run's resource limits (pure, issue 23): systemd's names and spellings, read, layered,
written as cgroup files; the OOM message; the base job template carrying them; admission
booking a run at its memory_max; the settings' defaults."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import cli
from worker.host import settings
from worker.rules import decisions, runlimits
from worker.rules.admission import MIB, Book
from worker.rules.job import ProcessJobConfiguration
from worker.rules.runlimits import UNLIMITED, LimitError, RunLimits

GIB = 1024 * MIB


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 * MIB),
        ("2G", 2 * GIB),
        ("1.5G", int(1.5 * GIB)),
        ("256MiB", 256 * MIB),
        ("100k", 100 * 1024),
        ("4096", 4096),
        (4096, 4096),
        ("1T", 1 << 40),
        ("infinity", UNLIMITED),
        ("max", UNLIMITED),
        (None, None),
        ("", None),
    ],
)
def test_sizes_are_systemds(text: Any, size: int | None) -> None:
    assert runlimits.parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1G", "2X", "0", True, [1], "8E"])
def test_a_bad_size_says_what_is_accepted(text: Any) -> None:
    with pytest.raises(ValueError, match=r"size|expected a string or a number"):
        runlimits.parse_size(text)


@pytest.mark.parametrize(
    ("text", "quota"),
    [("50%", 50_000), ("200%", 200_000), ("12.5%", 12_500), ("1%", 1000), ("infinity", UNLIMITED)],
)
def test_cpu_max_is_a_share_of_one_cpu(text: str, quota: int) -> None:
    assert runlimits.parse_cpu_max(text) == quota


@pytest.mark.parametrize("text", ["50", "0%", "0.5%", "half", "-5%"])
def test_a_bad_cpu_max_says_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"share|smallest"):
        runlimits.parse_cpu_max(text)


def test_weights_and_counts() -> None:
    assert runlimits.parse_weight("100") == 100
    assert runlimits.parse_weight(10000) == 10000
    for bad in ("0", "10001", "1.5", "idle"):
        with pytest.raises(ValueError, match="1 to 10000"):
            runlimits.parse_weight(bad)
    assert runlimits.parse_count(64) == 64
    assert runlimits.parse_count("infinity") == UNLIMITED
    for bad in ("0", "-1", "many"):
        with pytest.raises(ValueError, match="number of processes"):
            runlimits.parse_count(bad)


def test_the_cgroup_files_of_a_run() -> None:
    limits = RunLimits.parse(
        {
            "memory_max": "256M",
            "memory_high": "200M",
            "cpu_weight": 50,
            "cpu_max": "50%",
            "pids_max": 64,
            "x": 1,
        }
    )
    assert limits.files() == {
        "memory.max": (str(256 * MIB), "memory_max"),
        "memory.high": (str(200 * MIB), "memory_high"),
        "cpu.weight": ("50", "cpu_weight"),
        "cpu.max": ("50000 100000", "cpu_max"),
        "pids.max": ("64", "pids_max"),
    }
    assert limits.controllers() == {"memory", "cpu", "pids"}
    assert limits.describe() == "memory_max=256M memory_high=200M cpu_weight=50 cpu_max=50% pids_max=64"
    unlimited = RunLimits.parse({"memory_max": "infinity", "cpu_max": "max"})
    assert unlimited.files() == {"memory.max": ("max", "memory_max"), "cpu.max": ("max 100000", "cpu_max")}
    assert not RunLimits() and RunLimits(pids_max=1)


def test_an_unreadable_limit_names_the_job_variable() -> None:
    with pytest.raises(LimitError, match=r"^job variable 'memory_max': expected a size such as 512M"):
        RunLimits.parse({"memory_max": "lots"})
    with pytest.raises(LimitError, match=r"^setting 'pids_max'"):
        RunLimits.parse({"pids_max": "0"}, "setting")


def test_layers_the_template_then_the_variables_then_the_settings() -> None:
    defaults = RunLimits(memory_max=GIB, pids_max=512, cpu_weight=10)
    limits = runlimits.combine({"memory_max": "256M"}, {"memory_max": "2G", "cpu_max": "50%"}, defaults)
    assert limits == RunLimits(memory_max=256 * MIB, cpu_max=50_000, pids_max=512, cpu_weight=10)
    # infinity is a choice: it is not replaced by a default
    assert runlimits.combine({}, {"pids_max": "infinity"}, defaults).pids_max == UNLIMITED


@given(st.integers(min_value=1, max_value=1 << 32), st.sampled_from(["", "K", "M", "G"]))
def test_a_whole_size_said_is_read_back_the_same(count: int, unit: str) -> None:
    size = count * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]
    said = runlimits.format_size(size)
    assert re.fullmatch(r"\d+(\.\d)?[KMGTPE]?", said)
    back = runlimits.parse_size(said)
    assert back is not None and abs(back - size) <= size * 0.05  # one decimal: within 5 %


@given(st.decimals(min_value=1, max_value=6400, places=1))
def test_any_cpu_share_gives_a_quota_the_kernel_takes(percent: Any) -> None:
    quota = runlimits.parse_cpu_max(f"{percent}%")
    assert quota is not None and quota >= runlimits.MIN_QUOTA
    text, _ = RunLimits(cpu_max=quota).files()["cpu.max"]
    assert re.fullmatch(r"\d+ 100000", text)
    assert RunLimits(cpu_max=quota).said("cpu_max") == f"{float(percent):g}%"


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@given(st.dictionaries(st.sampled_from([*runlimits.NAMES, "env", "other"]), json_values))
def test_any_job_variables_give_limits_or_a_limit_error(values: dict[str, Any]) -> None:
    """Never another exception: a bad deployment fails its own run, with the variable named."""
    try:
        limits = RunLimits.parse(values)
    except LimitError as exc:
        assert str(exc).startswith("job variable '")
        return
    for text, _ in limits.files().values():
        assert re.fullmatch(r"(\d+|max)( 100000)?", text)


def test_the_oom_message() -> None:
    assert runlimits.oom_message(512 * MIB, 512 * MIB) == (
        "out of memory: the run reached memory_max 512M (peak 512M)"
    )
    assert "OOM killer" in runlimits.oom_message(
        None, 3 * GIB // 2
    ) and "(peak 1.5G)" in runlimits.oom_message(UNLIMITED, 3 * GIB // 2)


def test_an_oom_kill_is_the_crash_message_with_the_stderr_tail() -> None:
    oom = runlimits.oom_message(256 * MIB, 256 * MIB)
    kind, message = decisions.run_outcome(False, False, -9, "crash", stderr_tail="MemoryError", oom=oom)
    assert kind == "crash"
    assert message == f"{oom}\nLast lines of stderr:\nMemoryError"
    assert decisions.run_outcome(False, False, None, "crash", adopted=True, oom=oom) == (
        "crash_if_running",
        oom,
    )
    # a cancel, a stop, or a clean exit are what they are, OOM kill or not
    assert decisions.run_outcome(True, True, -9, "crash", oom=oom)[0] == "cancelled"
    assert decisions.run_outcome(False, False, 0, "crash", oom=oom)[1] == decisions.EXIT_0_NOT_FINAL


async def test_the_template_carries_the_limits_to_the_configuration() -> None:
    default = ProcessJobConfiguration.default_base_job_template()
    template = runlimits.base_job_template(default)
    assert default == ProcessJobConfiguration.default_base_job_template(), "Prefect's own is untouched"
    assert {k: v for k, v in template["job_configuration"].items() if k not in runlimits.NAMES} == (
        default["job_configuration"]
    )
    for name in runlimits.NAMES:
        assert template["variables"]["properties"][name]["default"] is None
        assert "systemd" in template["variables"]["properties"][name]["description"]

    class NoBlocks:
        async def read_block_document_by_name(self, slug: str, name: str) -> None:
            return None

        async def read_block_document_by_id(self, block_id: str) -> None:
            return None

        async def read_variable_value(self, name: str) -> Any:
            return None

    values = {"memory_max": "256M", "pids_max": 64}
    config = await ProcessJobConfiguration.from_template_and_values(template, values, NoBlocks(), {})
    assert config.limits == {"memory_max": "256M", "pids_max": 64}
    config = await ProcessJobConfiguration.from_template_and_values(template, {}, NoBlocks(), {})
    assert config.limits == {}, "an unset variable leaves the setting's default"


def test_flow_worker_base_job_template_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["base-job-template"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == runlimits.base_job_template(ProcessJobConfiguration.default_base_job_template())


def test_admission_books_a_run_at_its_memory_max() -> None:
    book = Book()
    book.finished("old", "dep", 100 * MIB)  # learned: 100 MiB
    taken, room = book.admit([("a", "dep", 600 * MIB), ("b", "dep")], 900 * MIB, 256 * MIB)
    assert taken == ["a"] and room.needed == 100 * MIB  # 600 + 100 + 256 > 900: b waits
    book.limited("a", "dep", 256 * MIB)  # configured: its deployment's runs are 256M now
    assert book.in_hand["a"] == (256 * MIB, 0)
    assert book.expected("dep") == 256 * MIB
    assert book.expected("dep", UNLIMITED) == 256 * MIB  # infinity: the deployment's last, else learned
    book.limited("c", "dep", None)
    assert book.expected("dep") == 100 * MIB


def test_settings_give_every_runs_defaults() -> None:
    loaded = settings.load(
        {"pool": "p"}, environ={"FLOW_WORKER_RUN_MEMORY_MAX": "2G", "FLOW_WORKER_RUN_CPU_MAX": "150%"}
    )
    assert loaded.run_limits() == RunLimits(memory_max=2 * GIB, cpu_max=150_000)
    assert loaded.cgroups is True
    with pytest.raises(
        settings.SettingsError, match=r"'run_pids_max' = 'lots': expected a number of processes"
    ):
        settings.load({"pool": "p"}, environ={"FLOW_WORKER_RUN_PIDS_MAX": "lots"})


def test_a_toml_number_is_a_limit(tmp_path: Any) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('pool = "p"\nrun_pids_max = 64\nrun_cpu_weight = 50\ncgroups = false\n')
    loaded = settings.load({}, environ={}, config_path=toml)
    assert loaded.run_limits() == RunLimits(pids_max=64, cpu_weight=50) and loaded.cgroups is False
