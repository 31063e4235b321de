"""The protocol: committed stubs match the .proto, every request field is documented, and the core's option
names (which `InvalidRequest.field` carries into status messages) are the request's field names."""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from tools import find_tool
from tuneavideo.v1 import tuneavideo_pb2 as pb2

from server.generate import InvalidRequest

grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the stubs")
from grpc_tools import protoc  # noqa: E402

PROTOS = Path(__file__).resolve().parents[1] / "protos"
PROTO_FILES = ("tuneavideo/v1/tuneavideo.proto", "tuneavideo/v1/tuning.proto")
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
DOCUMENTED = ("GenerateRequest", "GetModelRequest", "CreateTuneJobRequest", "TuneSettings", "GetTuneJobRequest",
              "ListTuneJobsRequest", "CancelTuneJobRequest", "DeleteTuneJobRequest", "WatchTuneJobRequest",
              "DeleteModelRequest", "GetServerInfoRequest", "ListBasesRequest")
# Lines that only stamp the generator's version: a newer grpcio-tools may change them, nothing else.
VERSION_STAMPS = [
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(.*?^\)$", re.M | re.S),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
]


def run_protoc(*args: str) -> None:
    include = str(Path(protoc.__file__).parent / "_proto")
    assert protoc.main(["protoc", f"-I{PROTOS}", f"-I{include}", *args, *(str(PROTOS / f) for f in PROTO_FILES)]) == 0


def without_version_stamps(text: str) -> str:
    for stamp in VERSION_STAMPS:
        text = stamp.sub("", text)
    return text


def test_committed_stubs_match_the_proto(tmp_path):
    run_protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    for proto in PROTO_FILES:
        for suffix in STUB_SUFFIXES:
            name = proto.removesuffix(".proto") + suffix
            fresh, committed = (tmp_path / name).read_text(), (PROTOS / name).read_text()
            assert without_version_stamps(fresh) == without_version_stamps(committed), (
                f"{name} is out of date: regenerate the stubs (make protos)")


def test_every_request_and_model_field_is_documented(tmp_path):
    run_protoc(f"--descriptor_set_out={tmp_path / 'set.pb'}", "--include_source_info")
    files = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.pb").read_bytes())
    checked = set()
    for proto in files.file:
        comments = {tuple(loc.path): loc.leading_comments for loc in proto.source_code_info.location}
        for index, message in enumerate(proto.message_type):
            if message.name not in DOCUMENTED:
                continue
            checked.add(message.name)
            for number, field in enumerate(message.field):
                if field.type_name.endswith(".TuneSettings"):
                    continue  # a message documented field by field
                assert comments.get((4, index, 2, number), "").strip(), f"{message.name}.{field.name} has no comment"
    assert checked == set(DOCUMENTED)


@pytest.mark.needs_tool("buf")
def test_buf_lint_passes_with_the_rules_protos_buf_yaml_names():
    result = subprocess.run([find_tool("buf"), "lint"], cwd=PROTOS, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_option_names_are_request_field_names():
    fields = set(pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
    source = Path(inspect.getsourcefile(InvalidRequest)).read_text()
    named = set(re.findall(r'InvalidRequest\(\s*"(\w+)"', source)) | {"prompt", "negative_prompt"}
    assert named and named <= fields, named - fields
