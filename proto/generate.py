"""Generate the Python gRPC stubs in runtime/pb/ from the .proto files in proto/.

    python proto/generate.py            # regenerate runtime/pb/ (needs the pinned grpcio-tools)
    python proto/generate.py --check    # exit 1 when the committed stubs are stale

The stubs are committed, so installing tandem needs no code generator. They import as
``runtime.pb.<name>_pb2``: each .proto is compiled from a staging tree where it sits at
``runtime/pb/<name>.proto``, so protoc itself writes package-qualified imports and no
generated line is rewritten afterwards.

The generator is pinned (GRPC_TOOLS_VERSION): generated code carries the version of its
protoc, and a protobuf runtime older than that refuses to load it. grpcio-tools 1.80.0
embeds protoc 31.1, whose code loads under protobuf 6.31.1 and later, 7.x included; that
range holds both tritonclient[grpc] (protobuf < 7) and aetcd (protobuf < 8).

``--check`` regenerates into a temporary directory and compares. With the pinned
grpcio-tools it compares every file byte for byte; with another version it compares the
schema each committed ``*_pb2.py`` embeds (its serialized FileDescriptorProto) with a fresh
compile, which still catches any .proto edit that was not regenerated.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import shutil
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

GRPC_TOOLS_VERSION = "1.80.0"
PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
OUT_DIR = REPO_ROOT / "runtime" / "pb"
PACKAGE_PATH = Path("runtime") / "pb"  # where the stubs import from, as a path
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def installed_grpc_tools_version() -> str | None:
    try:
        return importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        return None


def proto_files(proto_dir: Path) -> list[Path]:
    return sorted(proto_dir.glob("*.proto"))


def generated_names(protos: list[Path]) -> list[str]:
    return sorted(p.stem + suffix for p in protos for suffix in GENERATED_SUFFIXES)


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # imported here: --check needs no generator to report it missing

    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    code = protoc.main(["grpc_tools.protoc", f"-I{include}", *args])
    if code != 0:
        raise RuntimeError(f"protoc failed (exit {code}) on: {' '.join(args)}")


def _stage(proto_dir: Path, work: Path) -> tuple[Path, list[str]]:
    """Copy the .proto files to work/src/runtime/pb/ and return (include root, their paths)."""
    src = work / "src"
    (src / PACKAGE_PATH).mkdir(parents=True)
    rel = []
    for proto in proto_files(proto_dir):
        shutil.copyfile(proto, src / PACKAGE_PATH / proto.name)
        rel.append((PACKAGE_PATH / proto.name).as_posix())
    if not rel:
        raise RuntimeError(f"no .proto files in {proto_dir}")
    return src, rel


def generate(proto_dir: Path, out_dir: Path) -> list[str]:
    """Compile every .proto in proto_dir into out_dir; return the generated file names."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src, rel = _stage(proto_dir, work)
        gen = work / "gen"
        gen.mkdir()
        _protoc([f"-I{src}", f"--python_out={gen}", f"--pyi_out={gen}", f"--grpc_python_out={gen}", *rel])
        out_dir.mkdir(parents=True, exist_ok=True)
        names = generated_names(proto_files(proto_dir))
        for name in names:
            shutil.copyfile(gen / PACKAGE_PATH / name, out_dir / name)
    return names


def descriptor_set(proto_dir: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """A fresh compile's FileDescriptorProtos (no source info), by file name."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src, rel = _stage(proto_dir, work)
        out = work / "set.pb"
        _protoc([f"-I{src}", f"--descriptor_set_out={out}", *rel])
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {f.name: f for f in fds.file}


def _schema(fd: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """fd without what protoc's Python generator leaves out of the code it writes (source
    info, derived json names), so a fresh compile and a generated module compare equal."""
    fd = descriptor_pb2.FileDescriptorProto.FromString(fd.SerializeToString())
    fd.ClearField("source_code_info")
    messages = list(fd.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in [*message.field, *message.extension]:
            field.ClearField("json_name")
    for field in fd.extension:
        field.ClearField("json_name")
    return fd


def embedded_descriptor(pb2_path: Path) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto a generated *_pb2.py registers, read without importing it
    (importing would register it in this process's descriptor pool)."""
    tree = ast.parse(pb2_path.read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "AddSerializedFile"):
            return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(node.args[0]))
    raise ValueError(f"{pb2_path}: no AddSerializedFile(...) call")


def stale_files(proto_dir: Path = PROTO_DIR, out_dir: Path = OUT_DIR) -> tuple[list[str], str]:
    """(problems, how compared): an empty list means the stubs in out_dir are fresh."""
    protos = proto_files(proto_dir)
    expected = generated_names(protos)
    present = sorted(p.name for p in out_dir.glob("*_pb2*") if p.name.endswith(GENERATED_SUFFIXES))
    problems = [f"{name}: missing" for name in expected if name not in present]
    problems += [f"{name}: generated from no .proto in {proto_dir}" for name in present
                 if name not in expected]
    version = installed_grpc_tools_version()
    if version == GRPC_TOOLS_VERSION:
        mode = f"byte for byte, grpcio-tools {version}"
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp)
            generate(proto_dir, fresh)
            for name in expected:
                if name in present and (fresh / name).read_bytes() != (out_dir / name).read_bytes():
                    problems.append(f"{name}: differs from a fresh generation")
    else:
        mode = (f"schema only: grpcio-tools {version} installed, stubs pinned to "
                f"{GRPC_TOOLS_VERSION}; install that for a byte-for-byte check")
        fresh_set = descriptor_set(proto_dir)
        for proto in protos:
            name = proto.stem + "_pb2.py"
            if name not in present:
                continue
            committed = embedded_descriptor(out_dir / name)
            if _schema(committed) != _schema(fresh_set[(PACKAGE_PATH / proto.name).as_posix()]):
                problems.append(f"{name}: its schema differs from {proto.name}")
    return problems, mode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are stale")
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    version = installed_grpc_tools_version()
    if args.check:
        if version is None:
            print("grpcio-tools is not installed: pip install grpcio-tools==" + GRPC_TOOLS_VERSION,
                  file=sys.stderr)
            return 2
        problems, mode = stale_files(args.proto_dir, args.out_dir)
        for problem in problems:
            print(f"stale: {problem}", file=sys.stderr)
        if problems:
            print("regenerate with: python proto/generate.py", file=sys.stderr)
            return 1
        print(f"stubs in {args.out_dir} are fresh (compared {mode})")
        return 0
    if version != GRPC_TOOLS_VERSION:
        print(f"stubs are generated with grpcio-tools=={GRPC_TOOLS_VERSION} (found {version}): "
              f"pip install grpcio-tools=={GRPC_TOOLS_VERSION}", file=sys.stderr)
        return 2
    names = generate(args.proto_dir, args.out_dir)
    for stale in args.out_dir.glob("*_pb2*"):
        if stale.name.endswith(GENERATED_SUFFIXES) and stale.name not in names:
            stale.unlink()
    print(f"generated {len(names)} files in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
