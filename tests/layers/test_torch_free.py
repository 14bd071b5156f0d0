"""The light processes stay light: importing the router's and the planner's modules (and the
shared layers under them) loads neither torch nor the engine nor the KV transports. Checked in a
fresh interpreter, module by module as they exist in the checkout."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Packages every module of which must import without torch: the router and the planner (their
# processes), and the floors they stand on.
TORCH_FREE = ("protocol", "text", "runtime", "router", "planner")
HEAVY = ("torch", "engine", "kv_transfer", "transformers", "triton")


def modules() -> list[str]:
    names = list(TORCH_FREE)
    for package in TORCH_FREE:
        path = REPO_ROOT / package
        names += [info.name for info in pkgutil.walk_packages([str(path)], f"{package}.")
                  if not info.name.endswith("__main__")]
    return names


def imported_after(names: list[str]) -> dict[str, list[str]]:
    code = ("import importlib, json, sys\n"
            f"for name in {names!r}: importlib.import_module(name)\n"
            f"heavy = {HEAVY!r}\n"
            "print(json.dumps({h: sorted(m for m in sys.modules if m == h or m.startswith(h + '.'))[:5] "
            "for h in heavy}))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("entry", ["router.server", "planner"])
def test_entry_module_imports_no_torch(entry: str) -> None:
    """What ``python -m router`` (and the planner) imports before it does anything."""
    assert imported_after([entry]) == {h: [] for h in HEAVY}


def test_every_light_module_imports_no_torch() -> None:
    names = modules()
    assert "router.request_flow" in names and "runtime.discovery" in names  # the walk found the packages
    assert imported_after(names) == {h: [] for h in HEAVY}
