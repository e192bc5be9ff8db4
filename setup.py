"""Build of msilo's one compiled module, ``msilo._fastparse``.

Metadata lives in pyproject.toml; this file only declares the extension and a
``build_ext`` that cythonizes it.  A missing Cython or C compiler is a build
error: a silent pure-Python build would ship a server 10x slower than expected.
``MSILO_NO_EXTENSIONS=1`` is the one explicit way to build without it.

Options (each also an environment variable):
  --cython-always       MSILO_BUILD_CYTHON_ALWAYS=1     re-cythonize even if the .c exists
  --cython-annotate     MSILO_BUILD_CYTHON_ANNOTATE=1   write the annotated HTML next to the .pyx
  --cython-directives   MSILO_BUILD_CYTHON_DIRECTIVES=k=v,...
  MSILO_DEBUG=1         annotate, line tracing, -O0 -g, and MSILO_DEBUG invariant checks
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

CYTHON_DEPENDENCY = "Cython>=3.1,<4.0"
MIN_CYTHON = (3, 1)

NO_EXTENSIONS = os.environ.get("MSILO_NO_EXTENSIONS", "") not in ("", "0")
DEBUG = os.environ.get("MSILO_DEBUG", "") not in ("", "0")

CFLAGS = ["-O0", "-g"] if DEBUG else ["-O2"]
CFLAGS += ["-fsigned-char", "-Wall", "-Wno-unused-function"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


class build_ext(_build_ext):
    """Cythonize msilo's extension, loudly refusing to build without Cython or a compiler."""

    user_options = [  # noqa: RUF012 - setuptools reads this class attribute
        *_build_ext.user_options,
        ("cython-always", None, "run the cythonize() compile step even if the .c file exists"),
        ("cython-annotate", None, "produce a colorized HTML version of the Cython source"),
        ("cython-directives=", None, "Cython compiler directives, k=v[,k=v...]"),
    ]
    boolean_options = [  # noqa: RUF012
        *_build_ext.boolean_options,
        "cython-always",
        "cython-annotate",
    ]

    def initialize_options(self) -> None:
        super().initialize_options()
        self.cython_always = _env_flag("MSILO_BUILD_CYTHON_ALWAYS") or DEBUG
        self.cython_annotate = _env_flag("MSILO_BUILD_CYTHON_ANNOTATE") or DEBUG
        self.cython_directives = os.environ.get("MSILO_BUILD_CYTHON_DIRECTIVES")

    def finalize_options(self) -> None:
        if getattr(self, "_msilo_finalized", False):
            super().finalize_options()
            return
        self._msilo_finalized = True
        if not self.distribution.ext_modules:  # the explicit pure build needs no Cython
            super().finalize_options()
            return
        try:
            import Cython
            from Cython.Build import cythonize
        except ImportError as exc:
            raise RuntimeError(
                f"msilo needs Cython to build its parser: pip install '{CYTHON_DEPENDENCY}' "
                "(or set MSILO_NO_EXTENSIONS=1 for an explicitly pure-Python, slow build)"
            ) from exc
        version = tuple(int(p) for p in Cython.__version__.split(".")[:2] if p.isdigit())
        if version < MIN_CYTHON:
            raise RuntimeError(
                f"msilo requires {CYTHON_DEPENDENCY}, found Cython {Cython.__version__}"
            )

        directives: dict[str, object] = {
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        }
        if DEBUG:
            directives.update(linetrace=True, boundscheck=True, wraparound=True)
        if self.cython_directives:
            for item in self.cython_directives.split(","):
                key, _, value = item.partition("=")
                directives[key.strip()] = value.strip()

        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=bool(self.cython_annotate),
            force=bool(self.cython_always),
            compile_time_env={"MSILO_DEBUG": DEBUG},
        )
        super().finalize_options()

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            raise RuntimeError(
                f"msilo: could not compile {ext.name} ({exc}). Install a C compiler and the "
                "Python headers (Debian: apt-get install gcc python3-dev), or set "
                "MSILO_NO_EXTENSIONS=1 for an explicitly pure-Python, slow build."
            ) from exc


if NO_EXTENSIONS:
    print(
        "*" * 70,
        "\nmsilo: MSILO_NO_EXTENSIONS is set: PURE-PYTHON build (slow parser)\n",
        "*" * 70,
        file=sys.stderr,
    )
    ext_modules: list[Extension] = []
else:
    macros = [("MSILO_DEBUG", "1")] if DEBUG else []
    if DEBUG:
        macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    ext_modules = [
        Extension(
            "msilo._fastparse",
            ["msilo/_fastparse.pyx"],
            extra_compile_args=CFLAGS,
            define_macros=macros,
        )
    ]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
