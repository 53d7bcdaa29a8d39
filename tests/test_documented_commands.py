"""Every command README.md and docs/*.md tell a user to run works as written.

The commands are read from the pages themselves: each line of a ``sh`` block,
each ``$ `` line and ``dgfs ...`` synopsis of a plain block, each fstab line,
and each inline code span that starts with a command (``dgfs sync PATH``,
``sudo .venv/bin/dgfs install-helper``...). Each is split into its simple
commands (``&&``, ``;``, ``|``, ``sh -c '...'``; ``sudo``, ``nice`` and
``VAR=value`` prefixes dropped), and each simple command is checked by what
it runs:

- ``dgfs SUB ...``: the subcommand exists and every flag it is given is in
  ``dgfs SUB --help``; every ``-o`` option is one of dgfs/cli/options.py;
- ``python SCRIPT.py ...`` and ``packaging/build-deb ...``: the script is in
  the checkout, its ``--help`` succeeds and names every flag it is given;
- ``python -m MODULE``, ``python -c CODE``, ``pip install -e '.[EXTRA]'``,
  ``bash SCRIPT``: the module imports, the code runs, the extra is in
  pyproject.toml, the script parses (``bash -n``);
- ``mount -t dgfs`` and fstab lines: their options are dgfs's or mount(8)'s;
- the system's own tools (cp, systemctl, apt-get...): not run, but every
  path into this checkout they name exists, and every Debian package
  ``apt-get install`` names is known to apt.

A command of any other program fails the test, naming where it is: add its
check here. The dgfs subcommands also run for real against a moto_server
(stats, verify, gc, migrate --dry-run, doctor, install-helper --path), and
README's "Using it" and install.md's "Checking the installation" blocks run
as written against a real mount. Benchmarks only run ``--help``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dgfs.cli import options
from dgfs.cli.main import build_parser
from dgfs.mount_helper import filter_options
from tests.mountutil import daemon_pids, dgfs_bin, is_mounted, new_bucket, wait_until
from testsupport.servers import s3_client

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HELP_TIMEOUT = 60.0

DGFS = {"dgfs", ".venv/bin/dgfs", "/usr/bin/dgfs", "/usr/local/bin/dgfs"}
PYTHON = {".venv/bin/python", "python", "python3", "/usr/bin/python3"}
PIP = {".venv/bin/pip", "pip"}
#: The system's tools: not run here; their paths into the checkout must exist.
SYSTEM = {
    ".", "apt", "apt-get", "cat", "cd", "chmod", "cp", "echo", "fusermount3", "getfattr",
    "git", "install", "journalctl", "ln", "ls", "mkdir", "mount", "pipx", "rsync", "seq", "set",
    "sudoedit", "systemctl", "systemd-analyze", "touch", "umount", "useradd", "xargs",
}  # fmt: skip
#: Inline code spans that start with one of these are commands (the rest is prose).
INLINE_STARTS = (DGFS | PYTHON | PIP | SYSTEM | {"sudo", "bash", "packaging/build-deb"}) - {
    ".",
    "cat",
    "cd",
    "echo",
    "ln",
    "ls",
    "mkdir",
    "set",
    "seq",
    "install",
    "touch",
}
#: Top-level entries of the checkout: a relative path starting with one names a file in it.
CHECKOUT_DIRS = {".ci", "benchmarks", "dgfs", "docs", "packaging", "systemd", "tests"}
#: mount(8)'s and systemd's own options in fstab lines (dgfs's are in options.BY_NAME).
MOUNT_GENERIC = re.compile(r"^(_netdev|noauto|auto|nofail|defaults|x-systemd\.[\w.-]+)(=.*)?$")
REDIRECTS = {">", ">>", "<", "<<", ">&", "<&", "&>"}
SEPARATORS = {";", "&&", "||", "|", "&"}


@dataclass(frozen=True)
class Documented:
    """One simple command of a page: where, the line as written, and its words."""

    where: str
    line: str
    argv: tuple[str, ...]
    synopsis: bool = False  # a usage line: placeholders and [optional] flags

    def __str__(self) -> str:
        return f"{self.where}: {self.line}"


# --- reading the pages ------------------------------------------------------------


def _lines_of_block(tag: str, body: str) -> Iterator[tuple[int, str, bool]]:
    """(line offset, command line, is a synopsis) of one fenced block."""
    lines = body.splitlines()
    i = 0
    heredoc: str | None = None
    while i < len(lines):
        start, line = i, lines[i]
        i += 1
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if tag in ("sh", "bash", "console"):
            while line.endswith("\\") and i < len(lines):
                line = line[:-1] + " " + lines[i].strip()
                i += 1
            if found := re.search(r"<<-?\s*'?(\w+)'?", line):
                heredoc = found.group(1)
            if line.strip():
                yield start, line.strip(), False
        elif tag == "":
            if line.startswith("$ "):
                yield start, line[2:].strip(), False
            elif line.startswith("dgfs "):
                # A usage synopsis: its indented lines continue it.
                while i < len(lines) and lines[i].startswith(" ") and "[" in lines[i]:
                    line += " " + lines[i].strip()
                    i += 1
                yield start, line, True
            elif _is_fstab(line):
                yield start, line, False


def _is_fstab(line: str) -> bool:
    fields = line.split()
    return len(fields) in (4, 5, 6) and fields[2] == "dgfs" and fields[1].startswith("/")


def _page_lines(page: Path) -> Iterator[tuple[str, str, bool]]:
    """(where, command line, is a synopsis) of every command ``page`` gives."""
    text = page.read_text()
    name = page.relative_to(ROOT)
    fenced = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    prose_parts: list[tuple[int, str]] = []
    last = 0
    for block in fenced.finditer(text):
        prose_parts.append((last, text[last : block.start()]))
        first_line = text[: block.start(2)].count("\n") + 1
        for offset, line, synopsis in _lines_of_block(block.group(1), block.group(2)):
            yield f"{name}:{first_line + offset}", line, synopsis
        last = block.end()
    prose_parts.append((last, text[last:]))
    for start, prose in prose_parts:
        for span in re.finditer(r"(?<!`)`([^`\n]+)`(?!`)", prose):
            words = span.group(1).split()
            if not words or words[0] not in INLINE_STARTS:
                continue
            if len(words) == 1 and "/" not in words[0]:
                continue  # a program named in prose (`umount`, `python3`)
            if len(words) > 1 and words[0] in DGFS and words[1].endswith(":"):
                continue  # a message dgfs prints (`dgfs stats: bucket ...`), not a command
            line_no = text[: start + span.start()].count("\n") + 1
            yield f"{name}:{line_no}", span.group(1), "..." in words or "[" in span.group(1)


def _words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _simple_commands(line: str) -> Iterator[list[str]]:
    """The simple commands of a shell line, prefixes dropped, ``sh -c`` scripts opened."""
    words = _words(line)
    current: list[str] = []
    i = 0
    while i <= len(words):
        word = words[i] if i < len(words) else ";"
        i += 1
        if word in SEPARATORS:
            if current:
                yield from _unwrapped(current)
            current = []
        elif word in REDIRECTS:
            if current and current[-1].isdigit():
                current.pop()  # 2>&1: the descriptor is no argument
            i += 1  # the redirect's target
        else:
            current.append(word)


def _unwrapped(argv: list[str]) -> Iterator[list[str]]:
    while argv and (
        argv[0] in ("sudo", "time", "env") or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0])
    ):
        argv = argv[1:]
    if argv[:2] == ["nice", "-n"]:
        argv = argv[3:]
    if argv and "/.venv/bin/" in argv[0]:
        argv = [".venv/bin/" + argv[0].rsplit("/", 1)[1], *argv[1:]]  # a venv elsewhere
    for shell in ("sh", "bash"):
        if shell in argv:
            at = argv.index(shell)
            if argv[at + 1 : at + 2] == ["-c"] and len(argv) > at + 2:
                if at:
                    yield argv[:at]  # xargs ... sh -c '...': xargs itself
                yield from _simple_commands(argv[at + 2])
                return
    if argv:
        yield argv


def documented_commands() -> list[Documented]:
    found = []
    for page in PAGES:
        for where, line, synopsis in _page_lines(page):
            if _is_fstab(line) or synopsis:
                # A usage synopsis's | and [...] are notation, not shell.
                found.append(Documented(where, line, tuple(line.split()), synopsis))
                continue
            for argv in _simple_commands(line):
                found.append(Documented(where, line, tuple(argv), synopsis))
    return found


# --- what each program accepts ----------------------------------------------------


def _run(*argv: str, timeout: float = HELP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def _help_target(doc: Documented) -> tuple[str, ...] | None:
    """The ``--help`` command that lists what ``doc`` may pass, if it has one."""
    argv = doc.argv
    if argv[0] in DGFS:
        sub = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else None
        if sub is None or sub not in _dgfs_subcommands():
            return (dgfs_bin(), "--help")
        return (dgfs_bin(), sub, "--help")
    if argv[0] in PYTHON:
        rest = [a for a in argv[1:] if a != "-I"]
        if rest and rest[0].endswith(".py") and (ROOT / rest[0]).is_file():
            return (sys.executable, rest[0], "--help")
        if rest[:2] == ["-m", "pytest"]:
            return (sys.executable, "-m", "pytest", "--help")
    if argv[0].endswith(".py") and (ROOT / argv[0]).is_file():
        return (sys.executable, argv[0], "--help")
    if argv[0] == "packaging/build-deb":
        return (str(ROOT / "packaging" / "build-deb"), "--help")
    return None


@functools.cache
def _dgfs_parsers() -> dict[str, argparse.ArgumentParser]:
    """dgfs's own parser ("") and each subcommand's, as ``dgfs [SUB] --help`` prints them."""
    parser = build_parser()
    found = {"": parser}
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _dgfs_subcommands() -> frozenset[str]:
    return frozenset(_dgfs_parsers()) - {""}


@functools.cache
def _helps() -> dict[tuple[str, ...], subprocess.CompletedProcess[str]]:
    """Every ``--help`` the documented commands need: dgfs's subcommands from its
    parser, the scripts' by running them (at once)."""
    targets = {t for doc in documented_commands() if (t := _help_target(doc)) is not None}
    done = {}
    for target in targets:
        if target[0] == dgfs_bin() and len(target) == 3:
            text = _dgfs_parsers()[target[1]].format_help()
            done[target] = subprocess.CompletedProcess(target, 0, text, "")
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        rest = sorted(targets - set(done))
        done.update(zip(rest, pool.map(lambda t: _run(*t), rest), strict=True))
    return done


