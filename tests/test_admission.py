"""Admission by memory (pure), and reading memory and a run's usage from /proc-shaped text."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import wait_for
from worker.host import memory, settings
from worker.host.metrics import Metrics
from worker.process import usage
from worker.rules import admission
from worker.rules.admission import MIB, Book

GIB = 1024 * MIB


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512M", 512 * MIB),
        ("2G", 2 * GIB),
        ("1.5G", int(1.5 * GIB)),
        ("2GiB", 2 * GIB),
        ("256mb", 256 * MIB),
        ("1048576", MIB),
        ("0", 0),
        ("10%", 0.10),
        ("100%", 1.0),
    ],
)
def test_reserve_sizes(text: str, value: float) -> None:
    assert admission.parse_reserve(text) == value


@pytest.mark.parametrize("text", ["lots", "-1G", "101%", "2X"])
def test_bad_reserve_sizes_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"at most 100%|expected a size"):
        admission.parse_reserve(text)
    with pytest.raises(settings.SettingsError, match="'memory_reserve'"):
        settings.load({"pool": "p"}, environ={"FLOW_WORKER_MEMORY_RESERVE": text})


def test_reserve_in_bytes() -> None:
    assert admission.reserve_bytes(None, 16 * GIB) == int(1.6 * GIB)  # default: 10 %
    assert admission.reserve_bytes(None, 1 * GIB) == 256 * MIB  # … at least 256 MiB
    assert admission.reserve_bytes("25%", 8 * GIB) == 2 * GIB
    assert admission.reserve_bytes("1G", 8 * GIB) == GIB


def test_admission_counts_what_runs_in_hand_will_still_grow() -> None:
    book = Book()
    runs = [(f"r{i}", "dep") for i in range(10)]
    # 1 GiB available, 256 MiB reserve: 768 MiB of room, 150 MiB per unknown run → 5
    taken, room = book.admit(runs, GIB, 256 * MIB)
    assert taken == ["r0", "r1", "r2", "r3", "r4"]
    assert (room.admitted, room.held, room.needed) == (5, 5, 150 * MIB)
    # the host reports less available as they grow; what they will still grow is counted
    for run_id in taken:
        book.using(run_id, 50 * MIB)  # each has 100 MiB to go
    taken, room = book.admit(runs[5:], GIB - 250 * MIB, 256 * MIB)
    assert taken == [] and room.growth == 500 * MIB and room.short_by > 0
    # a finished run teaches its deployment's size; the next admission uses it
    for run_id in ["r0", "r1", "r2", "r3", "r4"]:
        book.finished(run_id, "dep", 200 * MIB)
    assert book.expected("dep") == 200 * MIB and book.expected("other") == 150 * MIB
    taken, _ = book.admit(runs[5:], GIB, 256 * MIB)
    assert taken == ["r5", "r6", "r7"]  # 768 // 200


def test_a_run_bigger_than_expected_is_not_counted_twice() -> None:
    book = Book()
    book.admit([("r0", None)], GIB, 0)
    book.using("r0", 400 * MIB)  # over its 150 MiB: the host's figure already shows it
    assert book.growth() == 0
    book.book("adopted", None)
    assert book.growth() == 150 * MIB


def test_the_expected_size_is_the_largest_recent_peak() -> None:
    book = Book()
    for peak in (300, 100, 120, 110, 130, 140):
        book.finished("x", "dep", peak * MIB)
    assert book.expected("dep") == 140 * MIB  # the 300 MiB run is six runs ago: forgotten
    book.finished("x", "dep", None)  # not measured: teaches nothing
    assert book.expected("dep") == 140 * MIB


MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n"


def test_meminfo_and_cgroups(tmp_path: Path) -> None:
    assert memory.parse_meminfo(MEMINFO) == (8192000 * 1024, 16384000 * 1024)
    v2 = tmp_path / "system.slice" / "flow-worker@p.service"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text("1073741824\n")
    (v2 / "memory.current").write_text("536870912\n")
    (v2 / "memory.stat").write_text("anon 1\ninactive_file 104857600\n")
    text = "0::/system.slice/flow-worker@p.service\n"
    assert memory.cgroup_limit(text, tmp_path) == (GIB, 512 * MIB - 100 * MIB, str(v2))
    (v2 / "memory.max").write_text("max\n")
    assert memory.cgroup_limit(text, tmp_path) is None
    v1 = tmp_path / "memory" / "box"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(2 * GIB))
    (v1 / "memory.usage_in_bytes").write_text(str(GIB))
    assert memory.cgroup_limit("4:memory:/box\n0::/\n", tmp_path) == (2 * GIB, GIB, str(v1))
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert memory.cgroup_limit("4:memory:/box\n", tmp_path) is None
    here = memory.read()
    assert 0 < here.available <= here.total


def test_proc_stat_parsing() -> None:
    stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 150 50 7 3 20 0 1 0 100 1000 2560"
    parsed = usage.parse_stat(stat + " 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0")
    assert parsed == usage.Stat(pid=4242, ppid=1, session=4242, cpu_ticks=210, rss_pages=2560)


def test_tree_pss_counts_the_descendants() -> None:
    def own() -> int:
        text = Path("/proc/self/smaps_rollup").read_text()
        return next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("Pss:"))

    alone = usage.tree_pss(os.getpid())
    assert alone >= own() * 0.9
    child = subprocess.Popen([sys.executable, "-c", "import time; b = b'x' * 20_000_000; time.sleep(30)"])
    try:
        wait_for(lambda: usage.tree_pss(os.getpid()) > alone + 15_000_000, 30, what="the child's pages")
    finally:
        child.kill()
        child.wait()


def test_a_process_tree_is_measured(tmp_path: Path) -> None:
    """A child in its own session holding ~64 MiB and burning CPU, measured by its session."""
    code = "import time\nb = bytearray(64 * 1024 * 1024)\nt = time.process_time()\n" + (
        "while time.process_time() - t < 0.6: pass\ntime.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        meter = usage.Meter()
        seen = meter.track(child.pid)
        deadline = time.monotonic() + 20
        while seen.cpu_seconds < 0.6 and time.monotonic() < deadline:
            meter.sample_now()
            time.sleep(0.1)
        assert 64 * MIB <= seen.peak <= 64 * MIB + 40 * MIB
        assert 0.6 <= seen.cpu_seconds < 3
        assert usage.high_water(child.pid) >= 64 * MIB
    finally:
        os.kill(child.pid, 9)
        child.wait()


def test_histograms_render() -> None:
    m = Metrics()
    m.observe_run(300 * MIB, 4.2)
    text = m.render(0, None)
    assert 'flow_worker_run_peak_memory_bytes_bucket{le="536870912"} 1' in text
    assert 'flow_worker_run_peak_memory_bytes_bucket{le="268435456"} 0' in text
    assert 'flow_worker_run_cpu_seconds_bucket{le="5"} 1' in text
    assert "flow_worker_run_cpu_seconds_count 1" in text
