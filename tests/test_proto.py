"""The committed gRPC stubs are what the .proto generates (regenerate: see server/proto/README.md)."""

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("server/proto/ttt/v1/ttt.proto")
GENERATED = ("ttt_pb2.py", "ttt_pb2.pyi", "ttt_pb2_grpc.py")


def test_stubs_are_current(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    (tmp_path / PROTO.parent).mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    args = [
        "protoc",
        f"-I{tmp_path}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        str(tmp_path / PROTO),
    ]
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_text()
        committed = (ROOT / PROTO.parent / name).read_text()
        assert fresh == committed, f"{name} is stale: regenerate the stubs (server/proto/README.md)"


def test_every_setting_has_its_proto_field():
    """ttt.config.SCHEMA is the one schema: each session setting is one field there plus one proto field."""
    from server.proto.ttt.v1 import ttt_pb2 as pb
    from ttt.config import SCHEMA

    messages = {"fast": pb.FastWeightSettings, "ingest": pb.IngestSettings, "recall": pb.RecallSettings}
    for section, message in messages.items():
        assert set(message.DESCRIPTOR.fields_by_name) == {s.name for s in SCHEMA if s.section == section}, section
    assert "memory" in pb.SessionSettings.DESCRIPTOR.fields_by_name