@functools.cache
def _apt_packages(names: frozenset[str]) -> frozenset[str]:
    """Which of ``names`` apt knows (one apt-cache call)."""
    shown = _run("apt-cache", "show", "--no-all-versions", *sorted(names), timeout=60)
    return frozenset(re.findall(r"^Package: (\S+)", shown.stdout, re.M))


def _apt_has_lists() -> bool:
    """apt-cache can answer for packages not installed (``apt-get update`` ran)."""
    lists = Path("/var/lib/apt/lists")
    return shutil.which("apt-cache") is not None and any(lists.glob("*_Packages*"))


def _apt_installs(argv: tuple[str, ...]) -> list[str]:
    if argv[0] not in ("apt", "apt-get") or argv[1:2] != ("install",):
        return []
    return [p for p in argv[2:] if re.match(r"^[a-z0-9][a-z0-9.+-]+$", p)]


def _flags_of(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))


def _flags_given(argv: tuple[str, ...]) -> list[str]:
    flags = []
    for word in argv:
        word = word.strip("[]|")
        if re.match(r"^--?[A-Za-z]", word):
            flags.append(word.split("=", 1)[0])
    return flags


def _option_values(argv: tuple[str, ...]) -> list[str]:
    values = []
    for i, word in enumerate(argv):
        if word == "-o" and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif word.startswith("-o") and len(word) > 2 and not word.startswith("--"):
            values.append(word[2:])
    return values


