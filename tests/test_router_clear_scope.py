"""What a worker's ``AllBlocksCleared`` clears in the router's index (ClearScope).

vLLM emits AllBlocksCleared from its GPU block pool's ``reset_prefix_cache``: vLLM's GPU prefix
cache is empty, while kvbm's connector still holds (and announces) its lower-tier blocks. The
default scope therefore clears the worker's GPU medium only; ``ClearScope.ALL`` clears every
medium (publishers that mean "everything", Dynamo-style). Resets the router makes itself (a
lost stream, a restart: ``AllMediaCleared``, ``clear_worker``) always clear every medium.
"""

from __future__ import annotations

import pytest

from kvbm.cli import build_parser
from kvbm.cli.router import _config
from kvbm.errors import ConfigError, InvalidArgumentError
from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvbm.events.records import AllMediaCleared
from kvbm.hashing import hash_blocks
from kvbm.medium import Medium
from kvbm.router import ClearScope, KvIndexer, RouterConfig

BS = 4
GPU, CPU, DISK, OBJ = Medium.GPU, Medium.CPU_PINNED, Medium.DISK, Medium.OBJECT


def _loaded(idx: KvIndexer, worker: str = "w") -> tuple[list[int], list[int]]:
    """``worker`` holds blocks 0..3 on the GPU, 0..5 in CPU_PINNED, 0..7 on disk and in
    OBJECT (kvbm-style hashes), and one extra GPU-only block under another prefix."""
    t = list(range(8 * BS))
    s = hash_blocks(t, BS).sequence
    idx.apply(worker, [BlockStored(s[:4], None, t[:16], BS, GPU),
                       BlockStored(s[:6], None, t[:24], BS, CPU),
                       BlockStored(s, None, t, BS, DISK),
                       BlockStored(s, None, t, BS, OBJ),
                       BlockStored([12345], None, [9] * BS, BS, GPU)])
    return t, s


def test_default_scope_keeps_the_lower_tiers_after_all_blocks_cleared() -> None:
    idx = KvIndexer(BS)
    assert idx.clear_scope is ClearScope.GPU
    t, s = _loaded(idx)
    _loaded(idx, "other")
    idx.apply("w", [AllBlocksCleared()])
    assert idx.find_matches(t)["w"] == {CPU: 6, DISK: 2}
    assert idx.find_matches([9] * BS) == {"other": {GPU: 1}}
    blocks = idx.worker_blocks("w")
    assert blocks == {**{h: frozenset({CPU, DISK, OBJ}) for h in s[:6]},
                      **{h: frozenset({DISK, OBJ}) for h in s[6:]}}
    assert idx.block_counts()["w"] == {GPU: 0, CPU: 6, DISK: 8, OBJ: 8}
    assert idx.find_matches(t)["other"] == {GPU: 4, CPU: 2, DISK: 2}  # untouched
    # the lower-tier blocks stay removable by their hashes, and the GPU can be refilled
    idx.apply("w", [BlockRemoved(s[4:6], CPU), BlockStored(s[:2], None, t[:8], BS, GPU)])
    assert idx.find_matches(t)["w"] == {GPU: 2, CPU: 2, DISK: 4}
    assert idx.stats().unknown_removals == 0


def test_all_scope_clears_every_medium() -> None:
    idx = KvIndexer(BS, clear_scope=ClearScope.ALL)
    t, _ = _loaded(idx)
    _loaded(idx, "other")
    idx.apply("w", [AllBlocksCleared()])
    assert "w" not in idx.find_matches(t) and idx.worker_blocks("w") == {}
    assert idx.block_counts()["w"] == dict.fromkeys(Medium, 0)
    assert idx.find_matches(t)["other"] == {GPU: 4, CPU: 2, DISK: 2}


def test_scope_per_worker_overrides_the_indexer_scope() -> None:
    idx = KvIndexer(BS)
    idx.set_clear_scope("dyn", ClearScope.ALL)
    t, _ = _loaded(idx, "dyn")
    _loaded(idx, "vllm")
    idx.apply("dyn", [AllBlocksCleared()])
    idx.apply("vllm", [AllBlocksCleared()])
    assert idx.find_matches(t) == {"vllm": {CPU: 6, DISK: 2}}
    assert idx.clear_scope_of("dyn") is ClearScope.ALL
    assert idx.clear_scope_of("vllm") is ClearScope.GPU
    idx.set_clear_scope("dyn", None)  # back to the indexer's
    assert idx.clear_scope_of("dyn") is ClearScope.GPU
    idx.set_clear_scope("dyn", ClearScope.ALL)
    idx.remove_worker("dyn")  # forgets its scope too
    assert idx.clear_scope_of("dyn") is ClearScope.GPU


def test_resets_the_router_makes_clear_every_medium_whatever_the_scope() -> None:
    idx = KvIndexer(BS)
    t, _ = _loaded(idx)
    _loaded(idx, "x")
    idx.apply("w", [AllMediaCleared()])  # what the subscriber delivers for a lost stream
    idx.clear_worker("x")
    assert idx.find_matches(t) == {} and idx.worker_blocks("w") == {}
    assert idx.workers() == ["w", "x"]


@pytest.mark.parametrize("bad", ["gpu", None, 1])
def test_bad_scopes_are_refused(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        KvIndexer(BS, clear_scope=bad)  # type: ignore[arg-type]
    idx = KvIndexer(BS)
    with pytest.raises(InvalidArgumentError):
        idx.set_clear_scope("w", "all")  # type: ignore[arg-type]
    assert idx.workers() == []


def test_config_toml_env_and_cli(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert RouterConfig().clear_scope is ClearScope.GPU
    path = tmp_path / "router.toml"
    path.write_text('[router]\nclear_scope = "all"\n')
    assert RouterConfig.from_toml(path, env={}).clear_scope is ClearScope.ALL
    env = {"KVBM_ROUTER_CLEAR_SCOPE": "gpu"}
    assert RouterConfig.from_toml(path, env=env).clear_scope is ClearScope.GPU
    assert RouterConfig.from_env({"KVBM_ROUTER_CLEAR_SCOPE": "all"}).clear_scope \
        is ClearScope.ALL
    with pytest.raises(ConfigError):
        RouterConfig.from_env({"KVBM_ROUTER_CLEAR_SCOPE": "disk"})
    with pytest.raises(ConfigError):
        RouterConfig(clear_scope="all")  # type: ignore[arg-type]
    args = build_parser().parse_args(["router", "--config", str(path)])
    assert _config(args).clear_scope is ClearScope.ALL
    args = build_parser().parse_args(["router", "--config", str(path), "--clear-scope", "gpu"])
    assert _config(args).clear_scope is ClearScope.GPU
    with pytest.raises(SystemExit):
        build_parser().parse_args(["router", "--clear-scope", "disk"])
