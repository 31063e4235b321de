"""The protocol: committed stubs match the .proto, every request field is documented, and the core's option
names (which `InvalidRequest.field` carries into status messages) are the request's field names."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from tuneavideo.v1 import tuneavideo_pb2 as pb2

from server.generate import InvalidRequest

grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the stubs")
from grpc_tools import protoc  # noqa: E402

PROTOS = Path(__file__).resolve().parents[1] / "protos"
PROTO = "tuneavideo/v1/tuneavideo.proto"
STUBS = ("tuneavideo_pb2.py", "tuneavideo_pb2.pyi", "tuneavideo_pb2_grpc.py")
# Lines that only stamp the generator's version: a newer grpcio-tools may change them, nothing else.
VERSION_STAMPS = [
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(.*?^\)$", re.M | re.S),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
]


def run_protoc(*args: str) -> None:
    include = str(Path(protoc.__file__).parent / "_proto")
    assert protoc.main(["protoc", f"-I{PROTOS}", f"-I{include}", *args, str(PROTOS / PROTO)]) == 0


def without_version_stamps(text: str) -> str:
    for stamp in VERSION_STAMPS:
        text = stamp.sub("", text)
    return text


def test_committed_stubs_match_the_proto(tmp_path):
    run_protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    for name in STUBS:
        fresh = (tmp_path / "tuneavideo" / "v1" / name).read_text()
        committed = (PROTOS / "tuneavideo" / "v1" / name).read_text()
        assert without_version_stamps(fresh) == without_version_stamps(committed), (
            f"{name} is out of date: regenerate the stubs (protos/README.md)")


def test_every_request_and_model_field_is_documented(tmp_path):
    run_protoc(f"--descriptor_set_out={tmp_path / 'set.pb'}", "--include_source_info")
    files = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.pb").read_bytes())
    proto = files.file[0]
    comments = {tuple(loc.path): loc.leading_comments for loc in proto.source_code_info.location}
    for index, message in enumerate(proto.message_type):
        if message.name not in ("GenerateRequest", "GetModelRequest"):
            continue
        for number, field in enumerate(message.field):
            assert comments.get((4, index, 2, number), "").strip(), f"{message.name}.{field.name} has no comment"


def test_core_option_names_are_request_field_names():
    fields = set(pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
    source = Path(inspect.getsourcefile(InvalidRequest)).read_text()
    named = set(re.findall(r'InvalidRequest\(\s*"(\w+)"', source)) | {"prompt", "negative_prompt"}
    assert named and named <= fields, named - fields
