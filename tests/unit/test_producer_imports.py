"""The camera-station modules import without the worker's heavy dependencies."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "faust", "pyarrow", "duckdb", "onnxruntime")


@pytest.mark.parametrize("module", ["qcstream.streams.producer", "qcstream.streams.labels", "qcstream.streams.topics"])
def test_module_imports_without_heavy_dependencies(module):
    code = (
        f"import sys, {module}\n"
        f"loaded = [name for name in {HEAVY!r} if name in sys.modules]\n"
        "print(','.join(loaded))\n"
    )

    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "", f"{module} imported {completed.stdout.strip()}"
