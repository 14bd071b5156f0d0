"""GPU tests: every test here carries the ``gpu`` marker and is skipped where CUDA is absent. Each
module leaves the device as it found it: what this process's allocator cached is given back when
the module ends (later modules' processes size their KV caches from the device's free memory:
after the kernel tests this process held 102.5 GiB cached, and test_gpu_memory's child got a
16.7 GiB cache where its share leaves 27.0 GiB)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # kernel_cases


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def _give_the_allocator_cache_back() -> Iterator[None]:
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()  # tensors only a reference cycle keeps
        torch.cuda.empty_cache()
