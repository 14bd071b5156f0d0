"""The CPU kernels' C++ extension (engine/csrc); everything else is in pyproject.toml.

The extension needs only a C++ compiler and Python's headers (no torch at build time). Where it
cannot be built the install still succeeds: the engine then builds it on first use
(engine/kernel_build.py) or, failing that, runs its torch path.
"""

import sys
from pathlib import Path

from setuptools import Extension, setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import kernel_build  # torch-free

setup(
    ext_modules=[
        Extension(
            f"engine.{kernel_build.MODULE}",
            sources=[f"engine/csrc/{s}" for s in kernel_build.SOURCES],
            depends=[f"engine/csrc/{h}" for h in kernel_build.HEADERS],
            extra_compile_args=[*kernel_build.COMPILE_ARGS, kernel_build.hash_define(kernel_build.source_hash())],
            extra_link_args=kernel_build.LINK_ARGS,
            language="c++",
            optional=True,
        )
    ]
)
