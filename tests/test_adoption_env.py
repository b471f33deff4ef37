"""trajstore inside the environments the field works in: an MTT-family checkout on sys.path, and an
install without the `[distill]` extras."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import random_walk, write_store

HOSTILE = ("distill", "cli", "utils", "networks")
TRAJSTORE = Path(sys.executable).with_name("trajstore")


@pytest.fixture
def checkout(tmp_path):
    """A directory like an MTT checkout whose own distill.py, cli.py, utils.py and networks.py explode
    when imported."""
    for name in HOSTILE:
        (tmp_path / f"{name}.py").write_text(f"raise RuntimeError('the checkout\\'s {name}.py was imported')\n")
    return tmp_path


def run(args, cwd, **kwargs):
    env = {**os.environ, "PYTHONPATH": "."}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, **kwargs)


def test_cli_works_inside_a_checkout(checkout):
    for args in ([str(TRAJSTORE), "--help"], [sys.executable, "-m", "trajstore", "--help"]):
        r = run(args, checkout)
        assert r.returncode == 0, r.stderr
        assert "distill" in r.stdout and "was imported" not in r.stderr
    r = run([str(TRAJSTORE), "evaluate", "--random", "--ipc", "1", "--dataset", "digits", "--num-nets", "1",
             "--epochs", "2", "--quiet"], checkout)
    assert r.returncode == 0, r.stderr
    assert "random 1 images per class of digits: test accuracy" in r.stdout


def test_python_api_works_inside_a_checkout(checkout):
    write_store(checkout / "e.ctraj", [random_walk(num_timesteps=6, seed=s) for s in range(2)], waypoints=(2,))
    script = """
import json, sys
import trajstore
from trajstore.distill.evaluate import evaluate_random
from trajstore.distill.networks import build
store = trajstore.open("e.ctraj")
flat = store[1].at(2.5, flat=True)
net = build("ConvNet", 1, 10, (8, 8))
acc = evaluate_random("digits", ipc=1, num_nets=1, epochs=1, progress=False)
hostile = [m for m in ("distill", "cli", "utils", "networks") if m in sys.modules]
print(json.dumps({"experts": len(store), "numel": flat.numel(), "acc": acc.mean, "hostile": hostile,
                  "cwd_first": sys.path[0] in ("", ".")}))
"""
    r = run([sys.executable, "-c", script], checkout)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["experts"] == 2 and out["numel"] == 8 * 27 + 8 + 4 * 32 + 4
    assert 0 <= out["acc"] <= 1 and out["hostile"] == [] and out["cwd_first"]


@pytest.mark.parametrize("argv", [["--help"], ["experts", "--help"]])  # experts shows train_experts' defaults
def test_help_does_not_import_torch(tmp_path, argv):
    script = f"""
import sys
from trajstore.cli.main import cli
try:
    cli({argv!r}, prog_name="trajstore")
except SystemExit as exc:
    assert exc.code == 0
heavy = [m for m in ("torch", "numpy", "zarr", "safetensors", "matplotlib", "tqdm") if m in sys.modules]
print("HEAVY", heavy)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "HEAVY []"


EXTRAS = ("torchvision", "kornia", "sklearn", "matplotlib", "tqdm")


def test_core_imports_and_runs_without_the_distill_extras(tmp_path, legacy_buffer):
    """With every [distill] extra made unimportable (sys.modules[name] = None), each core module imports,
    the CLI's --help works, and convert/export/pack run (with progress asked for: it is then silent)."""
    directory, _ = legacy_buffer
    script = f"""
import importlib, pkgutil, sys
for name in {EXTRAS!r}:
    sys.modules[name] = None
import trajstore
core = [m.name for m in pkgutil.walk_packages(trajstore.__path__, "trajstore.")]
for name in core:
    importlib.import_module(name)
import trajstore.cli.main
from trajstore.tools.convert import convert
from trajstore.tools.export import export_mtt
from trajstore.tools.inspect import summary, verify
from trajstore.archive import pack
convert({str(directory)!r}, "a.ctraj", waypoints=(3,), progress=True)
export_mtt("a.ctraj", "exported", progress=True)
pack({str(directory)!r}, "full.zarr", progress=True)
verify("a.ctraj")
print("CORE", len(core), sorted(n for n in {EXTRAS!r} if sys.modules.get(n) is not None))
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    count, loaded = r.stdout.strip().splitlines()[-1].split(" ", 2)[1:]
    assert int(count) > 20 and loaded == "[]"
    assert (tmp_path / "exported" / "replay_buffer_0.pt").is_file()


def test_legacy_sizes_need_no_private_torch_function(tmp_path, monkeypatch):
    """Sizes come from the public format: with torch.serialization._save gone (it may vanish in a torch
    release), they still equal what torch.save writes, for mixed dtypes, scalars and > 256 tensors."""
    import torch

    from trajstore.legacy import sizes

    obj = [[torch.randn(3, 5, dtype=torch.float64), torch.arange(7), torch.tensor(2.5)] for _ in range(100)]
    obj.append({"x": (torch.zeros(2, 2, dtype=torch.float16), torch.ones(4, dtype=torch.bool))})
    torch.save(obj, tmp_path / "mixed.pt")
    sizes._fixed_records()  # read off one real save before the private function disappears
    monkeypatch.delattr(torch.serialization, "_save", raising=False)
    assert sizes.torch_save_nbytes(obj, "mixed") == (tmp_path / "mixed.pt").stat().st_size
    spec = [[sizes.TensorSpec((3, 5), torch.float64), sizes.TensorSpec((7,), torch.int64),
             sizes.TensorSpec((), torch.float32)] for _ in range(100)]
    spec.append({"x": (sizes.TensorSpec((2, 2), torch.float16), sizes.TensorSpec((4,), torch.bool))})
    assert sizes.torch_save_nbytes(spec, "mixed") == (tmp_path / "mixed.pt").stat().st_size
