"""The wheel installs one import package, ``sparkserve``, and lives beside Hugging Face's ``kernels``.

Builds the wheel from this checkout, looks at what it would put at the top of site-packages, installs it
(``--no-deps``) into a fresh venv together with the newest ``transformers`` from the package index (which
brings Hugging Face's ``kernels`` distribution), and from a working directory outside the checkout imports
transformers' hub-kernels integration and ``sparkserve.kernels`` side by side. torch and the other heavy
dependencies come from the test interpreter's own site-packages through a ``.pth`` line placed after the
fresh venv's own packages, so the fresh ``transformers`` / ``kernels`` win. Needs the package index (CI
and the developers' machines reach PyPI).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("server", "engine", "kernels", "scheduler", "train", "loadtests", "benchmarks")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, cwd=out)
    (path,) = out.glob("sparkserve-*.whl")
    return path


def test_wheel_has_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"sparkserve"}, top
    for sub in SUBPACKAGES:  # every folder of the layout is mapped into the namespace
        assert f"sparkserve/{sub}/__init__.py" in names, sub
    assert any(n.startswith("sparkserve/engine/spec_decode/weights/") for n in names)  # package data
    assert "sparkserve/kernels/cpu/int4_gemm.cpp" in names  # compiled after install (kernels/int4_cpu.py)
    assert "sparkserve/kernels/cpu/int4_gemm/common.h" in names  # with the headers it includes
    assert not any(n.startswith(("tests/", "sparkserve/tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sparkserve = sparkserve.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "sparkserve/cli.py" in names and "sparkserve/server/http_server.py" in names  # the CLI left server/


def test_wheel_beside_newest_transformers(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "transformers"], check=True, cwd=tmp_path)
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, cwd=tmp_path)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # torch, numpy, tokenizers ... from the test interpreter, after the fresh venv's own packages.
    Path(site, "zz_outer_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import kernels, transformers, transformers.integrations.hub_kernels\n"
        "import sparkserve, sparkserve.kernels, sparkserve.kernels.attention_metadata\n"
        "import sparkserve.engine.quant, sparkserve.server.protocol\n"
        "assert hasattr(kernels, 'CUDAProperties'), kernels.__file__  # Hugging Face's package\n"
        "assert 'site-packages' in sparkserve.kernels.__file__, sparkserve.kernels.__file__\n"
        "assert len(sparkserve.__path__) == 1, sparkserve.__path__  # no checkout root in an installed wheel\n"
        "print(transformers.__version__, kernels.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert str(ROOT) not in result.stdout


def test_cli_from_any_directory(tmp_path: Path) -> None:
    """The console script and ``python -m sparkserve`` work outside the checkout."""
    exe = Path(sys.executable).with_name("sparkserve")
    for cmd in ([str(exe), "--help"], [sys.executable, "-m", "sparkserve", "--help"]):
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "serve" in result.stdout and "bench" in result.stdout
