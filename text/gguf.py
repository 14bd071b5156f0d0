"""A GGUF file's metadata (tokenizer, chat template, architecture keys), read with the ``gguf``
package only (numpy, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def open_reader(path: str | Path) -> Any:
    """A ``gguf.GGUFReader`` over the file (memory-mapped; parsing the header takes a while)."""
    import gguf

    return gguf.GGUFReader(str(path))


def metadata_of(reader: Any) -> dict[str, Any]:
    """Every metadata key of a reader but the file-format ones (``GGUF.*``), as Python values."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def read_metadata(path: str | Path) -> dict[str, Any]:
    return metadata_of(open_reader(path))
