"""docker/Dockerfile and docker/compose.yaml, checked statically (no Docker engine on these machines):
pinned base images; the server's base is an official Python image of a version the pins resolve for
(tests/install resolves requirements-serve.txt for it) and its Triton is the nvidia-pytriton wheel's, the
server the tests run; every COPY source exists (and is not ignored); the dependency pins come from
requirements*.txt only (the loadtest stage's real shell lines run here on the real files); a non-root user, the health check on /v2/health/ready, the entrypoint is the launcher with flags its
own parser accepts, the checkpoint is mounted (never copied); compose's services, profiles, GPU, ports,
volumes and commands agree with the image."""
from __future__ import annotations

import fnmatch
from pathlib import Path
import re
import subprocess
import sys

import pytest
import yaml

from deploy_helpers import (
    COMPOSE,
    DOCKERFILE,
    GATEWAY_MODULE,
    LAUNCHER_MODULE,
    REPO_ROOT,
    gateway_args,
    launcher_args,
    parse_dockerfile,
    requirement_pins,
    SERVE_REQUIREMENTS,
    split_module_command,
    stage,
)
from internvl_serve.serving import triton_install

CHECKPOINT = "/models/InternVL-Chat-V1-1"
UID = "10001"


def server_command() -> list[str]:
    s = stage("server")
    return s.last("ENTRYPOINT").json_args() + s.last("CMD").json_args()


def test_stages_and_pinned_bases():
    stages = parse_dockerfile()
    assert [s.name for s in stages] == ["loadtest", "server"]  # the server is the default (last) target
    python = re.fullmatch(r"python:(3\.\d+)-slim-bookworm", stages[-1].base)
    assert python, f"{stages[-1].base}: the server runs on an official Python image"
    # the image's Python is the one the tests run here (tests/install checks that its pins resolve)
    assert python.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert stages[0].base == stages[-1].base
    for s in stages:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", s.base), f"{s.base}: pin a tag"
        assert not s.base.endswith(":latest")


