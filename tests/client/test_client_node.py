"""The Node client's vendored .proto files (no server): the same schema as the tritonclient wheel's
compiled descriptors, field by field, and regenerable from them; its --help and its --timeout (which
cancels the generation on the real server). (The rest of the client against a real server is in
test_client_e2e.py.)"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor as F
from tritonclient.grpc import model_config_pb2, service_pb2

from servermetrics import REQUESTS_RUNNING, parse_metric, read_metrics  # loadtest/ (tests/conftest.py)
from test_client_e2e import wait_for

NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
PROTO = NODE_CLIENT / "proto"
SCALARS = {F.TYPE_DOUBLE: "double", F.TYPE_FLOAT: "float", F.TYPE_INT64: "int64", F.TYPE_UINT64: "uint64",
           F.TYPE_INT32: "int32", F.TYPE_BOOL: "bool", F.TYPE_STRING: "string", F.TYPE_BYTES: "bytes",
           F.TYPE_UINT32: "uint32"}

# protobufjs (a dependency of @grpc/proto-loader) reads the .proto files as grpc-js will.
DUMP_JS = r"""
const pb = require('protobufjs');
const path = require('path');
const root = new pb.Root();
root.resolvePath = (origin, target) => path.join(process.argv[1], target);
root.loadSync('grpc_service.proto', { keepCase: true });
root.resolveAll();
const short = (t) => t.split('.').pop();
const out = {};
function walk(ns, prefix) {
  for (const n of ns.nestedArray || []) {
    const full = prefix + '.' + n.name;
    if (n instanceof pb.Type) {
      out[full] = Object.values(n.fields).map((f) =>
        [f.name, f.id, f.repeated ? 'rep' : '', f.map ? `map:${f.keyType}:${short(f.type)}` : short(f.type)].join(',')).sort();
    } else if (n instanceof pb.Enum) {
      out[full] = Object.entries(n.values).map(([k, v]) => `${k}=${v}`).sort();
    } else if (n instanceof pb.Service) {
      out[full] = Object.values(n.methods).map((m) =>
        [m.name, short(m.requestType), m.requestStream ? 's' : '', short(m.responseType), m.responseStream ? 's' : ''].join(',')).sort();
    }
    if (n.nestedArray) walk(n, full);
  }
}
walk(root.lookup('inference'), 'inference');
process.stdout.write(JSON.stringify(out));
"""


def _type(f):
    return SCALARS[f.type] if f.type in SCALARS else (f.message_type.name if f.message_type else f.enum_type.name)


def python_schema() -> dict:
    out = {}

    def walk(messages):
        for m in messages:
            if m.GetOptions().map_entry:
                continue
            rows = []
            for f in m.fields:
                if f.message_type and f.message_type.GetOptions().map_entry:
                    key, value = f.message_type.fields
                    rows.append(f"{f.name},{f.number},,map:{SCALARS[key.type]}:{_type(value)}")
                else:
                    rows.append(f"{f.name},{f.number},{'rep' if f.is_repeated else ''},{_type(f)}")
            out[m.full_name] = sorted(rows)
            for e in m.enum_types:
                out[e.full_name] = sorted(f"{v.name}={v.number}" for v in e.values)
            walk(m.nested_types)

    for module in (service_pb2, model_config_pb2):
        walk(module.DESCRIPTOR.message_types_by_name.values())
        for e in module.DESCRIPTOR.enum_types_by_name.values():
            out[e.full_name] = sorted(f"{v.name}={v.number}" for v in e.values)
        for s in module.DESCRIPTOR.services_by_name.values():
            out[s.full_name] = sorted(
                f"{m.name},{m.input_type.name},{'s' if m.client_streaming else ''},"
                f"{m.output_type.name},{'s' if m.server_streaming else ''}" for m in s.methods)
    return out


def test_vendored_protos_have_the_wheels_schema(node_client):
    run = subprocess.run(["node", "-e", DUMP_JS, str(PROTO)], cwd=node_client, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    node = json.loads(run.stdout)
    python = python_schema()
    assert sorted(node) == sorted(python)
    different = {k: (python[k], node[k]) for k in python if python[k] != node[k]}
    assert not different


def test_vendored_protos_are_regenerated_identically(tmp_path):
    run = subprocess.run([sys.executable, str(NODE_CLIENT / "scripts" / "protos_from_tritonclient.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for name in ("grpc_service.proto", "model_config.proto"):
        assert (tmp_path / name).read_text() == (PROTO / name).read_text(), f"{name}: regenerate it"


@pytest.mark.parametrize("name", ["grpc_service.proto", "model_config.proto"])
def test_vendored_protos_keep_the_licence_header(name):
    text = (PROTO / name).read_text()
    assert text.startswith("// Copyright ")
    assert "NVIDIA CORPORATION & AFFILIATES. All rights reserved." in text.splitlines()[0]
    assert "Redistribution and use in source and binary forms" in text
    assert "Neither the name of NVIDIA CORPORATION" in text


def test_help_prints_the_usage_to_stdout_and_exits_0(node_client):
    """Before: --help printed the usage to stderr and exited 2, like a usage error."""
    for flag in ("--help", "-h"):
        run = subprocess.run(["node", str(node_client / "chat.js"), flag], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("usage: node chat.js") and "--timeout SECONDS" in run.stdout
        assert run.stderr == ""
    bad = subprocess.run(["node", str(node_client / "chat.js"), "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr and "usage:" in bad.stderr


def test_timeout_cancels_the_generation_on_the_server(server, node_client):
    """--timeout ends the client's call AND the generation (before: the deadline ended the call but the
    llm step kept generating, Triton 2.51 not passing a cancellation on to a running step). Against
    tritonserver itself (triton_grpc_url): no gRPC guard that could cancel it for the client."""
    chat = ["node", str(node_client / "chat.js"), "--url", server.triton_grpc_url]
    warm = subprocess.run(chat + ["-q", "Hi", "--max-tokens", "1"], capture_output=True, text=True, timeout=300)
    assert warm.returncode == 0, warm.stderr  # the models are warm: the long chat is generating within 2 s
    # Greedy "Count to a million." on the tiny checkpoint runs past 1500 tokens (~7 s on 2 CPU cores).
    run = subprocess.run(chat + ["-q", "Count to a million.", "--max-tokens", "1500", "--timeout", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 4, run.stderr
    assert run.stdout  # it was streaming when the deadline came
    found = re.search(r"DEADLINE_EXCEEDED: no complete answer within --timeout 2 s; cancelled request (\S+) on "
                      r"the server", run.stderr)
    assert found, run.stderr
    request_id = found.group(1)
    pattern = re.compile(rf"request {re.escape(request_id)}#\d+ cancelled by the client")
    wait_for(server, f"the llm's abort of {request_id}",
             lambda: pattern.search(server.log_file.read_text(errors="replace")) is not None, timeout_s=120)
    wait_for(server, "internvl_requests_running 0",
             lambda: parse_metric(read_metrics(server.metrics_url), REQUESTS_RUNNING) == 0, timeout_s=120)
