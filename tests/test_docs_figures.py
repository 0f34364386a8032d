"""Every figure has a command (issue #24, item 4): each number-bearing table of README.md,
BENCHMARKS.md and docs/**/*.md names the command that produced it, the date and the machine.

The convention, as checked here on the documents' text:

* A provenance line, a paragraph of its own between the table's section heading and the table:
  ``Figures: `<command>` · <YYYY-MM-DD> · <machine>``, several commands each in backticks joined
  by `` + `` or ``; ``, and free text after another `` · `` (``engine at 4c91928``); it may wrap
  onto more lines. A table's provenance is the nearest such paragraph above it within its
  section (since the last heading), so one line may serve several tables of one run.
* A table that is no measurement (settings, protocol choices, a fault matrix) carries instead,
  as the nearest non-blank line above it, ``<!-- figures: none (<why>) -->``.
* A table is number-bearing when a body cell holds a decimal, a percentage or a number with a
  unit (`MEASURED`); other tables need neither. Tables in fenced code blocks are not tables.
* A command must be one this repository has: `make T` (T a Makefile target), `python PATH` or
  `python -m MODULE` (a file of the repository), `bash PATH` / `./PATH`, or `mim4dd SUB` /
  `mim4dd-sweep SUB` (SUB a command of that CLI, each `.yaml`/`.yml` argument a file).
"""

from __future__ import annotations

import ast
import datetime
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "BENCHMARKS.md",
        *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))]
CLI_SOURCES = {"mim4dd": "mim4dd/cli.py", "mim4dd-sweep": "orchestrator/cli.py"}

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}#{1,6}(\s|$)")
SEPARATOR = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
MEASURED = re.compile(r"\d+\.\d+"                                      # a decimal
                      r"|\d\s?%"                                      # a percentage
                      r"|\d\s?(?:ms|s|MiB|MB|GiB|GB|×|x)(?![A-Za-z0-9])")  # a number, a unit
PROVENANCE = "Figures: "
COMMANDS = re.compile(r"`[^`]+`(?:(?: \+ |; )`[^`]+`)*")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
EXEMPT = re.compile(r"<!-- figures: none \((?P<why>[^)]*\S[^)]*)\) -->")
LOOSE_PROVENANCE = re.compile(r"^\W*figures\W*:", re.IGNORECASE)
LOOSE_EXEMPT = re.compile(r"<!--\s*figures", re.IGNORECASE)
LIST_ITEM = re.compile(r"\s{0,3}(?:[-+*]|\d{1,9}[.)])(?:\s|$)")  # would end the paragraph
UNKNOWN = re.compile(r"\s*(?:unknown|n/?a|\?+|-+|tbd)\s*", re.IGNORECASE)
ENV_ASSIGN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
PYTHON = re.compile(r"(?:\.venv/bin/)?python3?")
CLI = re.compile(r"(?:\.venv/bin/)?(?P<cli>mim4dd-sweep|mim4dd)")
MAKE_TARGET = re.compile(r"^(?P<names>[A-Za-z0-9_.][^:=\s]*(?:[ \t]+[^:=\s]+)*)[ \t]*::?(?!=)")


@dataclass
class Repo:
    """What a command may name: the repository's files, Makefile targets and CLI commands."""

    root: Path
    targets: set[str] = field(default_factory=set)
    clis: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, root: Path) -> Repo:
        return cls(root, makefile_targets(root / "Makefile"),
                   {cli: cli_commands(root / src) for cli, src in CLI_SOURCES.items()})

    def has_file(self, path: str) -> bool:
        full = (self.root / path).resolve()
        return full.is_relative_to(self.root.resolve()) and full.is_file()


def makefile_targets(path: Path) -> set[str]:
    found: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if (m := MAKE_TARGET.match(line)) and not line.startswith(".PHONY"):
            found |= set(m["names"].split())
    return found


