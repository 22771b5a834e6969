"""Package layout for setuptools (the rest of the metadata is in pyproject.toml).

The source folders stay at the repository root and are installed under one import namespace:
``engine/`` is ``sparkserve.engine``, ``server/`` is ``sparkserve.server``, and so on. ``sparkserve/``
itself holds the namespace's ``__init__``. Subpackages are found, not listed, so a new folder with an
``__init__.py`` ships without touching this file (tests/test_packaging.py builds the wheel and checks).
"""

from setuptools import find_packages, setup

SUBPACKAGES = ("server", "engine", "kernels", "scheduler", "train", "loadtests", "benchmarks")

packages = ["sparkserve"] + [
    f"sparkserve.{name}"
    for name in find_packages(include=[*SUBPACKAGES, *(f"{root}.*" for root in SUBPACKAGES)])
]
package_dir = {"sparkserve": "sparkserve", **{f"sparkserve.{root}": root for root in SUBPACKAGES}}

setup(packages=packages, package_dir=package_dir)