def _unknown_options(text: str) -> list[str]:
    """The names in an ``-o`` string neither dgfs nor mount(8) know (placeholders pass)."""
    if text.isupper() or "$" in text:
        return []  # OPTIONS, "$DGFS_OPTIONS"
    unknown = []
    for item in filter_options(text):
        name = item.split("=", 1)[0]
        if name in ("...", "") or name in options.BY_NAME or MOUNT_GENERIC.match(item):
            continue
        unknown.append(name)
    return unknown


def _problems(doc: Documented) -> list[str]:
    """What is wrong with ``doc`` ([] if nothing); raises LookupError for a
    program this test cannot check."""
    argv = doc.argv
    program = argv[0]
    if _is_fstab(doc.line):
        return [f"unknown option {o}" for o in _unknown_options(argv[3])]
    target = _help_target(doc)
    problems = []
    if (
        program in DGFS
        and len(argv) > 1
        and not argv[1].startswith("-")
        and argv[1] not in _dgfs_subcommands()
    ):
        return [f"dgfs has no subcommand {argv[1]}"]
    if program in DGFS or target is not None:
        if target is None:
            raise LookupError(doc)
        helped = _helps().get(target) or _run(*target)
        if helped.returncode != 0:
            return [f"{shlex.join(target)} exits {helped.returncode}: {helped.stderr[-500:]}"]
        known = _flags_of(helped.stdout)
        skip = {"-m", "-I", "-c"} if program in PYTHON else set()
        problems += [
            f"{flag} is not in {shlex.join(target[1:] if program in PYTHON else target)}"
            for flag in _flags_given(argv[1:] if program not in PYTHON else argv[2:])
            if flag not in known and flag not in skip
        ]
        if program in DGFS:
            for text in _option_values(argv):
                problems += [f"dgfs has no -o {name}" for name in _unknown_options(text)]
        return problems
    if program in PYTHON:
        rest = [a for a in argv[1:] if a != "-I"]
        if rest[:1] == ["-m"] and len(rest) > 1:
            if rest[1] == "venv":
                return []
            return [] if importlib.util.find_spec(rest[1]) else [f"no module {rest[1]}"]
        if rest[:1] == ["-c"] and len(rest) > 1:
            ran = _run(sys.executable, "-c", rest[1], timeout=30)
            return [] if ran.returncode == 0 else [f"exits {ran.returncode}: {ran.stderr}"]
        if rest and rest[0].endswith(".py"):
            return [f"{rest[0]} is not in the checkout"]
        raise LookupError(doc)
    if program in PIP:
        return _pip_problems(argv)
    if program == "bash":
        script = ROOT / argv[1]
        if not script.is_file():
            return [f"{argv[1]} is not in the checkout"]
        checked = _run("bash", "-n", str(script))
        return [] if checked.returncode == 0 else [f"bash -n {argv[1]}: {checked.stderr}"]
    if program in SYSTEM:
        return _system_problems(doc)
    if program.startswith(("benchmarks/", "packaging/")):
        return [f"{program} is not in the checkout"]
    raise LookupError(doc)


