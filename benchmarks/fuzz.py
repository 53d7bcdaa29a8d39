"""Long fuzzing runs of dgfs's parsers of untrusted bytes (atheris / libFuzzer).

    nice -n 10 .venv/bin/python benchmarks/fuzz.py --target NAME --execs N

Targets (testsupport/fuzz_targets.py): deep, dirindex, metadata, dgzip, control, proxycrypt
(``--list``). Each input is one call of the target; an exception the
parser does not declare, an input running over ``--timeout`` seconds
(5, an interval timer that raises ``Hang`` through the target) or the
process's address space passing ``--max-mb`` (512 MB, set as
``RLIMIT_AS``, so an allocation past it raises ``MemoryError``) is a
crash: libFuzzer stops and writes the input to
``tests/fuzz_corpus/<target>/crash-<sha1>``, where the test suite replays
it from then on. Starts from the target's own seeds plus that directory;
new coverage goes to a scratch corpus, not the repository.

The count is libFuzzer's own (``Done N runs``) and lands in
``benchmarks/results/fuzz-<target>.json``. Runs one process on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MB = 1 << 20


class Hang(BaseException):
    """One input ran past the time bound (a BaseException: no ``except
    Exception`` in dgfs may take it for the parser's own failure)."""


def _hang(signum: int, frame: object) -> None:
    raise Hang("one input ran past --timeout")


def _child(target_name: str, libfuzzer_args: list[str], timeout: float) -> None:
    """The fuzzing process itself (``--child``): atheris over one target."""
    import atheris

    sys.path.insert(0, str(ROOT))
    from testsupport import fuzz_targets

    target = fuzz_targets.TARGETS[target_name]
    _instrument(atheris, ("dgfs", "tarfile"), set(target.not_instrumented))

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        # libFuzzer's own mutations, and one in 50 a dictionary token
        # repeated (fuzz_targets.repeat_token: nesting bombs).
        if seed % 50 == 0:
            rng = random.Random(seed)
            return fuzz_targets.repeat_token(rng, data, target.dictionary)[:max_size]
        return bytes(atheris.Mutate(data, max_size))

    def run(data: bytes) -> None:
        # libFuzzer's -timeout never fires under atheris (checked: a 3 s
        # sleep passed -timeout=2), so the bound is an interval timer whose
        # handler raises through the target: a crash like any other.
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            target.run(data)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    signal.signal(signal.SIGALRM, _hang)
    atheris.Setup([sys.argv[0], *libfuzzer_args], run, custom_mutator=mutator)
    atheris.Fuzz()


def _instrument(atheris: Any, packages: tuple[str, ...], skipped: set[str]) -> None:
    """Coverage instrumentation of every function and method of ``packages``
    (nested functions included), except the ``skipped`` ones (``module.name``)."""
    done: set[int] = set()

    def patch(func: Any, qualname: str) -> None:
        code = getattr(func, "__code__", None)
        if isinstance(code, types.CodeType) and id(func) not in done and qualname not in skipped:
            done.add(id(func))
            atheris.instrument_func(func)

    for name, module in list(sys.modules.items()):
        if module is None or not any(name == p or name.startswith(p + ".") for p in packages):
            continue
        for attr, value in vars(module).items():
            if getattr(value, "__module__", None) != name:
                continue  # imported from elsewhere: patched with its own module
            if isinstance(value, type):
                for member_name, member in vars(value).items():
                    member = getattr(member, "__func__", member)  # static and class methods
                    member = getattr(member, "fget", member)  # properties
                    patch(member, f"{name}.{attr}.{member_name}")
            else:
                patch(value, f"{name}.{attr}")


def _stat(log: str, name: str) -> int | None:
    """A number from libFuzzer's final statistics (``-print_final_stats``)."""
    found = re.search(rf"stat::{name}:\s+(\d+)", log)
    return int(found.group(1)) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="one of --list")
    parser.add_argument("--execs", type=int, default=1_000_000, help="inputs to run (1,000,000)")
    parser.add_argument("--timeout", type=int, default=5, help="seconds one input may take (5)")
    parser.add_argument("--max-mb", type=int, default=512, help="address space, MB (512)")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's -seed (1)")
    parser.add_argument("--list", action="store_true", help="print the targets and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()

    if args.child:
        resource.setrlimit(resource.RLIMIT_AS, (args.max_mb * MB, args.max_mb * MB))
        _child(args.target, rest, args.timeout)
        return 0

    sys.path.insert(0, str(ROOT))
    from testsupport import fuzz_targets

    if args.list or args.target not in fuzz_targets.TARGETS:
        print("targets:", " ".join(fuzz_targets.TARGETS))
        return 0 if args.list else 2
    target = fuzz_targets.TARGETS[args.target]
    crashes = fuzz_targets.CORPUS / target.name
    crashes.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"dgfs-fuzz-{target.name}-") as work:
        seeds = Path(work) / "corpus"
        seeds.mkdir()
        for n, seed in enumerate(target.seeds()):
            (seeds / f"seed-{n:03d}").write_bytes(seed)
        for kept in fuzz_targets.corpus(target.name):
            (seeds / kept.name).write_bytes(kept.read_bytes())
        dictionary = Path(work) / "tokens.dict"
        dictionary.write_text(
            "".join(
                '"' + "".join(f"\\x{b:02x}" for b in token) + '"\n' for token in target.dictionary
            )
        )
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            "--target",
            target.name,
            "--max-mb",
            str(args.max_mb),
            f"-runs={args.execs}",
            "--timeout",
            str(args.timeout),
            f"-max_len={target.max_len}",
            f"-seed={args.seed}",
            "-rss_limit_mb=0",  # the address-space limit above is the bound
            f"-artifact_prefix={crashes}/",
            f"-dict={dictionary}",
            "-print_final_stats=1",
            str(seeds),
        ]
        print("==", " ".join(command[2:]), flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace")
        assert proc.stderr is not None
        log: list[str] = []
        for line in proc.stderr:
            sys.stderr.write(line)
            log.append(line)
        code = proc.wait()
        seconds = time.monotonic() - started
    text = "".join(log)
    done = re.search(r"Done (\d+) runs in (\d+) second", text)
    found = re.findall(r"Test unit written to (\S+)", text)
    result = {
        "target": target.name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "execs_asked": args.execs,
        "execs": int(done.group(1)) if done else None,
        "seconds": round(seconds, 1),
        "crashed": code != 0,
        "crash_inputs": found,
        "slowest_input_s": _stat(text, "slowest_unit_time_sec"),
        "peak_rss_mb": _stat(text, "peak_rss_mb"),
        "timeout_s": args.timeout,
        "max_mb": args.max_mb,
        "seed": args.seed,
        "command": f"nice -n 10 .venv/bin/python benchmarks/fuzz.py --target {target.name}"
        f" --execs {args.execs}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"fuzz-{target.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if code else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
