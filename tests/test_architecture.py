"""Layering rules the module map promises (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import apf_ray


def test_the_core_package_never_imports_ray_or_the_actors_layer():
    modules = [m.name for m in pkgutil.walk_packages(apf_ray.__path__, "apf_ray.")]
    assert "apf_ray.backends" in modules and "apf_ray.cli" in modules
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'actors')))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
