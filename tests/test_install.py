"""The install is reproducible and the script folders shadow nothing.

- The direct dependencies installed are the versions of ``requirements-lock.txt`` (what
  ``scripts/setup.sh`` installs and CI tests).
- No module under ``benchmarks/``, ``scripts/`` or ``notebooks/`` is named after an importable
  top-level module (``python benchmarks/X.py`` puts ``benchmarks/`` first on ``sys.path``: a
  ``benchmarks/kernels.py`` hid Hugging Face's ``kernels`` package from transformers 5.25).
- Every benchmark and script module imports, with its own folder first on the path, as
  ``python benchmarks/X.py`` would run it (its ``main`` is not called).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
SCRIPT_DIRS = ("benchmarks", "scripts", "notebooks")
EXTRAS = ("rl", "sweep", "report", "test")  # the extras scripts/setup.sh installs


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            assert m, f"{LOCK.name}: not a 'name==version' pin: {line!r}"
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _direct_dependencies() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra] if not r.startswith("lede[")]
    return reqs


def test_lock_satisfies_the_ranges_of_pyproject():
    pins = _locked()
    for req in _direct_dependencies():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but not in {LOCK.name}: run bash scripts/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside pyproject.toml's {req}: run bash scripts/lock.sh")


def test_installed_direct_dependencies_are_the_locked_versions():
    pins = _locked()
    differ = []
    for req in _direct_dependencies():
        name = canonicalize_name(req.name)
        try:
            have = Version(md.version(req.name)).public
        except md.PackageNotFoundError:
            differ.append(f"{req.name}: not installed, locked {pins.get(name)}")
            continue
        if name in pins and have != Version(pins[name]).public:
            differ.append(f"{req.name}: installed {have}, locked {pins[name]}")
    assert not differ, ("installed versions differ from requirements-lock.txt (install with bash scripts/setup.sh, "
                        "or refresh the lock with bash scripts/lock.sh and re-run the suite): " + "; ".join(differ))


def _top_level_names() -> set[str]:
    names = set(sys.stdlib_module_names) | set(md.packages_distributions())
    names |= {"lede_env", "agents", "tests"}
    return names


def _script_modules() -> list[Path]:
    out = []
    for d in SCRIPT_DIRS:
        for p in sorted((ROOT / d).iterdir()):
            if p.suffix == ".py" or (p.is_dir() and not p.name.startswith((".", "__"))):
                out.append(p)
    return out


@pytest.mark.parametrize("path", _script_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_script_shadows_an_importable_module(path):
    stem = path.stem if path.suffix == ".py" else path.name
    spec = importlib.util.find_spec(stem) if stem not in sys.stdlib_module_names else True
    taken = stem in _top_level_names() or spec is not None
    assert not taken, (f"{path.relative_to(ROOT)} has the name of the importable module {stem!r}: running a script "
                       f"from {path.parent.name}/ would hide it from every library that imports it; rename the file")


def test_every_benchmark_and_script_module_imports():
    """One process imports every module as ``python <folder>/<file>.py`` would see it (its folder
    first on ``sys.path``), without running its ``main``, then the transformers modules that import
    optional packages by top-level name."""
    files = [str(p) for d in ("benchmarks", "scripts") for p in sorted((ROOT / d).glob("*.py"))]
    code = (
        "import runpy, sys, os\n"
        "for f in sys.argv[1:]:\n"
        "    sys.path.insert(0, os.path.dirname(f))\n"
        "    try:\n"
        "        runpy.run_path(f, run_name='lede_import_check')\n"
        "    except BaseException as e:\n"
        "        raise SystemExit(f'{f}: {type(e).__name__}: {e}')\n"
        "    finally:\n"
        "        sys.path.pop(0)\n"
        "import transformers.integrations.hub_kernels, transformers.activations\n"
    )
    p = subprocess.run([sys.executable, "-c", code, *files], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
