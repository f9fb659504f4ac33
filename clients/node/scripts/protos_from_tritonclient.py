"""Write Triton's grpc_service.proto and model_config.proto from the descriptors compiled into the
installed tritonclient wheel (tritonclient.grpc.service_pb2 / model_config_pb2), which ships no .proto
files. The output is the same schema as the wheel's (field numbers, names, types, streaming), so the
Node client speaks exactly what the Python client speaks; the documentation comments of the originals
are not in the descriptors. The licence header of the originals (triton-inference-server/common,
protobuf/, BSD-3-Clause) is kept at the top of each file.

    python clients/node/scripts/protos_from_tritonclient.py clients/node/proto
"""
from __future__ import annotations

import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

import tritonclient
from tritonclient.grpc import model_config_pb2, service_pb2

try:
    from importlib.metadata import version
    TRITONCLIENT_VERSION = version("tritonclient")
except Exception:  # pragma: no cover
    TRITONCLIENT_VERSION = "unknown"

BSD3 = """\
// Copyright {years}, NVIDIA CORPORATION & AFFILIATES. All rights reserved.
//
// Redistribution and use in source and binary forms, with or without
// modification, are permitted provided that the following conditions
// are met:
//  * Redistributions of source code must retain the above copyright
//    notice, this list of conditions and the following disclaimer.
//  * Redistributions in binary form must reproduce the above copyright
//    notice, this list of conditions and the following disclaimer in the
//    documentation and/or other materials provided with the distribution.
//  * Neither the name of NVIDIA CORPORATION nor the names of its
//    contributors may be used to endorse or promote products derived
//    from this software without specific prior written permission.
//
// THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS ``AS IS'' AND ANY
// EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
// IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR
// PURPOSE ARE DISCLAIMED.  IN NO EVENT SHALL THE COPYRIGHT OWNER OR
// CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
// EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
// PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR
// PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY
// OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT
// (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
// OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
{extra}"""

HEADERS = {
    # years and extra lines as in the originals' headers
    "grpc_service.proto": BSD3.format(years="2020-2023", extra=""),
    "model_config.proto": BSD3.format(years="2018-2023", extra="//\n// Copyright (c) 2018, TensorFlow Authors. All rights reserved.\n"),
}

SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: "double", FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64", FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32", FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_FIXED32: "fixed32", FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_UINT32: "uint32", FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    FieldDescriptor.TYPE_SFIXED64: "sfixed64", FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
}


def type_name(field: descriptor_pb2.FieldDescriptorProto, package: str) -> str:
    if field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_ENUM):
        name = field.type_name.lstrip(".")
        return name[len(package) + 1:] if name.startswith(package + ".") else "." + name
    return SCALARS[field.type]


def write_enum(enum: descriptor_pb2.EnumDescriptorProto, indent: str, out: list[str]) -> None:
    out.append(f"{indent}enum {enum.name} {{")
    for value in enum.value:
        out.append(f"{indent}  {value.name} = {value.number};")
    out.append(f"{indent}}}")


def write_message(msg: descriptor_pb2.DescriptorProto, indent: str, package: str, out: list[str]) -> None:
    maps = {n.name: n for n in msg.nested_type if n.options.map_entry}
    out.append(f"{indent}message {msg.name} {{")
    for enum in msg.enum_type:
        write_enum(enum, indent + "  ", out)
    for nested in msg.nested_type:
        if not nested.options.map_entry:
            write_message(nested, indent + "  ", package, out)
    real_oneofs = {}
    for field in msg.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            real_oneofs.setdefault(field.oneof_index, []).append(field)
    done_oneofs = set()
    for field in msg.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            index = field.oneof_index
            if index in done_oneofs:
                continue
            done_oneofs.add(index)
            out.append(f"{indent}  oneof {msg.oneof_decl[index].name} {{")
            for f in real_oneofs[index]:
                out.append(f"{indent}    {type_name(f, package)} {f.name} = {f.number};")
            out.append(f"{indent}  }}")
            continue
        entry_name = field.type_name.rsplit(".", 1)[-1]
        if field.label == FieldDescriptor.LABEL_REPEATED and entry_name in maps and field.type == FieldDescriptor.TYPE_MESSAGE:
            key, value = maps[entry_name].field
            out.append(f"{indent}  map<{type_name(key, package)}, {type_name(value, package)}> {field.name} = {field.number};")
            continue
        label = "repeated " if field.label == FieldDescriptor.LABEL_REPEATED else ("optional " if field.proto3_optional else "")
        out.append(f"{indent}  {label}{type_name(field, package)} {field.name} = {field.number};")
    out.append(f"{indent}}}")


def render(module) -> str:
    fd = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fd)
    out = [HEADERS[fd.name].rstrip("\n"), "",
           f"// Generated from the descriptors of tritonclient {TRITONCLIENT_VERSION} ({Path(module.__file__).name})",
           "// by clients/node/scripts/protos_from_tritonclient.py: same schema, without the original comments.",
           "", f'syntax = "{fd.syntax or "proto2"}";', "", f"package {fd.package};", ""]
    for dep in fd.dependency:
        out.append(f'import "{dep}";')
    if fd.dependency:
        out.append("")
    for service in fd.service:
        out.append(f"service {service.name} {{")
        for m in service.method:
            cs = "stream " if m.client_streaming else ""
            ss = "stream " if m.server_streaming else ""
            out.append(f"  rpc {m.name}({cs}{type_name_of(m.input_type, fd.package)}) returns ({ss}{type_name_of(m.output_type, fd.package)}) {{}}")
        out.append("}")
        out.append("")
    for enum in fd.enum_type:
        write_enum(enum, "", out)
        out.append("")
    for msg in fd.message_type:
        write_message(msg, "", fd.package, out)
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def type_name_of(full: str, package: str) -> str:
    name = full.lstrip(".")
    return name[len(package) + 1:] if name.startswith(package + ".") else "." + name


def main(argv: list[str]) -> int:
    target = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1] / "proto")
    target.mkdir(parents=True, exist_ok=True)
    for module in (model_config_pb2, service_pb2):
        fd_name = module.DESCRIPTOR.name
        (target / fd_name).write_text(render(module), encoding="utf-8")
        print(f"wrote {target / fd_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