def cli_commands(path: Path) -> set[str]:
    """The commands of the typer app `app` in a source file, read without importing it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and dec.func.attr == "command" and getattr(dec.func.value, "id", "") == "app"):
                named = [a.value for a in dec.args[:1] if isinstance(a, ast.Constant)]
                named += [k.value.value for k in dec.keywords
                          if k.arg == "name" and isinstance(k.value, ast.Constant)]
                found.add(named[0] if named else node.name.lower().replace("_", "-"))
    return found


def command_problem(command: str, repo: Repo) -> str | None:
    """Why `command` is not one this repository has, or None when it is."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError as err:
        return f"cannot be read as a shell line ({err})"
    while words and ENV_ASSIGN.fullmatch(words[0]):
        words.pop(0)
    if not words:
        return "is empty"
    prog, args = words[0], words[1:]
    if prog == "make":
        goals = [a for a in args if not a.startswith("-") and "=" not in a]
        missing = [g for g in goals if g not in repo.targets]
        if not goals or missing:
            return f"names no target of the Makefile ({', '.join(missing) or 'none given'})"
        return None
    if PYTHON.fullmatch(prog):
        rest = [a for a in args if a != "-u"]
        if rest[:1] == ["-m"] and len(rest) > 1:
            module = rest[1].replace(".", "/")
            if repo.has_file(f"{module}.py") or repo.has_file(f"{module}/__main__.py"):
                return None
            return f"runs module {rest[1]}, which is not in this repository"
        if not rest or rest[0].startswith("-"):
            return "runs python without a script of this repository"
        return None if repo.has_file(rest[0]) else f"runs {rest[0]}, which does not exist"
    if prog in ("bash", "sh") or prog.startswith("./"):
        scripts = [prog] if prog.startswith("./") else [a for a in args if not a.startswith("-")]
        if scripts and repo.has_file(scripts[0]):
            return None
        return f"runs {scripts[0] if scripts else 'nothing'}, which does not exist"
    if m := CLI.fullmatch(prog):
        cli = m["cli"]
        if not args or (args[0].startswith("-") and args[0] not in ("--help", "--version")):
            return f"names no command of {cli}"
        if not args[0].startswith("-") and args[0] not in repo.clis[cli]:
            return f"{args[0]} is not a command of {cli} ({', '.join(sorted(repo.clis[cli]))})"
        missing = [a for a in args if a.endswith((".yaml", ".yml")) and not repo.has_file(a)]
        return f"names {', '.join(missing)}, which does not exist" if missing else None
    return "is not a command this repository has"


@dataclass
class Table:
    line: int  # 1-based line of the header row
    header: str
    rows: list[str]
    provenance: tuple[int, str] | None  # the section's nearest Figures line above, if any
    exempt: str | None  # the why of a figures: none comment, when that is the line above it

    def measured(self) -> bool:
        return any(MEASURED.search(cell) for row in self.rows for cell in cells(row))


def cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def provenance_problem(text: str, repo: Repo) -> str | None:
    """Why a provenance line is not `Figures: `cmd` · YYYY-MM-DD · machine[ · more]`."""
    rest = text[len(PROVENANCE):]
    m = COMMANDS.match(rest)
    if not m:
        return "names no command in backticks right after 'Figures: '"
    parts = rest[m.end():].split(" · ")
    if parts[0] != "" or len(parts) < 2:
        return "has no ' · ' after its commands"
    if not DATE.fullmatch(parts[1].strip()):
        return f"has no date (YYYY-MM-DD) after its commands, found {parts[1].strip()!r}"
    try:
        datetime.date.fromisoformat(parts[1].strip())
    except ValueError:
        return f"has no valid date: {parts[1].strip()}"
    if len(parts) < 3 or not re.search(r"[A-Za-z]", parts[2]) or UNKNOWN.fullmatch(parts[2]):
        return "names no machine after its date"
    for command in re.findall(r"`([^`]+)`", m.group()):
        if problem := command_problem(command, repo):
            return f"command `{command}` {problem}"
    return None