def _pip_problems(argv: tuple[str, ...]) -> list[str]:
    extras_known = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    problems = []
    for word in argv[2:]:
        if found := re.match(r"^\.\[([\w,-]+)\]$", word):
            problems += [
                f"pyproject.toml has no extra {extra}"
                for extra in found.group(1).split(",")
                if extra not in extras_known
            ]
    return problems


def _system_problems(doc: Documented) -> list[str]:
    argv = doc.argv
    problems = []
    for word in argv[1:]:
        first = word.split("/", 1)[0]
        if "/" in word and first in CHECKOUT_DIRS and not (ROOT / word).exists():
            problems.append(f"{word} is not in the checkout")
    if argv[0] == "mount" and "-t" in argv and argv[argv.index("-t") + 1 :][:1] == ("dgfs",):
        for text in _option_values(argv):
            problems += [f"unknown option {name}" for name in _unknown_options(text)]
    if _apt_has_lists() and (wanted := _apt_installs(argv)):
        every = frozenset(p for d in documented_commands() for p in _apt_installs(d.argv))
        known = _apt_packages(every | frozenset(wanted))
        problems += [f"apt knows no package {p}" for p in wanted if p not in known]
    return problems


# --- the tests ----------------------------------------------------------------------


def test_the_pages_give_commands_of_every_kind() -> None:
    """The extraction itself: a page reorganised so it finds nothing would pass vacuously."""
    found = documented_commands()
    programs = {doc.argv[0] for doc in found}
    assert {"dgfs", ".venv/bin/python", "packaging/build-deb", "bash", "systemctl"} <= programs
    subcommands = {doc.argv[1] for doc in found if doc.argv[0] in DGFS and len(doc.argv) > 1}
    assert _dgfs_subcommands() <= subcommands, "a dgfs subcommand the docs never show"
    scripts = {a for doc in found for a in doc.argv if re.match(r"^benchmarks/\w+\.py$", a)}
    assert {"benchmarks/demo.py", "benchmarks/large.py", "benchmarks/speed.py"} <= scripts


