"""The tritonserver binary and its Python backend, from the installed `nvidia-pytriton` wheel, and the
environment the server and its Python stubs must run in.

Owns: finding `tritonserver`; preparing (once, cached) a `--backend-directory` whose `python/` holds the
stub built for the running Python; the environment (the venv's `bin/` first on PATH so the stub embeds
this interpreter, LD_LIBRARY_PATH with libpython's folder and the wheel's bundled libraries,
INTERNVL_CHECKPOINT for the models). Does not own: starting or stopping the server (serving/triton_server.py).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_ENV = "INTERNVL_CHECKPOINT"  # read by the models' initialize()


class LaunchError(RuntimeError):
    """The server could not be found, prepared, started or made ready."""


@dataclass(frozen=True)
class TritonInstall:
    server: Path  # the tritonserver binary
    backends: Path  # a --backend-directory holding python/ for this interpreter
    library_dirs: tuple[Path, ...]  # to put on LD_LIBRARY_PATH


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _default_cache() -> Path:
    """Where prepared backend folders live: inside the venv when writable, else ~/.cache."""
    venv = Path(sys.prefix) / "var" / "internvl-serve"
    try:
        venv.mkdir(parents=True, exist_ok=True)
        if os.access(venv, os.W_OK):
            return venv
    except OSError:
        pass
    return Path.home() / ".cache" / "internvl-serve"


def prepare_backend_directory(wheel_root: Path, cache: Path | None = None) -> Path:
    """A backend folder with python/{libtriton_python.so, triton_python_backend_utils.py,
    triton_python_backend_stub (for this Python)}; made once per wheel version and Python version."""
    version = _python_version()
    source = wheel_root / "backends" / "python"
    stub = wheel_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    files = [source / "libtriton_python.so", source / "triton_python_backend_utils.py", stub]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise LaunchError(f"the nvidia-pytriton wheel lacks {', '.join(missing)} (Python {version} supported?)")
    try:
        wheel_version = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        wheel_version = "unknown"
    target = (cache or _default_cache()) / f"triton-backends-pytriton{wheel_version}-py{version}"
    python = target / "python"
    if all((python / f.name).is_file() and (python / f.name).stat().st_size == f.stat().st_size for f in files):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    (staging / "python").mkdir()
    for f in files:
        shutil.copy2(f, staging / "python" / f.name)
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process won the race: its copy is the same
        shutil.rmtree(staging, ignore_errors=True)
    return target


def find_triton(tritonserver: str | Path | None = None, backend_directory: str | Path | None = None) -> TritonInstall:
    """The server from the installed nvidia-pytriton wheel, or the given binary and backend folder.
    Without the wheel, $TRITONSERVER and $TRITON_BACKENDS (as .carry/bootstrap.sh exports them)."""
    library_dirs = [Path(sysconfig.get_config_var("LIBDIR") or sys.base_prefix + "/lib")]
    spec = importlib.util.find_spec("pytriton")
    wheel_root = None
    if spec is not None and spec.submodule_search_locations:
        package = Path(list(spec.submodule_search_locations)[0])
        wheel_root = package / "tritonserver"
        library_dirs.append(package.parent / "nvidia_pytriton.libs")
    if wheel_root is None:  # no wheel: a server unpacked elsewhere (the GPU machine's .carry/bootstrap.sh)
        tritonserver = tritonserver or os.environ.get("TRITONSERVER")
        backend_directory = backend_directory or os.environ.get("TRITON_BACKENDS")
    if tritonserver is None:
        if wheel_root is None:
            raise LaunchError("nvidia-pytriton is not installed in this Python; run scripts/setup.sh, "
                              "or pass --tritonserver and --backend-directory")
        tritonserver = wheel_root / "bin" / "tritonserver"
    server = Path(tritonserver)
    if not (server.is_file() and os.access(server, os.X_OK)):
        raise LaunchError(f"no executable tritonserver at {server}")
    if backend_directory is None:
        if wheel_root is None:
            raise LaunchError("pass --backend-directory (a folder holding python/ for this Python)")
        backend_directory = prepare_backend_directory(wheel_root)
    return TritonInstall(server=server, backends=Path(backend_directory),
                         library_dirs=tuple(d for d in library_dirs if d.is_dir()))


def server_environment(install: TritonInstall, checkpoint: Path, base: dict | None = None,
                       malloc_mmap_threshold: int | None = None) -> dict:
    """The environment tritonserver (and the Python backend's stubs) must run in. malloc_mmap_threshold:
    bytes from which every process of the server mmaps its host allocations (None or 0: glibc's
    adaptive default; the adapters fix it where it pays, serving/heap.py)."""
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.prefix) / "bin")  # the stub takes sys.prefix from the first python3 on PATH
    env["PATH"] = os.pathsep.join([venv_bin] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin])
    libs = [str(d) for d in install.library_dirs] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(libs))
    env[CHECKPOINT_ENV] = str(checkpoint)
    env["PYTHONUNBUFFERED"] = "1"
    # For every process, tritonserver's own included: allocations from this size on are their own mmap,
    # given back when freed (serving/heap.py says why and what it costs). A value already set is kept.
    if malloc_mmap_threshold:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(int(malloc_mmap_threshold)))
    return env
