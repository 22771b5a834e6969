"""sparkserve: a high-concurrency LLM inference server built around DSpark speculative decoding.

One import namespace for the whole product. The source folders stay at the repository root (the
required layout: ``server/``, ``engine/``, ``kernels/``, ``scheduler/``, ``train/``, ``loadtests/``,
``benchmarks/``) and the build maps each one into this package (``setup.py``'s ``package_dir``):
``sparkserve.engine`` is ``engine/``, and so on. Nothing else is installed at the top level of site-packages.

Run from a source checkout that was not installed (a copy of the tree on a GPU box, with the repository
root on ``sys.path``), this package's search path also covers the repository root, so
``import sparkserve.engine`` finds ``engine/`` there too. An installed wheel never does this: its parent
folder is site-packages, which holds no ``pyproject.toml``.
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

_SUBPACKAGES = ("server", "engine", "kernels", "scheduler", "train", "loadtests", "benchmarks")


def _checkout_root() -> str | None:
    """The repository root when this file lives in a source checkout (``<root>/sparkserve/``), else None."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if _os.path.isfile(_os.path.join(root, "pyproject.toml")) and all(
        _os.path.isfile(_os.path.join(root, name, "__init__.py")) for name in _SUBPACKAGES
    ):
        return root
    return None


_root = _checkout_root()
if _root is not None and _root not in __path__:  # noqa: F821 (__path__ is set for packages)
    __path__.append(_root)  # noqa: F821
del _root
