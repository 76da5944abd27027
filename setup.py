"""Build diffit's compiled kernels (Cython); all other metadata is in pyproject.toml.

Every ``diffit/*.pyx`` becomes an extension module of the same name. The kernels must
reproduce Montage's doubles bit for bit, so the C compiler may not contract ``a*b + c``
into fused multiply-adds (``-ffp-contract=off``) nor reassociate (no fast-math).
"""
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_STRICT_FLOAT_FLAGS = {"unix": ["-ffp-contract=off", "-fno-fast-math"], "msvc": ["/fp:strict"]}


class StrictFloatBuildExt(build_ext):
    """build_ext that adds the compiler's strict floating-point flags to every kernel."""

    def build_extensions(self):
        flags = _STRICT_FLOAT_FLAGS.get(self.compiler.compiler_type, [])
        for extension in self.extensions:
            extension.extra_compile_args = [*extension.extra_compile_args, *flags]
        super().build_extensions()


def _extensions():
    sources = sorted(Path("diffit").glob("*.pyx"))
    extensions = [Extension(f"diffit.{path.stem}", [str(path)]) for path in sources]
    return cythonize(extensions, language_level=3, compiler_directives={
        "boundscheck": False, "wraparound": False, "initializedcheck": False,
        "cdivision": True, "infer_types": False,
    })


setup(ext_modules=_extensions(), cmdclass={"build_ext": StrictFloatBuildExt})
