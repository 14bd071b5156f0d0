"""The committed stubs in runtime/pb/ are what proto/generate.py makes from proto/*.proto,
and the check that says so fails when they are not."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATE = REPO_ROOT / "proto" / "generate.py"
OUT_DIR = REPO_ROOT / "runtime" / "pb"


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GENERATE), "--check", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def _pinned_version() -> str:
    for line in GENERATE.read_text().splitlines():
        if line.startswith("GRPC_TOOLS_VERSION = "):
            return line.split('"')[1]
    raise AssertionError("GRPC_TOOLS_VERSION not found in proto/generate.py")


def test_committed_stubs_are_fresh() -> None:
    result = _check()
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_on_a_proto_edited_without_regenerating(tmp_path: Path) -> None:
    protos = tmp_path / "proto"
    shutil.copytree(REPO_ROOT / "proto", protos, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    source = protos / "tandem_worker.proto"
    text = source.read_text()
    assert "message HealthRequest {}" in text
    edited = text.replace("message HealthRequest {}", "message HealthRequest {\n  bool verbose = 1;\n}")
    source.write_text(edited)
    result = _check("--proto-dir", str(protos))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "tandem_worker_pb2.py" in result.stderr


def test_check_fails_on_a_new_proto_without_stubs(tmp_path: Path) -> None:
    protos = tmp_path / "proto"
    shutil.copytree(REPO_ROOT / "proto", protos, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (protos / "extra_thing.proto").write_text('syntax = "proto3";\npackage tandem.extra;\nmessage X {}\n')
    result = _check("--proto-dir", str(protos))
    assert result.returncode == 1
    assert "extra_thing_pb2.py: missing" in result.stderr


def test_check_fails_on_a_hand_edited_stub(tmp_path: Path) -> None:
    if importlib.metadata.version("grpcio-tools") != _pinned_version():
        pytest.skip(f"a byte-for-byte check needs grpcio-tools=={_pinned_version()}")
    out = tmp_path / "pb"
    shutil.copytree(OUT_DIR, out, ignore=shutil.ignore_patterns("__pycache__"))
    stub = out / "tandem_worker_pb2_grpc.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    result = _check("--out-dir", str(out))
    assert result.returncode == 1
    assert "tandem_worker_pb2_grpc.py: differs" in result.stderr