def test_copy_sources_exist_and_are_in_the_context():
    ignore = [line.strip().rstrip("/") for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert "checkpoints" in ignore and ".venv" in ignore
    copied = []
    for s in parse_dockerfile():
        for instruction in s.all("COPY"):
            parts = [p for p in instruction.args.split() if not p.startswith("--")]
            assert len(parts) >= 2, instruction
            for source in parts[:-1]:
                assert (REPO_ROOT / source).exists(), f"COPY {source} (Dockerfile line {instruction.line}): no such path"
                assert not any(fnmatch.fnmatch(source.rstrip("/"), p) for p in ignore), f"{source} is dockerignored"
                copied.append(source)
    assert {"requirements.txt", "requirements-serve.txt", "internvl_serve", "model_repository", "client", "gateway"} <= set(copied)
    assert not any("checkpoint" in c for c in copied)  # mounted at run time, never baked in


def test_no_version_pins_besides_requirements_txt():
    text = "\n".join(i.args for s in parse_dockerfile() for i in s.all("RUN"))
    assert not re.search(r"[A-Za-z0-9_\]-]==\d", text), "versions belong in requirements*.txt"
    assert "--index-url" not in text and "download.pytorch.org" not in text  # one index: the one tests/install checks
    pins = requirement_pins()
    for name in stage("loadtest").args().get("LOADTEST_PACKAGES", "").split():
        assert name.lower() in pins, f"LOADTEST_PACKAGES: {name} is not in requirements.txt"


def _run_dockerfile_lines(tmp_path, stage_name: str, starts: tuple[str, ...], output: str) -> dict[str, str]:
    """Run the RUN instruction's own shell segments (those starting with `starts`) on copies of the
    requirements files, with the stage's ARG values; returns the pins of the requirements file it writes."""
    s = stage(stage_name)
    run = next(i for i in s.all("RUN") if "requirements" in i.args)
    segments = [seg.strip() for seg in run.args.split(";")]
    kept = [seg.replace("/tmp/", f"{tmp_path}/") for seg in segments if seg.startswith(starts)]
    assert len(kept) == len(starts), f"expected {starts} in {run.args}"
    for name in ("requirements.txt", "requirements-serve.txt"):
        (tmp_path / name).write_text((REPO_ROOT / name).read_text())
    env = {"PATH": "/usr/bin:/bin", **s.args()}
    subprocess.run(["bash", "-euc", "; ".join(kept)], cwd=tmp_path, env=env, check=True, timeout=30)
    return requirement_pins(tmp_path / output)


def test_server_installs_requirements_serve_as_it_is():
    s = stage("server")
    run = next(i for i in s.all("RUN") if "requirements" in i.args)
    assert "python -m pip install -r requirements-serve.txt;" in run.args
    assert any(i.args.split() == ["requirements-serve.txt", "./"] for i in s.all("COPY"))
    serve, dev = requirement_pins(SERVE_REQUIREMENTS), requirement_pins()
    assert "-r requirements-serve.txt" in (REPO_ROOT / "requirements.txt").read_text().splitlines()
    assert serve.items() <= dev.items()  # the image's pins are the tests' pins, by construction
    assert serve["numpy"].split(".")[0] == "1"  # numpy<2 for the Python backend's stub
    assert "nvidia-pytriton" in serve  # the tests' Triton 2.51, not another one
    for needed in ("torch", "triton", "transformers", "safetensors", "sentencepiece", "pillow", "decord", "tqdm",
                   "tritonclient", "fastapi", "uvicorn"):
        assert needed in serve, f"{needed} is not installed in the image"
    for dev_only in ("pytest", "pytest-timeout", "locust", "matplotlib", "openai"):
        assert dev_only in dev and dev_only not in serve, dev_only
    assert "torch.version.cuda" in run.args  # the build fails on a CPU torch


def test_server_prepares_the_wheels_backend_where_the_launcher_looks():
    s = stage("server")
    run = next(i for i in s.all("RUN") if "find_triton" in i.args)
    cache = triton_install._default_cache()
    relative = cache.relative_to(sys.prefix) if cache.is_relative_to(sys.prefix) else Path("var/internvl-serve")
    assert f"chown -R {UID}:{UID} /usr/local/{relative}" in run.args  # writable for the server's user
    assert run.line < s.last("USER").line
    assert "compute" in " ".join(e.args for e in s.all("ENV")).split("NVIDIA_DRIVER_CAPABILITIES=")[1].split()[0]


def test_loadtest_installs_requirements_pins(tmp_path):
    installed = _run_dockerfile_lines(tmp_path, "loadtest", ("pattern=", "grep "), "requirements.loadtest.txt")
    pins = requirement_pins()
    assert {"locust", "tritonclient", "numpy", "pillow"} <= set(installed)
    assert "torch" not in installed
    assert all(pins[name] == version for name, version in installed.items())


@pytest.mark.parametrize("stage_name", ["loadtest", "server"])
def test_non_root_user(stage_name):
    s = stage(stage_name)
    user = s.last("USER")
    assert user is not None and user.args.split(":")[0] not in ("0", "root")
    assert user.args.split(":")[0] == UID
    assert any(f"useradd --uid {UID}" in i.args for i in s.all("RUN"))
    assert user.line > max(i.line for i in s.all("RUN"))  # nothing runs as root after it
    assert user.line < s.last("ENTRYPOINT").line


def test_entrypoint_is_the_launcher_with_valid_flags():
    args = launcher_args(split_module_command(server_command(), LAUNCHER_MODULE))
    assert args.tritonserver is None and args.backend_directory is None  # the wheel's server, as in the tests
    assert str(args.log_file) == "/dev/stdout"  # the container's log (tests/deploy/test_container_log.py)
    assert args.host == "0.0.0.0"
    assert str(args.checkpoint) == CHECKPOINT
    s = stage("server")
    workdir = s.last("WORKDIR").args
    assert str(args.model_repository) == f"{workdir}/model_repository"
    assert any(i.args.split()[-1] == "./model_repository" for i in s.all("COPY"))
    assert f"PYTHONPATH={workdir}" in s.last("ENV").args or any(f"PYTHONPATH={workdir}" in e.args for e in s.all("ENV"))
    exposed = {int(p) for e in s.all("EXPOSE") for p in e.args.split()}
    assert {args.http_port, args.grpc_port, args.metrics_port, 9000} <= exposed


def test_healthcheck_on_triton_readiness():
    s = stage("server")
    health = s.last("HEALTHCHECK").args
    args = launcher_args(split_module_command(server_command(), LAUNCHER_MODULE))
    assert f"http://127.0.0.1:{args.http_port}/v2/health/ready" in health
    start_period = int(re.search(r"--start-period=(\d+)s", health).group(1))
    assert start_period >= 600  # the full model loads for minutes


# ---- compose ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_profiles(compose):
    services = compose["services"]
    assert "profiles" not in services["triton"]  # always up
    assert services["gateway"]["profiles"] == ["gateway"]
    assert services["locust"]["profiles"] == ["load"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    targets = {s.name for s in parse_dockerfile()}
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
        if "build" in service:
            build = service["build"]
            assert (COMPOSE.parent / build["context"]).resolve() == REPO_ROOT
            assert (REPO_ROOT / build["dockerfile"]).resolve() == DOCKERFILE
            assert build["target"] in targets


def test_compose_triton_service(compose):
    triton = compose["services"]["triton"]
    entrypoint = stage("server").last("ENTRYPOINT").json_args()
    args = launcher_args(split_module_command(entrypoint + triton["command"], LAUNCHER_MODULE))
    assert triton["command"] == stage("server").last("CMD").json_args()  # the image's defaults, spelled out
    published = {int(p.split(":")[1]) for p in triton["ports"]}
    assert {args.http_port, args.grpc_port, args.metrics_port} == published
    volume = triton["volumes"][0]
    assert volume["target"] == str(args.checkpoint) and volume["read_only"] is True
    assert "INTERNVL_CHECKPOINT" in volume["source"]
    gpu = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["count"] == 1 and gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    assert triton["shm_size"]
    assert f"127.0.0.1:{args.http_port}/v2/health/ready" in " ".join(triton["healthcheck"]["test"])


def test_compose_gateway_and_load_services(compose):
    services = compose["services"]
    launcher = launcher_args(split_module_command(server_command(), LAUNCHER_MODULE))
    gateway = services["gateway"]
    args = gateway_args(split_module_command(gateway["entrypoint"] + gateway["command"], GATEWAY_MODULE))
    assert args.triton == f"triton:{launcher.grpc_port}" and args.host == "0.0.0.0"
    assert f"{args.port}:{args.port}" in gateway["ports"]
    assert gateway["depends_on"]["triton"]["condition"] == "service_healthy"
    locust = services["locust"]
    assert locust["command"][locust["command"].index("--host") + 1] == f"grpc://triton:{launcher.grpc_port}"
    assert (REPO_ROOT / "loadtest" / "locustfile.py").is_file()
    assert stage("loadtest").last("ENTRYPOINT").json_args()[-1] == "/opt/internvl/loadtest/locustfile.py"


def test_compose_monitoring_files(compose):
    services = compose["services"]
    launcher = launcher_args(split_module_command(server_command(), LAUNCHER_MODULE))
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
    prometheus = yaml.safe_load((COMPOSE.parent / "prometheus" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"triton:{launcher.metrics_port}"]
    datasources = yaml.safe_load((COMPOSE.parent / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasources["datasources"][0]["uid"] == "prometheus"
    assert datasources["datasources"][0]["url"].startswith("http://prometheus:9090")
