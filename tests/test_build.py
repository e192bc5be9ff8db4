"""The build refuses to ship a silently pure-Python msilo (issue: a missing Cython or
compiler is a clear build error, never a silent pure build)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs setup.py's build_ext as pip would, with the ``Cython`` package made unimportable.
NO_CYTHON = (
    "import sys; sys.modules['Cython'] = None; sys.modules['Cython.Build'] = None; "
    "sys.argv = ['setup.py', 'build_ext', '--inplace']; "
    "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))"
)


def _tree(tmp_path: Path) -> Path:
    work = tmp_path / "src"
    (work / "msilo").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, work / name)
    shutil.copy(ROOT / "msilo" / "_fastparse.pyx", work / "msilo" / "_fastparse.pyx")
    shutil.copy(ROOT / "msilo" / "_version.py", work / "msilo" / "_version.py")
    (work / "msilo" / "__init__.py").write_text("")
    return work


def _run(work: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=work, capture_output=True, text=True,
        env={**os.environ, **env}, timeout=300,
    )  # fmt: skip


def test_missing_cython_is_a_build_error_that_says_what_to_install(tmp_path: Path) -> None:
    out = _run(_tree(tmp_path), NO_CYTHON)
    assert out.returncode != 0
    assert "msilo needs Cython to build its parser" in out.stderr
    assert "MSILO_NO_EXTENSIONS=1" in out.stderr


def test_missing_compiler_is_a_build_error(tmp_path: Path) -> None:
    code = NO_CYTHON.replace(
        "import sys; sys.modules['Cython'] = None; sys.modules['Cython.Build'] = None; ",
        "import sys; ",
    )
    out = _run(_tree(tmp_path), code, CC="/nonexistent/cc")
    assert out.returncode != 0
    assert "could not compile msilo._fastparse" in out.stderr


def test_explicit_pure_build_says_so(tmp_path: Path) -> None:
    out = _run(_tree(tmp_path), NO_CYTHON, MSILO_NO_EXTENSIONS="1")
    assert out.returncode == 0, out.stderr
    assert "PURE-PYTHON build" in out.stderr
