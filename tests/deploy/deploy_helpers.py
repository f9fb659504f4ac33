"""Static readers of the deployment files: a small Dockerfile parser (stages, instructions, JSON-form
ENTRYPOINT/CMD), the pins of requirements.txt and requirements-serve.txt, the YAML documents of deploy/k8s, and the launcher's and the
gateway's own argument parsers (so every command line in docker/ and deploy/ is checked by the code
that will read it)."""
from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
SERVE_REQUIREMENTS = REPO_ROOT / "requirements-serve.txt"  # what the image installs
COMPOSE = REPO_ROOT / "docker" / "compose.yaml"
K8S = REPO_ROOT / "deploy" / "k8s"
ADAPTER_VALUES = REPO_ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "internvl.json"
LAUNCHER_MODULE = ["python3", "-m", "internvl_serve.serving.launcher"]
GATEWAY_MODULE = ["python3", "-m", "internvl_gateway"]


@dataclass
class Instruction:
    name: str  # upper case
    args: str  # the rest, continuation lines joined
    line: int

    def json_args(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction | None:
        found = self.all(name)
        return found[-1] if found else None

    def args(self) -> dict[str, str]:
        """ARG defaults of the stage."""
        out = {}
        for i in self.all("ARG"):
            key, _, value = i.args.partition("=")
            out[key.strip()] = shlex.split(value)[0] if value.strip() else ""
        return out


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    """Stages in order. Comments and blank lines dropped; `\\` continuations joined (comment lines inside a
    continuation are skipped, as Docker does)."""
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = pending + line, ""
        name, _, args = text.partition(" ")
        instruction = Instruction(name.upper(), args.strip(), start)
        if instruction.name == "FROM":
            parts = instruction.args.split()
            stages.append(Stage(base=parts[0], name=parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None))
        else:
            assert stages, f"{path}:{start}: instruction before FROM"
            stages[-1].instructions.append(instruction)
    assert not pending, f"{path}: ends inside a continuation"
    return stages


def stage(name: str) -> Stage:
    for s in parse_dockerfile():
        if s.name == name:
            return s
    raise AssertionError(f"no stage {name!r} in {DOCKERFILE}")


def requirement_pins(path: Path = REPO_ROOT / "requirements.txt") -> dict[str, str]:
    """{name (extras dropped, lower case): version} of the `name==version` lines, following `-r FILE`."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            pins.update(requirement_pins(path.parent / line[3:].strip()))
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        assert match, f"{path.name}: {line!r} is not pinned with =="
        pins[match.group(1).lower()] = match.group(3)
    return pins


def yaml_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, for the resources the kustomization lists."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = {}
    for resource in kustomization["resources"]:
        for doc in yaml_documents(K8S / resource):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def launcher_args(argv: list[str]):
    """The launcher's own parser on argv (raises SystemExit on an unknown flag)."""
    from internvl_serve.serving.launcher import parse_args

    return parse_args(argv)


def gateway_args(argv: list[str]):
    try:
        from internvl_gateway.__main__ import parse_args
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT / "gateway"))
        from internvl_gateway.__main__ import parse_args
    return parse_args(argv)


def split_module_command(command: list[str], module: list[str]) -> list[str]:
    """The arguments after `python3 -m <module>`."""
    assert command[:len(module)] == module, f"{command} does not start with {module}"
    return command[len(module):]
