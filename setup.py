"""Builds caffast._C, the C++ CPU kernels; all other metadata lives in pyproject.toml.

The build probes the compiler first so that a machine without a C++17 compiler fails at install time
with the fix in the message (instead of a wall of compiler output, or a package that silently lacks
its kernels), and so that OpenMP is used only where the toolchain can compile and link it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
except ImportError as error:  # only without build isolation: pyproject.toml lists pybind11
    raise SystemExit("caffast needs pybind11 to build its C++ extension: pip install 'pybind11>=2.10'") from error

CXX17_PROBE = "#include <optional>\nint main() { std::optional<int> x = 0; return *x; }\n"
OPENMP_PROBE = (
    "#include <omp.h>\n"
    "int main() { int n = 0;\n#pragma omp parallel reduction(+ : n)\n n += 1;\n"
    " return n > 0 && omp_get_max_threads() > 0 ? 0 : 1; }\n"
)
NO_COMPILER = (
    "caffast needs a C++17 compiler to build its CPU kernels (caffast._C) and none worked{detail}. "
    "Install one (Debian/Ubuntu: apt-get install g++; Fedora: dnf install gcc-c++; macOS: xcode-select --install) "
    "or point CXX/CC at it, then reinstall."
)


def _build_error(compiler, source: str, flags: list[str], link: bool) -> str | None:
    """Why `source` does not compile (or link into an executable, when asked) with `flags`; None if it does."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "probe.cpp")
        path.write_text(source)
        try:
            objects = compiler.compile([str(path)], output_dir=tmp, extra_postargs=flags)
            if link:
                compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=flags,
                                         target_lang="c++")
        except Exception as error:  # CompileError, LinkError, or no compiler executable at all
            return str(error) or type(error).__name__
    return None


SOURCES = sorted(str(path) for path in Path("csrc").glob("*.cpp"))
HEADERS = sorted(str(path) for path in Path("csrc").glob("*.h"))  # rebuild triggers, and shipped in the sdist


class ProbingBuildExt(build_ext):
    """build_ext that checks for C++17 and adds -O3 and OpenMP where the toolchain supports them
    (set CAFFAST_NO_OPENMP to build without OpenMP)."""

    def build_extensions(self) -> None:
        msvc = self.compiler.compiler_type == "msvc"
        std = ["/std:c++17"] if msvc else ["-std=c++17"]
        error = _build_error(self.compiler, CXX17_PROBE, std, link=False)
        if error is not None:
            raise SystemExit(NO_COMPILER.format(detail=f" ({error.strip()})"))
        optimize = ["/O2"] if msvc else ["-O3"]
        openmp = ["/openmp"] if msvc else ["-fopenmp"]
        use_openmp = (
            os.environ.get("CAFFAST_NO_OPENMP") is None
            and _build_error(self.compiler, OPENMP_PROBE, std + openmp, link=not msvc) is None
        )
        # Without OpenMP the pragmas are simply ignored; say so once here rather than per pragma.
        quiet_pragmas = [] if use_openmp or msvc else ["-Wno-unknown-pragmas"]
        for ext in self.extensions:
            ext.extra_compile_args += optimize + (openmp if use_openmp else quiet_pragmas)
            ext.extra_link_args += openmp if use_openmp and not msvc else []
        super().build_extensions()


ParallelCompile("CAFFAST_BUILD_JOBS").install()

setup(
    ext_modules=[
        Pybind11Extension(
            "caffast._C",
            SOURCES,
            include_dirs=["csrc"],
            depends=HEADERS,
            cxx_std=17,
        )
    ],
    cmdclass={"build_ext": ProbingBuildExt},
)
