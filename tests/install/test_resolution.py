"""The requirement sets resolve on an ordinary Linux x86_64 machine, from the public index alone, for
every target we claim: requirements.txt (development, CI, the demo) for each Python version that
pyproject.toml's requires-python allows, and requirements-serve.txt (the production image) for the
Python of docker/Dockerfile's base image.

pip's own resolver runs per target (`pip install --dry-run --isolated --ignore-installed
--only-binary=:all: --python-version X --platform ...`): --isolated drops this machine's pip
configuration (its local wheel folder holding a CPU build of torch, local indexes, a torch cap), so
what resolves here resolves anywhere with the same index. Binary wheels only, metadata only (PyPI
serves it apart from the wheels), so nothing large is downloaded. Needs the public index: CI reaches it.

Owns: the list of targets and the platform floor (glibc 2.35: nvidia-pytriton 0.7.0's wheel is
manylinux_2_35). Does not own: the pins (requirements*.txt) or the claimed Python versions (pyproject.toml).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

REPO_ROOT = Path(__file__).resolve().parents[2]
INDEX = "https://pypi.org/simple"
GLIBC_MINOR = 35  # the newest manylinux tag among the pins' wheels (nvidia-pytriton 0.7.0)
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def claimed_pythons() -> list[str]:
    spec = SpecifierSet(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    return [f"3.{minor}" for minor in range(8, 20) if f"3.{minor}" in spec]


def image_python() -> str:
    """The Python of the server stage's base image (python:3.X-slim-...)."""
    sys.path.insert(0, str(REPO_ROOT / "tests" / "deploy"))
    from deploy_helpers import stage

    match = re.fullmatch(r"python:(3\.\d+)-slim-\w+", stage("server").base)
    assert match, f"the server stage's base {stage('server').base} is not an official python image"
    return match.group(1)


def pins(path: Path) -> dict[str, str]:
    """{name: version} of a requirements file's `name==version` lines, following `-r` includes."""
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            out.update(pins(path.parent / line[3:].strip()))
        elif line:
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", line).groups()
            out[name.lower()] = version
    return out


def targets() -> list[tuple[str, str]]:
    """(requirements file, Python version): the development set for each claimed Python, the image's
    set for the image's Python."""
    return [("requirements.txt", python) for python in claimed_pythons()] + [("requirements-serve.txt", image_python())]


def start_resolution(requirements: str, python: str) -> subprocess.Popen:
    """pip's resolver for one target, metadata only: the index here serves no separate metadata files
    (PEP 658), so --use-feature=fast-deps reads each wheel's METADATA with HTTP range requests instead
    of downloading the wheels (torch and its CUDA libraries: 3 GB per target). pip is the venv's, pinned
    by scripts/setup.sh."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--isolated", "--ignore-installed",
               "--use-feature=fast-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
               *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
               "--index-url", INDEX, "--quiet", "--report", "-", "-r", str(REPO_ROOT / requirements)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}  # --isolated does this too
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def resolutions() -> dict[tuple[str, str], tuple[int, str, str]]:
    """Every target's (exit code, report, stderr); the runs go in parallel (each waits on the network)."""
    running = {target: start_resolution(*target) for target in targets()}
    outputs = {target: process.communicate() for target, process in running.items()}  # (stdout, stderr)
    return {target: (running[target].returncode, *outputs[target]) for target in running}


def check_resolution(resolutions, requirements: str, python: str) -> dict[str, dict]:
    """{name: the report's install item} for that target, after checking that every pin resolved to
    itself from the public index; the test fails with pip's own message if it did not resolve."""
    code, stdout, stderr = resolutions[(requirements, python)]
    assert code == 0, f"{requirements} does not resolve for Python {python}:\n{stderr[-3000:]}"
    resolved = {item["metadata"]["name"].lower().replace("_", "-"): item for item in json.loads(stdout)["install"]}
    for name, version in pins(REPO_ROOT / requirements).items():
        assert name in resolved, f"{name} is pinned in {requirements} but was not resolved"
        assert resolved[name]["metadata"]["version"] == version, (name, resolved[name]["metadata"]["version"])
    for name, item in resolved.items():  # from the public index, never from a local folder
        assert item["download_info"]["url"].startswith("https://files.pythonhosted.org/"), (name, item["download_info"])
    return resolved


def test_claimed_python_versions():
    """The claim is 3.11 and 3.12: the pins need 3.11 (pillow, transformers, fastapi); numpy 1.26 (numpy<2
    for Triton's Python backend) has no 3.13 wheels; nvidia-pytriton has a backend stub for each."""
    import pytriton

    pythons = claimed_pythons()
    assert pythons == ["3.11", "3.12"]
    stubs = Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs"
    for python in pythons:
        assert (stubs / python / "triton_python_backend_stub").is_file(), f"no Python backend stub for {python}"
    assert image_python() in pythons
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in pythons  # this machine and CI


@pytest.mark.parametrize("python", claimed_pythons())
def test_requirements_resolve_from_the_public_index(resolutions, python):
    resolved = check_resolution(resolutions, "requirements.txt", python)
    # PyPI's torch 2.13.0 requires exactly the pinned triton (its own): no conflict with the kernels' pin
    torch_needs = [r for r in resolved["torch"]["metadata"].get("requires_dist", []) if r.startswith("triton")]
    assert any(f"=={pins(REPO_ROOT / 'requirements-serve.txt')['triton']}" in r for r in torch_needs), torch_needs


def test_image_requirements_resolve_with_cuda_torch(resolutions):
    resolved = check_resolution(resolutions, "requirements-serve.txt", image_python())
    assert "pytest" not in resolved and "locust" not in resolved  # development tools stay out of the image
    cuda = [name for name in resolved if name.startswith("nvidia-cuda-runtime")]
    assert cuda, "torch resolved without its CUDA runtime: not the GPU build"
