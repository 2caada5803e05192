"""The documentation stays true: every config key documented, every example config loads,
docs/ refers to nothing outside the repository."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from kvbm.config import NON_CONFIG_VARIABLES, ManagerConfig, env_variables

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
CONFIGURATION = ROOT / "docs" / "configuration.md"
_SKIP_DIRS = {".git", ".venv", "build", "node_modules", ".kvbm", "__pycache__", ".mypy_cache",
              ".pytest_cache", ".ruff_cache", ".hypothesis"}


def fenced_blocks(text: str, lang: str) -> list[str]:
    """The bodies of the ```lang fenced blocks of a markdown text."""
    return re.findall(rf"^```{lang}[ \t]*\n(.*?)^```", text, flags=re.M | re.S)


def _no_kvbm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("KVBM_"):
            monkeypatch.delenv(var)


def test_every_config_key_is_documented():
    text = CONFIGURATION.read_text()
    fields = {var: ".".join(path) for var, (path, section, _) in env_variables(
        ManagerConfig).items() if not section}
    missing = [f"{key} ({var})" for var, key in fields.items() if f"`{var}`" not in text]
    assert not missing, f"docs/configuration.md does not document: {missing}"
    sections = {".".join(path) for path, section, _ in env_variables(ManagerConfig).values()
                if section}
    assert not [s for s in sections if f"[{s}]" not in text]


#: Misspellings configuration.md shows on purpose (the error they get).
_TYPO_EXAMPLES = {"KVBM_HOST_NUMBLOCKS"}


def test_configuration_names_no_variable_that_does_not_exist():
    known = set(env_variables(ManagerConfig)) | NON_CONFIG_VARIABLES | _TYPO_EXAMPLES
    named = set(re.findall(r"\bKVBM_[A-Z0-9_]*[A-Z0-9]", CONFIGURATION.read_text()))
    assert not sorted(named - known)


VLLM = ROOT / "docs" / "vllm.md"
#: vllm.md's configs are the connector's (no [device]: G1 is vLLM's); tested below.
_EXAMPLES = [(md, i, block) for md in [*DOCS, ROOT / "README.md"] if md != VLLM
             for i, block in enumerate(fenced_blocks(md.read_text(), "toml"))]


@pytest.mark.parametrize(("md", "i", "block"), _EXAMPLES,
                         ids=[f"{md.name}#{i}" for md, i, _ in _EXAMPLES])
def test_every_example_config_loads_and_prints(md, i, block, tmp_path, monkeypatch, capsys):
    from kvbm.cli import main

    _no_kvbm_env(monkeypatch)
    p = tmp_path / "kvbm.toml"
    p.write_text(block)
    assert main(["config", "--file", str(p)]) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert ManagerConfig.from_mapping(printed) == ManagerConfig.from_toml(p, env={})


def test_configuration_example_runs_without_cuda(tmp_path, monkeypatch):
    """The first example of configuration.md (TOML, then the Python that loads it) runs as
    written on any machine: nothing that needs CUDA, sizes that fit a laptop."""
    _no_kvbm_env(monkeypatch)
    text = CONFIGURATION.read_text()
    toml, code = fenced_blocks(text, "toml")[0], fenced_blocks(text, "python")[0]
    assert "pin_memory = true" not in toml
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kvbm.toml").write_text(toml)
    exec(compile(code, "docs/configuration.md", "exec"), {})


def test_vllm_example_configs_load_through_the_connector(tmp_path, monkeypatch):
    """vllm.md's TOML file (kvbm_config_file) and its `vllm serve` JSON load as the
    connector loads them, and the JSON is a valid KVTransferConfig."""
    pytest.importorskip("vllm")
    from vllm.config import KVTransferConfig

    from kvbm.integrations.vllm.config import EXTRA_KEYS, manager_config

    _no_kvbm_env(monkeypatch)
    text = VLLM.read_text()
    tomls = fenced_blocks(text, "toml")
    assert tomls
    for i, block in enumerate(tomls):
        p = tmp_path / f"kvbm{i}.toml"
        p.write_text(block)
        cfg = manager_config({"kvbm_config_file": str(p)})
        assert cfg.device is None and cfg.host is not None
    serve = re.findall(r"--kv-transfer-config '(.*?)'", text, flags=re.S)
    assert serve
    for js in serve:
        kv = KVTransferConfig(**json.loads(js))
        assert kv.kv_load_failure_policy == "recompute"
        assert manager_config(kv.kv_connector_extra_config).host is not None
    assert not [k for k in EXTRA_KEYS if f"`{k}`" not in text]


# -- self-contained ------------------------------------------------------------------------
_FORBIDDEN = [r"DESIGN(\.md| §)", r"CEILINGS", r"\.\./", r"/work/", r"/home/", r"/tmp/",
              r"\bshared/"]
#: Paths the docs name that are made at run time, not shipped.
_RUNTIME = {".kvbm/"}


def _repo_names() -> set[str]:
    names: set[str] = set()
    for _dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        names.update(filenames)
    return names


@pytest.mark.parametrize("md", [*DOCS, ROOT / "README.md"], ids=lambda p: p.name)
def test_docs_refer_to_nothing_outside_the_repository(md):
    text = md.read_text()
    bad = [m.group(0) for pat in _FORBIDDEN for m in re.finditer(pat, text)]
    assert not bad, f"{md.name} refers outside the repository: {bad}"
    names = _repo_names()
    missing = []
    for ref in re.findall(r"`([\w./-]+)`", text):
        if ref in _RUNTIME or ref.startswith("."):
            continue
        if "/" in ref and (ref.endswith("/") or "." in ref.rsplit("/", 1)[1]):
            # A path under one of our top-level folders must exist; one under another
            # project's (a cited data set's location in its repository) is not ours to check.
            if (ROOT / ref.split("/", 1)[0]).is_dir() and not (ROOT / ref).exists():
                missing.append(ref)
        elif re.fullmatch(r"[\w-]+\.(py|pyi|c|md|toml|txt|json|sh)", ref) and ref not in names:
            missing.append(ref)
    assert not missing, f"{md.name} names files the repository does not have: {missing}"


# -- metrics.md: the metric list an operator reads is the one kvbm exports ----------------------
METRICS = ROOT / "docs" / "metrics.md"
_METRIC_ROW = re.compile(r"^\| `(kvbm_\w+)` \| (\w+) \|([\w, ]*)\|", flags=re.M)


def _exposed(family) -> str:
    """The name Prometheus shows for a metric family (counters get ``_total``)."""
    return {"counter": f"{family.name}_total", "info": f"{family.name}_info"}.get(
        family.type, family.name)


def test_metrics_doc_lists_exactly_the_exported_metrics(tmp_path):
    pytest.importorskip("prometheus_client")
    from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, KVLayout
    from kvbm.metrics import KvbmCollector
    from kvbm.storage.disk import DiskTierConfig

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=4, dtype="float32")
    cfg = ManagerConfig(device=DeviceTierConfig(4, device="cpu"), host=HostTierConfig(4),
                        disk=DiskTierConfig(tmp_path / "g3", capacity_bytes=1 << 20))
    with BlockManager(layout, cfg) as mgr:
        families = list(KvbmCollector(mgr).collect())
    exported = {_exposed(f): f for f in families}
    documented = {name: (kind, {x.strip() for x in labels.split(",") if x.strip()})
                  for name, kind, labels in _METRIC_ROW.findall(METRICS.read_text())}
    assert sorted(set(exported) - set(documented)) == [], "exported, not in docs/metrics.md"
    assert sorted(set(documented) - set(exported)) == [], "in docs/metrics.md, not exported"
    for name, f in exported.items():
        kind, labels = documented[name]
        assert kind == f.type, (name, kind, f.type)
        seen = {k for s in f.samples for k in s.labels} - {"le"}  # le: histogram buckets
        assert seen <= labels, (name, seen, labels)


# -- architecture.md: the module map names every module and every subcommand -----------------
def test_architecture_names_every_module_and_command():
    from kvbm.cli import _COMMANDS

    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = [p.relative_to(ROOT / "kvbm").as_posix()
               for p in [*(ROOT / "kvbm").glob("*.py"), *(ROOT / "kvbm" / "lab").glob("*.py")]
               if not p.name.startswith("__")]
    assert not [m for m in modules if f"kvbm/{m}`" not in text and f"`kvbm/{m}" not in text]
    cli_row = next(line for line in text.splitlines() if line.startswith("| `kvbm/cli/`"))
    assert not [c for c in _COMMANDS if f"`{c}`" not in cli_row]
