"""The disk cache of dequantized GGUF weights (``engine.weight_cache``): a start that misses
converts and writes the file; the next one reads it, without dequantizing, and gets the same
tensors bit for bit; another model file or another conversion code is another file; with
``TANDEM_WEIGHT_CACHE=0``, or while another process holds the writer's lock, nothing is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engine import weight_cache
from engine.gguf_file import GGUFFile


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TANDEM_WEIGHT_CACHE", raising=False)
    return tmp_path / "cache" / "weights"


def test_written_once_then_read_without_dequantizing(smollm_path: Path, cache_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = GGUFFile(smollm_path)
    want = dict(weight_cache.iter_weights(gguf))  # a miss: gguf.iter_weights(), then written
    (written,) = cache_dir.glob("*.safetensors")
    assert written == weight_cache.cache_path(gguf)

    def no_dequantizing(self: GGUFFile) -> None:
        raise AssertionError("dequantized although the cache holds the weights")

    monkeypatch.setattr(GGUFFile, "iter_weights", no_dequantizing)
    got = dict(weight_cache.iter_weights(gguf))
    assert list(got) == list(want) and len(want) == 272
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)


def test_the_key_follows_the_file_and_the_conversion(smollm_path: Path, cache_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = GGUFFile(smollm_path)
    key = weight_cache.cache_path(gguf)
    edited = tmp_path / smollm_path.name
    shutil.copyfile(smollm_path, edited)
    with open(edited, "r+b") as f:  # one byte of the last tensor's data
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert weight_cache.cache_path(GGUFFile(edited)) != key
    other_code = tmp_path / "gguf_file.py"
    other_code.write_text("# another conversion\n")
    monkeypatch.setattr(weight_cache, "_CONVERSION_SOURCE", other_code)
    assert weight_cache.cache_path(gguf) != key


def test_nothing_written_when_off_or_another_process_writes(smollm_path: Path, cache_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    gguf = GGUFFile(smollm_path)
    monkeypatch.setenv("TANDEM_WEIGHT_CACHE", "0")
    assert sum(1 for _ in weight_cache.iter_weights(gguf)) == 272
    assert not cache_dir.exists()
    monkeypatch.delenv("TANDEM_WEIGHT_CACHE")
    cache_dir.mkdir(parents=True)
    with open(cache_dir / ".lock", "w") as lock:  # another process is writing the file
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert sum(1 for _ in weight_cache.iter_weights(gguf)) == 272
    assert not weight_cache.cache_path(gguf).exists()