def check_markdown(text: str, name: str, repo: Repo) -> list[str]:
    """Every problem of one document, as 'name:line: what'."""
    lines = text.splitlines()
    problems: list[str] = []
    tables: list[Table] = []
    fence = None
    provenance: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := FENCE.match(line):
            mark = m.group(1)
            if fence is None:
                fence = mark
            elif mark[0] == fence[0] and len(mark) >= len(fence) and not line.strip()[len(mark):]:
                fence = None
            i += 1
            continue
        if fence is not None:
            i += 1
            continue
        if HEADING.match(line):
            provenance = None
        elif line.startswith(PROVENANCE):  # a paragraph, wrapped or not
            end = i + 1
            while end < len(lines) and lines[end].strip() and "|" not in lines[end] \
                    and not HEADING.match(lines[end]) and not FENCE.match(lines[end]):
                end += 1
            provenance = (i + 1, " ".join(p.strip() for p in lines[i:end]))
            if any(LIST_ITEM.match(p) for p in lines[i + 1:end]):
                problems.append(f"{name}:{i + 1}: a wrapped provenance line goes on with a line "
                                "that starts a list ('+ ', '- ', '1. '): end the line before with "
                                "'+' instead")
            if problem := provenance_problem(provenance[1], repo):
                problems.append(f"{name}:{i + 1}: provenance line {problem}")
            if (i > 0 and lines[i - 1].strip()) or (end < len(lines) and lines[end].strip()):
                problems.append(f"{name}:{i + 1}: provenance line is not a paragraph of its own "
                                "(a blank line before and after)")
            i = end
            continue
        elif LOOSE_EXEMPT.search(line):
            if not EXEMPT.fullmatch(line.strip()):
                problems.append(f"{name}:{i + 1}: write '<!-- figures: none (<why>) -->'")
        elif LOOSE_PROVENANCE.match(line):
            problems.append(f"{name}:{i + 1}: a provenance line starts exactly 'Figures: '")
        if "|" in line and i + 1 < len(lines) and SEPARATOR.match(lines[i + 1]) \
                and "|" in lines[i + 1]:
            above = next((p for p in reversed(lines[:i]) if p.strip()), "")
            exempt = EXEMPT.fullmatch(above.strip())
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].strip() and "|" in lines[j] \
                    and not HEADING.match(lines[j]) and not FENCE.match(lines[j]):
                rows.append(lines[j])
                j += 1
            tables.append(Table(i + 1, line.strip(), rows, provenance,
                                exempt["why"] if exempt else None))
            i = j
            continue
        i += 1
    for table in tables:
        if table.exempt is None and table.provenance is None and table.measured():
            problems.append(f"{name}:{table.line}: table {table.header[:70]!r} has numbers but "
                            "no 'Figures: `command` · date · machine' line in its section and "
                            "no '<!-- figures: none (why) -->' right above it")
    return problems


@pytest.fixture(scope="module")
def repo() -> Repo:
    return Repo.read(ROOT)


@pytest.mark.parametrize("doc", DOCS)
def test_every_number_bearing_table_names_its_command_date_and_machine(doc, repo):
    problems = check_markdown((ROOT / doc).read_text(encoding="utf-8"), doc, repo)
    assert not problems, "\n".join(problems)


def test_the_cli_commands_read_from_source_are_the_apps_commands():
    typer = pytest.importorskip("typer")
    from mim4dd.cli import app as engine
    from orchestrator.cli import app as sweep

    for cli, app in (("mim4dd", engine), ("mim4dd-sweep", sweep)):
        assert cli_commands(ROOT / CLI_SOURCES[cli]) == set(typer.main.get_command(app).commands)


def test_the_makefile_targets_are_read():
    assert {"demo", "demo-data", "test", "bench", "clean-runs"} <= makefile_targets(
        ROOT / "Makefile")


