"""Packaging: one import name, no shadowed top-level packages, a working plain checkout, README == CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_subpackages_import_under_dragrt() -> None:
    import dragrt.bench
    import dragrt.export
    import dragrt.kernels
    import dragrt.runtime.config

    assert Path(dragrt.kernels.__file__).parent.name == "kernels"
    assert dragrt.runtime.config.RuntimeConfig


def test_folders_refuse_to_be_top_level_packages() -> None:
    proc = _run("import runtime", cwd=ROOT)
    assert proc.returncode != 0
    assert "this folder is the package 'dragrt.runtime'" in proc.stderr
    # `kernels` shares its name with a PyPI package (transformers >= 5.25 requires and imports it). Without it
    # (`python -S`: no site-packages), the folder is an inert module whose attributes say what it is.
    proc = subprocess.run([sys.executable, "-S", "-c", "import kernels; kernels.bilinear_sample"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "this folder is the package 'dragrt.kernels'" in proc.stderr


def test_the_pypi_kernels_package_wins_over_the_folder_of_that_name() -> None:
    """Where the PyPI `kernels` is installed, `import kernels` from the checkout's root gets it, not our folder."""
    elsewhere = _run("import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')",
                     cwd=Path("/"))
    if not elsewhere.stdout.strip():
        pytest.skip("the PyPI package 'kernels' is not installed here")
    proc = _run("import kernels; print(kernels.__file__)", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == elsewhere.stdout.strip()


def test_transformers_and_diffusers_import_from_the_repository_root() -> None:
    """From the checkout's root (python -c, a REPL), transformers imports `kernels` to probe for the PyPI package of
    that name: our folder must read as "no usable kernels", not break the import."""
    proc = _run("from transformers.activations import ACT2FN; from diffusers import StableDiffusionPipeline; "
                "StableDiffusionPipeline.__name__", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_plain_checkout_works_without_install(tmp_path) -> None:
    """A copy of the tree with no install imports dragrt.kernels from the copy (the checkout's own files)."""
    for name in ("dragrt", "kernels", "runtime", "export", "bench", "zoo"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    code = ("import sys; sys.path.insert(0, '.'); import dragrt, dragrt.kernels, dragrt.runtime.config; "
            "print(dragrt.kernels.__file__); from dragrt.cli import main; raise SystemExit(main(['--version']))")
    proc = _run(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(str(tmp_path))


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    demo_cmd, test_cmd = blocks
    assert demo_cmd.endswith("dragrt demo")
    assert test_cmd.endswith("pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci
    # Both commands pin the CPU torch first: a CPU machine never pulls a CUDA build.
    assert demo_cmd.startswith("pip install torch==") and test_cmd.startswith("pip install torch==")
    # The README's first lines lead to the two commands.
    assert readme.index(demo_cmd) < readme.index(test_cmd) < readme.index("## ")


def test_markers_are_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    for marker in ("cuda:", "slow:", "trt:"):
        assert marker in text


def test_every_subpackage_is_listed_for_regular_installs() -> None:
    """A folder with an __init__.py that pyproject does not list would be missing from a built wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for pkg, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join([pkg, *rel.parts]))
    assert found <= listed, f"not listed in pyproject packages: {sorted(found - listed)}"