def test_every_documented_command_and_flag_exists() -> None:
    problems: list[str] = []
    unhandled: list[str] = []
    for doc in documented_commands():
        try:
            problems += [f"{doc}\n    {problem}" for problem in _problems(doc)]
        except LookupError:
            unhandled.append(str(doc))
    assert not unhandled, (
        "commands of programs this test cannot check (add a check for them):\n"
        + "\n".join(unhandled)
    )
    assert not problems, "documented commands that do not work as written:\n" + "\n".join(problems)


def test_the_check_catches_a_missing_flag_and_subcommand() -> None:
    """The check above fails for what it must catch."""
    bad = [
        Documented("x", "dgfs stats s3://b --no-such-flag", ("dgfs", "stats", "s3://b", "--nope")),
        Documented("x", "dgfs frobnicate", ("dgfs", "frobnicate")),
        Documented("x", "dgfs mount b /m -o nope=1", ("dgfs", "mount", "b", "/m", "-o", "nope=1")),
        Documented("x", "", (".venv/bin/python", "benchmarks/large.py", "--quick", "--nope")),
        Documented("x", "", (".venv/bin/python", "benchmarks/gone.py")),
        Documented("x", "", ("packaging/build-deb", "--nope")),
        Documented("x", "", ("cp", "systemd/gone.service", "/etc/systemd/system/")),
        Documented("x", "", (".venv/bin/pip", "install", "-e", ".[nope]")),
        Documented("x", "r /m dgfs nope=1 0 0", ("r", "/m", "dgfs", "nope=1", "0", "0")),
    ]
    if _apt_has_lists():
        bad.append(Documented("x", "", ("apt-get", "install", "-y", "no-such-package-dgfs")))
    for doc in bad:
        assert _problems(doc), doc
    with pytest.raises(LookupError):
        _problems(Documented("x", "frob --x", ("frob", "--x")))


# --- running the dgfs subcommands -----------------------------------------------------