GOOD = "Figures: `.venv/bin/python benchmarks/bench_cli.py --trials 100` · 2026-12-08 · 2-vCPU VM"
TABLE = "| command | wall |\n|---|--:|\n| `list` | 2.85 s |\n"


@pytest.mark.parametrize("doc, flagged", [
    (f"## A\n\n{GOOD}\n\n{TABLE}", None),
    (f"## A\n\n{TABLE}", "no 'Figures:"),
    (f"## A\n\n{GOOD}\n\n## B\n\n{TABLE}", "no 'Figures:"),  # another section's line
    (f"## A\n\n{GOOD.replace('bench_cli.py', 'bench_gone.py')}\n\n{TABLE}", "does not exist"),
    (f"## A\n\n{GOOD.replace(' · 2026-12-08', '')}\n\n{TABLE}", "no date"),
    (f"## A\n\n{GOOD.replace(' · 2-vCPU VM', '')}\n\n{TABLE}", "no machine"),
    (f"## A\n\n{GOOD.replace('2026-12-08', '2026-13-08')}\n\n{TABLE}", "no valid date"),
    (f"## A\nText.\n{GOOD}\n\n{TABLE}", "paragraph of its own"),
    (f"## A\n\n{GOOD}\n{TABLE}", "paragraph of its own"),
    (f"## A\n\n{GOOD.replace(' · 2026', chr(10) + '· 2026')}\n\n{TABLE}", None),  # wrapped
    (f"## A\n\n{GOOD.replace('2-vCPU VM', 'unknown')}\n\n{TABLE}", "no machine"),
    (f"## A\n\nFigures: `make bench`\n+ `make test` · 2026-12-08 · a VM\n\n{TABLE}", "a list"),
    (f"## A\n\nFigures: `make bench` +\n`make test` · 2026-12-08 · a VM\n\n{TABLE}", None),
    (f"## A\n\n**Figures:** `make bench` · 2026-12-08 · a VM\n\n{TABLE}", "exactly 'Figures: '"),
    (f"## A\n\n<!-- figures: none (a list of settings) -->\n{TABLE}", None),
    (f"## A\n\n<!-- figures: none -->\n{TABLE}", "figures: none (<why>)"),
    ("## A\n\n| a | b |\n|---|---|\n| one | two |\n", None),  # no measured cell
    (f"## A\n\n```\n{TABLE}```\n", None),  # a table in a code block is text
])
def test_the_checker_flags_what_it_should(doc, flagged, repo):
    problems = check_markdown(doc, "fake.md", repo)
    if flagged is None:
        assert problems == []
    else:
        assert any(flagged in p for p in problems), problems


@pytest.mark.parametrize("command, flagged", [
    ("make bench", None),
    ("make benchmarks", "no target of the Makefile"),
    ("python3 benchmarks/bench_speed.py --steps 5  # default engine", None),
    ("A=1 B=2 .venv/bin/python benchmarks/bench_tracking.py --k 64", None),
    ("python /tmp/profile_dc.py", "does not exist"),
    ("python ../outside.py", "does not exist"),
    ("python -m orchestrator.cli status x", None),
    ("python -m pytest", "not in this repository"),
    ("python -c 'print(1)'", "without a script"),
    ("bash docker/no_such.sh", "does not exist"),
    ("./no_such.sh", "does not exist"),
    ("mim4dd-sweep launch sweeps/quickstart.yaml --dry-run", None),
    (".venv/bin/mim4dd-sweep report quickstart --format csv", None),
    ("mim4dd-sweep launch sweeps/no_such.yaml", "does not exist"),
    ("mim4dd-sweep publish quickstart", "not a command of mim4dd-sweep"),
    ("mim4dd distill --config sweeps/none.yml", "does not exist"),
    ("mim4dd experts --dataset FashionMNIST", None),
    ("cargo bench", "not a command this repository has"),
])
def test_commands_are_checked_against_the_repository(command, flagged, repo):
    problem = command_problem(command, repo)
    assert (problem is None) if flagged is None else (flagged in (problem or "")), problem
