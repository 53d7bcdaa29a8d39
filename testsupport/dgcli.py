"""Running the real DeltaGlider CLI (6.2.0, in a venv of its own) from tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def deltaglider_bin() -> str:
    """Path of the DeltaGlider CLI: ``DELTAGLIDER_BIN`` or the one .ci/setup installs."""
    explicit = os.environ.get("DELTAGLIDER_BIN")
    path = Path(explicit) if explicit else ROOT / ".venv-deltaglider" / "bin" / "deltaglider"
    if not path.exists():
        raise FileNotFoundError(
            f"DeltaGlider CLI not found at {path}: run `bash .ci/setup` or set DELTAGLIDER_BIN"
        )
    return str(path)


def deltaglider_env(*, stock: bool = False) -> dict[str, str]:
    """The environment to run DeltaGlider in: no EC2 probes, few logs, and
    (unless ``stock``) ``XDELTA=-D -R`` so its gzip deltas can be read back."""
    env = dict(
        os.environ,
        DG_DISABLE_EC2_DETECTION="1",
        AWS_EC2_METADATA_DISABLED="true",
        XDELTA="-D -R",
        DG_LOG_LEVEL="WARNING",
    )
    if stock:
        del env["XDELTA"]
    return env


def run_deltaglider(
    endpoint: str, *args: str, check: bool = True, stock: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``deltaglider ARGS --endpoint-url ENDPOINT`` hermetically on loopback.

    With ``stock`` it runs as users run it, without the ``XDELTA`` fix, so
    it stores gzip input it cannot give back.
    """
    env = deltaglider_env(stock=stock)
    result = subprocess.run(
        [deltaglider_bin(), *args, "--endpoint-url", endpoint],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"deltaglider {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result
