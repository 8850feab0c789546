"""Prefect's own settings sources, read as Prefect 3.9.1 reads them (``prefect/settings``).

A host set up the Prefect way (``prefect config set``, ``prefect cloud login``, a
``prefect.toml`` beside the unit's working directory) works without ``PREFECT_*`` in the
environment. Highest first, as Prefect's ``settings_customise_sources`` orders them:

1. the environment (read by ``settings.py``, not here);
2. ``.env`` in the start directory (``PREFECT_*`` keys, any case);
3. ``prefect.toml`` in the start directory (``[api] url = …``: tables are the settings'
   sections, a key ``PREFECT_<SECTION>_<KEY>``);
4. ``pyproject.toml``'s ``[tool.prefect]`` in the start directory, the same way;
5. the active profile of ``profiles.toml``: ``PREFECT_PROFILES_PATH`` (environment, then
   ``.env``, ``prefect.toml``'s and ``[tool.prefect]``'s ``profiles_path``), else
   ``$PREFECT_HOME/profiles.toml``, else ``~/.prefect/profiles.toml``; the profile named by
   ``PREFECT_PROFILE`` (the environment only), else by the file's ``active``. Not read
   in Prefect's test mode (``PREFECT_TEST_MODE`` …), as Prefect does.

``--profile NAME`` (Prefect's ``prefect --profile NAME``) selects a profile whose values
then win over every other source, the environment included.

Parsing is pure (text in, values out); :func:`read` does the file I/O. Values are kept
as the file gives them (TOML types), each with where it came from, so a bad one is named
by file and key; :meth:`PrefectSources.child_env` writes them as environment variables
for the flow's process, as Prefect's worker passes its explicitly set settings.
Deliberate differences: a file that cannot be read or parsed, or a selected profile
that does not exist, is an error (Prefect warns and ignores a bad ``profiles.toml``, and
falls back to its packaged ``ephemeral`` profile), and keys Prefect would ignore are
passed on too (Prefect ignores unknown ``PREFECT_*`` variables as well).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple

import attrs

PREFIX: Final = "PREFECT_"
TEST_MODE: Final = (
    "PREFECT_TEST_MODE",
    "PREFECT_UNIT_TEST_MODE",
    "PREFECT_TESTING_UNIT_TEST_MODE",
    "PREFECT_TESTING_TEST_MODE",
)
"""Set (to anything non-empty), Prefect reads no profile."""
DICT_SETTINGS: Final = frozenset(
    {"PREFECT_CLIENT_CUSTOM_HEADERS", "PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES"}
)
"""Settings whose value is a table (Prefect 3.9.1's dict-typed fields); other tables in
``prefect.toml`` are sections."""
_FIELD: Final = re.compile(r"[a-z_][a-z0-9_]*")
"""What a settings field is called; Prefect ignores other TOML keys (``API``, ``a-b``)."""


class SourceError(ValueError):
    """A Prefect settings file cannot be used: the message names the file and the key."""


class Found(NamedTuple):  # (a NamedTuple: cheaper to define than attrs, on the start-up path)
    """One value from a Prefect source."""

    value: Any
    """As the file gives it: a string (profiles, .env) or any TOML value."""
    where: str
    """The file and, where it helps, the table or line: ``…/profiles.toml [profiles.prod]``."""
    key: str
    """The key as written there: ``PREFECT_API_URL``, ``api.url``."""


@attrs.frozen
class PrefectSources:
    """What Prefect's own sources set, merged by Prefect's precedence (environment aside)."""

    values: Mapping[str, Found] = attrs.Factory(dict)
    """``PREFECT_*`` name → the winning value."""
    overriding: frozenset[str] = frozenset()
    """Names from a ``--profile`` profile: they win over the environment too."""
    read: tuple[str, ...] = ()
    """What was read, for messages: ``profile 'prod' in /x/profiles.toml``, ``/srv/prefect.toml``."""

    def child_env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The explicitly set settings as environment variables for a flow's process, as
        Prefect's worker passes ``to_environment_variables(exclude_unset=True)``: the
        process's own environment still wins (but over a ``--profile`` profile)."""
        return {
            name: env_string(found.value)
            for name, found in self.values.items()
            if name in self.overriding or name not in environ
        }


def env_string(value: Any) -> str:
    """A setting's value as Prefect writes it into an environment variable."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    if isinstance(value, list | tuple):
        return ",".join(sorted((str(v) for v in value), key=str))
    return str(value)


def parse_toml(text: str, path: str) -> dict[str, Any]:
    """A TOML file's data; its errors name the file and the position, never a value."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message may quote one character: not even that
        said = re.sub(r"(character) (?:'[^']*'|\"[^\"]*\")", r"\1", str(exc))
        raise SourceError(f"{path}: not valid TOML: {said}") from None


def table_settings(data: Mapping[str, Any], where: str, key_prefix: str = "") -> dict[str, Found]:
    """``prefect.toml`` (or ``[tool.prefect]``): each leaf under its sections → its name."""
    out: dict[str, Found] = {}

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if not _FIELD.fullmatch(key):
                continue
            name = PREFIX + "_".join((*path, key)).upper()
            if isinstance(value, dict) and name not in DICT_SETTINGS:
                walk(value, (*path, key))
            else:
                out[name] = Found(value, where, key_prefix + ".".join((*path, key)))

    walk(data, ())
    return out


def tool_prefect(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``pyproject.toml``'s ``[tool.prefect]`` table (empty if there is none)."""
    tool = data.get("tool", {})
    section = tool.get("prefect", {}) if isinstance(tool, dict) else {}
    if not isinstance(section, dict):
        raise SourceError(f"{path}: 'tool.prefect' must be a table of Prefect settings")
    return section


def profile_settings(
    data: Mapping[str, Any], path: str, selected: str | None
) -> tuple[str | None, dict[str, Found]]:
    """The profile ``selected`` (else the file's ``active``) and its ``PREFECT_*`` values.
    No profile named at all: none (Prefect's packaged default only enables its ephemeral
    server, which a worker never uses)."""
    name = selected if selected is not None else data.get("active")
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise SourceError(f"{path}: 'profiles' must be a table of profiles")
    if name is None:
        return None, {}
    if not isinstance(name, str):
        raise SourceError(f"{path}: 'active' must be the name of a profile (a string)")
    if name not in profiles:
        known = ", ".join(repr(p) for p in sorted(profiles)) or "none"
        how = "selected" if selected is not None else "the file's 'active'"
        raise SourceError(f"{path}: no profile {name!r} ({how}); its profiles: {known}")
    table = profiles[name]
    if not isinstance(table, dict):
        raise SourceError(f"{path}: 'profiles.{name}' must be a table of settings")
    where = f"{path} [profiles.{name}]"
    return name, {key: Found(value, where, key) for key, value in table.items() if key.startswith(PREFIX)}


# ------------------------------------------------------------------------------- .env

_SPACE: Final = r"[^\S\r\n]"
_BLANK: Final = re.compile(r"\s*")
_EXPORT: Final = re.compile(rf"(?:export{_SPACE}+)?")
_KEY: Final = re.compile(rf"(?:'([^']+)'|([^=#\s'][^=#\s]*)){_SPACE}*")
_EQUAL: Final = re.compile(rf"={_SPACE}*")
_SINGLE: Final = re.compile(r"'((?:\\.|[^'\\])*)'", re.DOTALL)
_DOUBLE: Final = re.compile(r'"((?:\\.|[^"\\])*)"', re.DOTALL)
_UNQUOTED: Final = re.compile(r"[^\r\n]*")
_LINE_END: Final = re.compile(rf"(?:{_SPACE}*#[^\r\n]*)?{_SPACE}*(?:\r\n|\n|\r|$)")
_NEWLINE: Final = re.compile(r"\r\n|\n|\r")
_SINGLE_ESCAPES: Final = {"\\": "\\", "'": "'"}
_DOUBLE_ESCAPES: Final = {
    **_SINGLE_ESCAPES,
    **{'"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"},
}
_VARIABLE: Final = re.compile(r"\$\{([^}:]*)(?::-([^}]*))?\}")


class Binding(NamedTuple):
    key: str
    value: str | None
    """None for a bare ``KEY`` (no ``=``): not set."""
    line: int


def dotenv_bindings(text: str, path: str) -> Iterator[Binding]:
    """The ``KEY=VALUE`` lines of a ``.env`` file, in the dialect python-dotenv reads
    (``export``, quoted keys and values, escapes in double quotes, ``#`` comments,
    multi-line quoted values). A line it cannot read is an error naming the line
    (python-dotenv skips it with a warning)."""
    text = text.removeprefix("\ufeff")
    pos, line = 0, 1

    def take(pattern: re.Pattern[str], what: str) -> re.Match[str]:
        nonlocal pos
        found = pattern.match(text, pos)
        if found is None:
            raise SourceError(f"{path} line {line}: cannot read this line ({what})")
        pos = found.end()
        return found

    while True:
        line += len(_NEWLINE.findall(take(_BLANK, "")[0]))
        if pos >= len(text):
            return
        start = pos
        binding = None
        if not text.startswith("#", take(_EXPORT, "").end()):  # a comment, `export # …` too
            found = take(_KEY, "expected KEY=VALUE")
            value: str | None = None
            if text.startswith("=", pos):
                spaced = len(take(_EQUAL, "")[0]) > 1
                value, used = _dotenv_value(text[pos:], spaced, path, line)
                pos += used
            binding = Binding(found[1] or found[2], value, line)
        take(_LINE_END, "unexpected text after the value")
        line += len(_NEWLINE.findall(text[start:pos]))
        if binding is not None:
            yield binding


def _dotenv_value(rest: str, spaced: bool, path: str, line: int) -> tuple[str, int]:
    """The value at the start of ``rest`` and how many characters it took."""
    first = rest[:1]
    if first in ("'", '"'):
        quoted = (_SINGLE if first == "'" else _DOUBLE).match(rest)
        if quoted is None:
            raise SourceError(f"{path} line {line}: cannot read this line (a quoted value is not closed)")
        table = _DOUBLE_ESCAPES if first == '"' else _SINGLE_ESCAPES
        value = re.sub(r"\\(.)", lambda m: table.get(m[1], m[0]), quoted[1], flags=re.DOTALL)
        return value, quoted.end()
    if first in ("", "\n", "\r") or (spaced and first == "#"):
        return "", 0
    raw = _UNQUOTED.match(rest)
    assert raw is not None
    return re.sub(r"\s+#.*", "", raw[0]).rstrip(), raw.end()


def parse_dotenv(text: str, path: str, environ: Mapping[str, str]) -> dict[str, Binding]:
    """A ``.env`` file's values, later lines winning, with ``${NAME}`` and
    ``${NAME:-default}`` expanded from the file's earlier values, else the environment."""
    out: dict[str, Binding] = {}
    for binding in dotenv_bindings(text, path):
        if binding.value is not None:

            def expand(m: re.Match[str]) -> str:
                earlier = out.get(m[1])
                if earlier is not None:
                    return earlier.value or ""
                return environ.get(m[1], m[2] if m[2] is not None else "")

            binding = binding._replace(value=_VARIABLE.sub(expand, binding.value))
        out[binding.key] = binding
    return out


def dotenv_settings(bindings: Mapping[str, Binding], path: str) -> dict[str, Found]:
    """The ``PREFECT_*`` values of a ``.env`` (keys in any case, as Prefect matches them)."""
    return {
        b.key.upper(): Found(b.value, f"{path} line {b.line}", b.key)
        for b in bindings.values()
        if b.value is not None and b.key.upper().startswith(PREFIX)
    }


# ------------------------------------------------------------------------------- reading


def test_mode(environ: Mapping[str, str]) -> bool:
    return any(environ.get(name) for name in TEST_MODE)


def profiles_path(
    environ: Mapping[str, str],
    dotenv: Mapping[str, Binding],
    prefect_toml: Mapping[str, Any],
    tool: Mapping[str, Any],
    user_home: Path | None,
    exists: Any = Path.exists,
) -> Path | None:
    """Where Prefect looks for ``profiles.toml`` (in its order), or None: not read."""
    from_dotenv = dotenv.get("PREFECT_PROFILES_PATH")
    for value, where in (
        (environ.get("PREFECT_PROFILES_PATH"), "environment variable PREFECT_PROFILES_PATH"),
        (from_dotenv.value if from_dotenv else None, "the .env's PREFECT_PROFILES_PATH"),
        (prefect_toml.get("profiles_path"), "prefect.toml's profiles_path"),
        (tool.get("profiles_path"), "pyproject.toml's tool.prefect.profiles_path"),
    ):
        if value:
            if not isinstance(value, str):
                raise SourceError(f"{where} must be a path (a string)")
            return Path(value)
    if environ.get("PREFECT_HOME"):
        return Path(environ["PREFECT_HOME"]) / "profiles.toml"
    if user_home is None:
        return None
    default = user_home / ".prefect" / "profiles.toml"
    return default if exists(default) else None


def _read_text(path: Path) -> str | None:
    """The file's text; None if there is no such file."""
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):  # Prefect reads files only
        return None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SourceError(f"cannot read {path}: {why}") from None


def read(
    environ: Mapping[str, str],
    start_dir: Path,
    user_home: Path | None,
    profile: str | None = None,
) -> PrefectSources:
    """Read Prefect's sources for a worker started in ``start_dir`` with ``environ``.
    ``user_home``: where ``~/.prefect`` is (None: no default profile path)."""
    read_files: list[str] = []
    dotenv_path = start_dir / ".env"
    dotenv_text = _read_text(dotenv_path)
    dotenv = parse_dotenv(dotenv_text, str(dotenv_path), environ) if dotenv_text is not None else {}
    tables: list[tuple[dict[str, Any], str, str]] = []
    for name, prefix in (("prefect.toml", ""), ("pyproject.toml", "tool.prefect.")):
        path = start_dir / name
        text = _read_text(path)
        data = parse_toml(text, str(path)) if text is not None else {}
        if prefix:
            data = tool_prefect(data, str(path))
        tables.append((data, str(path), prefix))
        if data:
            read_files.append(str(path))
    if dotenv:
        read_files.append(str(dotenv_path))
    chosen: tuple[str | None, dict[str, Found]] = (None, {})
    where = None
    if not test_mode(environ):
        where = profiles_path(environ, dotenv, tables[0][0], tables[1][0], user_home)
    text = _read_text(where) if where is not None else None
    if text is not None:
        selected = profile or environ.get("PREFECT_PROFILE") or None
        chosen = profile_settings(parse_toml(text, str(where)), str(where), selected)
        if chosen[0] is not None:
            read_files.insert(0, f"profile {chosen[0]!r} in {where}")
    elif profile is not None:
        looked = (
            f"no {where}"
            if where
            else "in test mode"
            if test_mode(environ)
            else "no ~/.prefect/profiles.toml"
        )
        raise SourceError(f"--profile {profile!r}: there is no profiles file ({looked})")
    values: dict[str, Found] = {}
    if profile is None:
        values.update(chosen[1])
    for data, where, prefix in reversed(tables):  # pyproject.toml, then prefect.toml over it
        values.update(table_settings(data, where, prefix))
    values.update(dotenv_settings(dotenv, str(dotenv_path)))
    if profile is not None:
        values.update(chosen[1])
    overriding = frozenset(chosen[1]) if profile is not None else frozenset()
    return PrefectSources(values, overriding, tuple(read_files))
