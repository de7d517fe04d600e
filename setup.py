"""Builds vmferry's one native extension: the C copy engine in ext/ bound by Cython."""
import glob
import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup


def pkgconfig(flag: str, pkg: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", flag, pkg], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return out.split()


# Only the engine sources; ext/tests/ holds the C unit tests that CMake builds.
sources = sorted(glob.glob("ext/*.c")) + ["src/vmferry/_engine.pyx"]
cflags = pkgconfig("--cflags", "libnbd") + pkgconfig("--cflags", "gnutls")
libs = ([f[2:] for f in pkgconfig("--libs", "libnbd") if f.startswith("-l")] or ["nbd"]) + \
       ([f[2:] for f in pkgconfig("--libs", "gnutls") if f.startswith("-l")] or ["gnutls"])

engine = Extension(
    "vmferry._engine",
    sources=sources,
    include_dirs=["ext"],
    # headers are part of the build: rebuilt when they change, shipped in an sdist
    depends=sorted(glob.glob("ext/*.h")),
    libraries=libs + ["pthread"],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wno-unused-function"] + cflags,
)

setup(ext_modules=cythonize([engine], language_level=3, compiler_directives={"embedsignature": True}))