def _dgfs(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dgfs_bin(), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


@pytest.mark.timeout(120)
def test_the_operator_commands_run_against_a_bucket(moto_endpoint: str, tmp_path: Path) -> None:
    """CLI.md's and install.md's commands on a real (moto) bucket holding a file,
    as written but for the bucket and endpoint: each exits as its page says,
    without a traceback."""
    bucket = new_bucket(moto_endpoint)
    s3_client(moto_endpoint).put_object(Bucket=bucket, Key="a/notes.txt", Body=b"notes\n")
    env = {**os.environ, "AWS_ENDPOINT_URL": moto_endpoint}
    runs = {
        ("stats", f"s3://{bucket}", "--json"): {0},
        ("verify", "--all", f"s3://{bucket}"): {0},
        ("gc", f"s3://{bucket}", "--json"): {0},
        ("migrate", "--dry-run", f"s3://{bucket}/a/", f"s3://{bucket}/b/"): {0},
        # 1: a check failed on this machine (no user_allow_other, say), which is its job.
        ("doctor", bucket, "-o", f"endpoint={moto_endpoint}"): {0, 1},
        ("--version",): {0},
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(runs, pool.map(lambda a: _dgfs(*a, env=env), runs), strict=True))
    for args, allowed in runs.items():
        ran = results[args]
        assert ran.returncode in allowed and "Traceback" not in ran.stderr, (
            f"dgfs {shlex.join(args)} exited {ran.returncode}:\n{ran.stdout}\n{ran.stderr}"
        )
    assert "bucket" in results[("doctor", bucket, "-o", f"endpoint={moto_endpoint}")].stdout
    # install-helper and its --uninstall, where this test may write.
    helper = tmp_path / "mount.dgfs"
    for args in (("--path", str(helper)), ("--uninstall", "--path", str(helper))):
        ran = _dgfs("install-helper", *args)
        assert ran.returncode == 0, f"dgfs install-helper {shlex.join(args)}: {ran.stderr}"
    assert not helper.exists()


#: Blocks that run as written on a real mount: (page, the heading above the block).
MOUNTED_BLOCKS = [("README.md", "## Using it"), ("docs/install.md", "## Checking the installation")]


def _block_under(page: str, heading: str) -> str:
    """The first ``sh`` block after ``heading`` on ``page``."""
    text = (ROOT / page).read_text()
    return text.split(heading + "\n", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]


def _as_here(block: str, bucket: str, endpoint: str, tmp_path: Path) -> str:
    """``block`` with its bucket, endpoint, mount point and dist/ made this test's."""
    mnt, dist = tmp_path / "mnt", tmp_path / "dist"
    endpoint_here = f"endpoint={endpoint},cache_dir={tmp_path / 'cache'}"
    script = re.sub(r"endpoint=(http://minio:9000|URL)", endpoint_here, block)
    script = re.sub(r"/mnt/(releases|test)\b", str(mnt), script)
    script = re.sub(r"\b(dgfs (?:mount|doctor)) (releases|BUCKET)\b", rf"\1 {bucket}", script)
    script = re.sub(r"(?<![\w/])dist/", f"{dist}/", script)
    return "\n".join(
        line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )


@pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("page", "heading"), MOUNTED_BLOCKS)
def test_mount_blocks_run_as_written(
    moto_endpoint: str, tmp_path: Path, page: str, heading: str
) -> None:
    """A block that mounts, with its bucket, endpoint and paths replaced by this
    test's (a moto bucket; the placeholders BUCKET and URL likewise): run by
    bash -e as a user pastes it, it succeeds and leaves no mount behind."""
    bucket = new_bucket(moto_endpoint)
    mnt, dist = tmp_path / "mnt", tmp_path / "dist"
    (dist / "1.4.2").mkdir(parents=True)
    (dist / "app-1.4.2.zip").write_bytes(os.urandom(4096))
    (dist / "1.4.2" / "notes.txt").write_text("notes\n")
    script = _as_here(_block_under(page, heading), bucket, moto_endpoint, tmp_path)
    assert str(mnt) in script and bucket in script, script
    bin_dir = str(Path(dgfs_bin()).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    try:
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=90,
            check=False,
        )
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        wait_until(lambda: not daemon_pids(mnt), timeout=30)
    assert ran.returncode == 0, f"{script}\n---\n{ran.stdout}\n{ran.stderr}"
    assert not is_mounted(mnt)
    if page == "README.md":
        assert "app-1.4.2.zip" in ran.stdout and "user.dgfs.kind" in ran.stdout
        listing = s3_client(moto_endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
        keys = {o["Key"] for o in listing}
        assert any(k.startswith("app/1.4.2/") for k in keys), keys
        assert any("app-1.4.2.zip" in k for k in keys), keys
