"""How much memory is left for runs: the host's ``MemAvailable``, or the worker's cgroup's.

Under systemd the worker and its flows share the service's cgroup (``KillMode=process``),
so a ``MemoryMax=`` on the unit is the limit that counts; elsewhere the host's. Both
cgroup v2 (``memory.max`` / ``memory.current``) and v1 (``memory.limit_in_bytes`` /
``memory.usage_in_bytes``) are read; the tighter of host and cgroup wins. A cgroup's
usage counts page cache, so its inactive file pages are taken off (the kubelet's
"working set"): they are given back under pressure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import attrs

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
_NO_LIMIT: Final = 1 << 60
"""cgroup v1 reports "no limit" as a huge number (page-rounded LONG_MAX)."""


@attrs.frozen
class Memory:
    available: int
    total: int
    source: str
    """``host``, or the cgroup's path when its limit is the tighter one."""


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemAvailable, MemTotal) in bytes from ``/proc/meminfo``."""
    fields = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            fields[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return fields["MemAvailable"], fields["MemTotal"]


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.isdigit() else int(text)


def _inactive_file(stat: Path, key: str) -> int:
    try:
        for line in stat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _v2_limit(root: Path, path: str) -> tuple[int, int, str] | None:
    """The tightest limited v2 cgroup from ``path`` up: a worker in its leaf of a unit's
    delegated subtree (per-run cgroups) shares the unit's ``MemoryMax=`` with its runs."""
    tightest = None
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:depth])
        limit, usage = _read_int(base / "memory.max"), _read_int(base / "memory.current")
        if limit is None or usage is None or limit >= _NO_LIMIT:
            continue
        used = max(0, usage - _inactive_file(base / "memory.stat", "inactive_file"))
        if tightest is None or limit - used < tightest[0] - tightest[1]:
            tightest = (limit, used, str(base))
    return tightest


def cgroup_limit(proc_cgroup: str, root: Path = CGROUP_ROOT) -> tuple[int, int, str] | None:
    """(limit, usage less inactive file pages, path) of the memory cgroup named in
    ``/proc/self/cgroup``'s text (v2: or of its ancestor with the least room), if it has a
    limit (None: no limit, or nothing to read)."""
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2
            found = _v2_limit(root, path)
            if found is not None:
                return found
            continue
        if "memory" in controllers.split(","):  # v1
            base = root / "memory" / path.lstrip("/")
            limit = _read_int(base / "memory.limit_in_bytes")
            usage = _read_int(base / "memory.usage_in_bytes")
            cache = _inactive_file(base / "memory.stat", "total_inactive_file")
        else:
            continue
        if limit is not None and usage is not None and limit < _NO_LIMIT:
            return limit, max(0, usage - cache), str(base)
    return None


def read() -> Memory:
    """What is available now (host, or the worker's cgroup if tighter)."""
    available, total = parse_meminfo(Path("/proc/meminfo").read_text())
    try:
        limited = cgroup_limit(Path("/proc/self/cgroup").read_text())
    except OSError:
        limited = None
    if limited is not None:
        limit, usage, path = limited
        if limit - usage < available:
            return Memory(max(0, limit - usage), min(total, limit), path)
    return Memory(available, total, "host")
