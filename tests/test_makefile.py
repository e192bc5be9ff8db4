"""The Makefile's targets do what the README says and leave a user's install alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _recipe(target: str) -> list[str]:
    out = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if not line.startswith("make")]


def test_make_bench_never_reinstalls_msilo() -> None:
    lines = _recipe("bench")
    installs = [line for line in lines if "pip install" in line]
    assert installs, "bench installs its own tools"
    for line in installs:
        # Only the benchmark tools: the package itself (".", "-e .") is never installed.
        assert " -e " not in line and " . " not in f"{line} " and "'.[" not in line, line
    runs = [line for line in lines if "bench/" in line]
    assert runs and all(line.startswith(f"PYTHONPATH={ROOT}") for line in runs), runs


def test_bench_store_exit_status_is_about_lost_rows_not_the_disk(pg_server_dsn: str) -> None:
    """A short run on the real server: every row counted -> 0, even when the ratio (a
    property of the disk) is below an unreachable --target; --strict makes that fatal."""
    argv = [sys.executable, str(ROOT / "bench" / "bench_store.py"), "--dsn", pg_server_dsn,
            "--callers", "1,512", "--duration", "0.3", "--warmup", "0.1",
            "--target", "1000"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "below target" in out.stdout
    strict = subprocess.run([*argv, "--strict"], capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1, strict.stdout + strict.stderr
