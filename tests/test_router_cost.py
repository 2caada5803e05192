"""KvRouter (kvbm.router.cost) and the router's configuration (kvbm.router.config)."""

from __future__ import annotations

import pytest

from kvbm.errors import ConfigError, InvalidArgumentError
from kvbm.events import BlockStored
from kvbm.hashing import hash_blocks
from kvbm.medium import Medium
from kvbm.router import (
    CostConfig,
    KvIndexer,
    KvRouter,
    RouterConfig,
    TieBreak,
    WorkerEndpoints,
    WorkerLoad,
)

BS = 4
GPU, CPU, DISK, OBJ = Medium.GPU, Medium.CPU_PINNED, Medium.DISK, Medium.OBJECT
T = list(range(10 * BS + 2))  # 10 full blocks and a partial one
S = hash_blocks(T, BS).sequence


def indexer(**held: tuple[Medium, int]) -> KvIndexer:
    idx = KvIndexer(BS)
    for w, (m, n) in held.items():
        idx.apply(w, [BlockStored(S[:n], None, T[:n * BS], BS, m)])
    return idx


def test_the_cost_formula_term_by_term() -> None:
    idx = indexer(a=(DISK, 6), b=(GPU, 2))
    cfg = CostConfig(prefill_weight=2.0, request_weight=3.0, tie_break=TieBreak.NAME)
    sel = KvRouter(idx, cfg).select(T, {"a": WorkerLoad(5, 1), "b": 0, "c": 7})
    a, b, c = sel.scores["a"], sel.scores["b"], sel.scores["c"]
    # a: 42 tokens, 6 held on disk: 18 tokens new = 4.5 blocks, + 6 * 0.3
    assert a.matched == {DISK: 6} and a.new_blocks == pytest.approx(4.5)
    assert a.prefill_blocks == pytest.approx(4.5 + 1.8)
    assert a.decode_blocks == 5 + 11 and a.active_requests == 1
    assert a.cost == pytest.approx(2 * 6.3 + 16 + 3 * 1)
    assert b.cost == pytest.approx(2 * (8.5 + 0.0) + 11)
    assert c.matched == {} and c.cost == pytest.approx(2 * 10.5 + 18)
    assert sel.worker == "b" and sel.cost == b.cost
    d = sel.to_dict()
    assert d["worker"] == "b" and d["scores"]["a"]["matched"] == {"DISK": 6}
    assert d["scores"]["a"]["matched_blocks"] == 6


def test_a_faster_tier_wins_at_equal_overlap_and_load_can_outweigh_it() -> None:
    idx = indexer(gpu=(GPU, 8), disk=(DISK, 8), obj=(OBJ, 8))
    r = KvRouter(idx)
    assert r.select(T).worker == "gpu"
    assert r.select(T, {"disk": 0, "obj": 0}).worker == "disk"
    # a busy GPU worker loses to an idle one holding the prefix on disk
    assert r.select(T, {"gpu": 50, "disk": 0}).worker == "disk"
    # with the tier weights at 1 (a GPU-only router's view) disk is no better than nothing
    flat = CostConfig(cpu_pinned_weight=1.0, disk_weight=1.0, object_weight=1.0,
                      tie_break=TieBreak.NAME)
    assert KvRouter(idx, flat).select(T, {"disk": 0, "idle": 0}).worker == "disk"
    assert KvRouter(idx, flat).select(T, {"disk": 1, "idle": 0}).worker == "idle"


def test_an_idle_worker_of_the_object_group_takes_a_busy_workers_prefix() -> None:
    idx = indexer(busy=(OBJ, 10))
    idx.add_worker("idle")
    r = KvRouter(idx, CostConfig(tie_break=TieBreak.NAME))
    loads = {"busy": 3, "idle": 0}
    # busy: 0.5 new + 10 * 0.5 held, 3 + 11 decode = 19.5; idle recomputes: 10.5 + 11 = 21.5
    assert r.select(T, loads).worker == "busy"
    assert r.select(T, loads).scores["idle"].matched == {}
    idx.set_object_group("busy", "bucket")
    idx.set_object_group("idle", "bucket")
    sel = r.select(T, loads)  # idle loads the prefix from the bucket: 5.5 + 11 = 16.5
    assert sel.worker == "idle" and sel.scores["idle"].matched == {OBJ: 10}
    assert sel.scores["idle"].cost == pytest.approx(16.5)


def test_ties_are_broken_by_name_or_by_a_seeded_draw() -> None:
    idx = indexer()
    loads = dict.fromkeys(["w3", "w1", "w2"], 0)
    assert KvRouter(idx, CostConfig(tie_break=TieBreak.NAME)).select(T, loads).worker == "w1"
    picks = [KvRouter(idx, CostConfig(seed=7)).select(T, loads).worker for _ in range(3)]
    assert len(set(picks)) == 1  # one seed, one draw
    r = KvRouter(idx, CostConfig(seed=7))
    assert {r.select(T, loads).worker for _ in range(60)} == set(loads)


def test_temperature_spreads_picks_toward_cheaper_workers() -> None:
    idx = indexer(hot=(GPU, 10))
    r = KvRouter(idx, CostConfig(temperature=0.5, seed=1, share_bound=None))
    picks = [r.select(T, {"hot": 0, "cold": 0}).worker for _ in range(300)]
    assert 0 < picks.count("cold") < picks.count("hot")
    r0 = KvRouter(idx, CostConfig(seed=1, share_bound=None))
    assert {r0.select(T, {"hot": 0, "cold": 0}).worker for _ in range(50)} == {"hot"}


def test_by_default_the_cost_alone_picks_however_often_a_prompt_comes() -> None:
    # Dynamo's semantics: equal loads, the prefix holder wins every time (bounded shares
    # are opt-in)
    idx = indexer(hot=(GPU, 10))
    r = KvRouter(idx)
    assert {r.select(T, {"hot": 0, "cold": 0}).worker for _ in range(50)} == {"hot"}


def test_a_prefix_holder_gets_at_most_its_bounded_share_of_the_picks() -> None:
    # hot holds the whole prompt on the GPU and is as idle as the others: by cost alone it
    # takes every request (the pull that unbalances a cluster)
    idx = indexer(hot=(GPU, 10))
    loads = {"hot": 0, "cold": 0, "colder": 0}
    free = KvRouter(idx, CostConfig(share_bound=None, tie_break=TieBreak.NAME))
    assert {free.select(T, loads).worker for _ in range(30)} == {"hot"}
    r = KvRouter(idx, CostConfig(share_bound=0.2, share_window=10, tie_break=TieBreak.NAME))
    picks = [r.select(T, loads) for _ in range(300)]
    names = [s.worker for s in picks]
    # the window holds the last 30 picks: a worker is picked only while it had fewer than
    # ceil(1.2 * 31 / 3) = 13 of them, so no 31 picks in a row hold more than 13 of hot's
    # (about (1 + 0.2) x a third), and it gets about as many as that allows
    assert all(names[i - 31:i].count("hot") <= 13 for i in range(31, 301))
    assert 110 <= names.count("hot") <= 135
    away = next(s for s in picks if s.worker != "hot")
    # a full worker is still scored (and cheapest), flagged, and not picked
    assert away.scores["hot"].full and away.scores["hot"].cost < away.cost
    assert away.to_dict()["scores"]["hot"]["full"] is True
    assert not away.scores[away.worker].full
    # the others share the rest by cost (equal here: by name, each below its bound)
    assert {s.worker for s in picks} == {"hot", "cold", "colder"}


def test_the_share_bound_never_refuses_and_a_newcomer_is_not_flooded() -> None:
    idx = indexer(hot=(GPU, 10))
    r = KvRouter(idx, CostConfig(share_bound=0.0, share_window=5, tie_break=TieBreak.NAME))
    # one candidate: always picked, however many times
    assert {r.select(T, {"hot": 0}).worker for _ in range(20)} == {"hot"}
    # hot had every recent pick; the newcomer is credited with an even share of the
    # window instead of an empty record (which would send it every request until the
    # window forgot hot's picks): from the first pick they share, hot (cheaper) first
    picks = [r.select(T, {"hot": 0, "new": 0}).worker for _ in range(40)]
    assert picks[0] == "hot" and picks[:5].count("new") <= 3
    for i in range(10, 41):  # a worker is full at ceil(11 / 2) = 6 of the last 10 picks
        assert picks[i - 10:i].count("hot") <= 6 and picks[i - 10:i].count("new") <= 6
    assert 15 <= picks.count("new") <= 20
    sel = r.select(T, {"hot": 0, "new": 0})
    assert sel.scores["hot"].matched == {GPU: 10} and sel.scores["new"].matched == {}


def test_select_by_hashes_and_before_any_event() -> None:
    idx = indexer(a=(CPU, 3))
    sel = KvRouter(idx).select(hashes=S[:5])
    assert sel.worker == "a" and sel.scores["a"].matched == {CPU: 3}
    empty = KvIndexer()
    empty.add_worker("x")
    assert KvRouter(empty).select([1, 2, 3]).worker == "x"


@pytest.mark.parametrize("call", [
    lambda r: r.select(),
    lambda r: r.select(T, hashes=S),
    lambda r: r.select(T, {"a": -1}),
    lambda r: r.select(T, {"a": True}),
    lambda r: r.select(T, {"a": 1.5}),
    lambda r: r.select(T, {"": 0}),
    lambda r: r.select(T, [("a", 0)]),
    lambda r: r.select([-1]),
    lambda r: r.select("abc"),
    lambda r: r.select(hashes=[2**64]),
    lambda r: r.select(hashes=S, lora_name="x"),
    lambda r: KvRouter(KvIndexer()).select(T),  # no worker at all
    lambda r: WorkerLoad(-1),
    lambda r: KvRouter(object()),
    lambda r: KvRouter(KvIndexer(), RouterConfig()),
])
def test_bad_arguments(call: object) -> None:
    with pytest.raises(InvalidArgumentError):
        call(KvRouter(indexer(a=(GPU, 1))))  # type: ignore[operator]


# ---------------------------------------------------------------------------- config --

def test_config_from_toml_and_env(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "r.toml"
    path.write_text("""
[router]
block_size = 16
[router.cost]
disk_weight = 0.25
tie_break = "name"
[router.service]
port = 9000
[router.workers]
w0 = "tcp://127.0.0.1:5557,tcp://127.0.0.1:5558"
w1 = { endpoint = "tcp://127.0.0.1:6557", object_group = "b" }
""")
    cfg = RouterConfig.from_toml(path, env={"KVBM_ROUTER_COST_OBJECT_WEIGHT": "0.4",
                                            "KVBM_ROUTER_COST_SHARE_BOUND": "none",
                                            "KVBM_ROUTER_COST_SHARE_WINDOW": "32",
                                            "KVBM_HOST_NUM_BLOCKS": "9"})
    assert cfg.cost.share_bound is None and cfg.cost.share_window == 32
    assert cfg.block_size == 16 and cfg.service.port == 9000
    assert cfg.cost.disk_weight == 0.25 and cfg.cost.object_weight == 0.4
    assert cfg.cost.tie_break is TieBreak.NAME and cfg.cost.weight(Medium.DISK) == 0.25
    assert cfg.workers == (
        WorkerEndpoints("w0", "tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558"),
        WorkerEndpoints("w1", "tcp://127.0.0.1:6557", None, "b"))
    # TOML has no null: "none" unsets an optional field there too
    off = tmp_path / "off.toml"
    off.write_text('[router.cost]\nshare_bound = "none"\n')
    assert RouterConfig.from_toml(off, env={}).cost.share_bound is None
    env = RouterConfig.from_env({"KVBM_ROUTER_WORKERS": "a=tcp://h:1;b=ipc:///tmp/x,tcp://h:2",
                                 "KVBM_ROUTER_SUBSCRIBER_RCVHWM": "10"})
    assert [w.name for w in env.workers] == ["a", "b"] and env.workers[1].replay == "tcp://h:2"
    assert env.subscriber.rcvhwm == 10


@pytest.mark.parametrize("data", [
    {"cost": {"disk_weight": 1.5}},
    {"cost": {"gpu_weight": -0.1}},
    {"cost": {"prefill_weight": float("nan")}},
    {"cost": {"temperature": float("inf")}},
    {"cost": {"tie_break": "coin"}},
    {"cost": {"seed": -1}},
    {"cost": {"share_bound": -0.1}},
    {"cost": {"share_bound": float("nan")}},
    {"cost": {"share_window": 0}},
    {"cost": {"disk_wieght": 0.1}},
    {"service": {"port": 70000}},
    {"service": {"max_body_bytes": 10}},
    {"subscriber": {"replay_timeout_s": 0}},
    {"block_size": 0},
    {"workers": {"a": "http://x"}},
    {"workers": {"a": "tcp://*:5557"}},
    {"workers": {"a": "tcp://h:1,tcp://h:2,tcp://h:3"}},
    {"workers": {"a": {"replay": "tcp://h:1"}}},
    {"workers": {"a": {"endpoint": "tcp://h:1", "group": "x"}}},
    {"workers": "nonsense"},
    {"workers": ["a"]},
])
def test_bad_config(data: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RouterConfig.from_mapping(data)


def test_bad_env_names_the_variable_and_dup_workers_are_refused() -> None:
    with pytest.raises(ConfigError, match="KVBM_ROUTER_COST_DISKWEIGHT"):
        RouterConfig.from_env({"KVBM_ROUTER_COST_DISKWEIGHT": "1"})
    with pytest.raises(ConfigError, match="twice"):
        RouterConfig.from_env({"KVBM_ROUTER_WORKERS": "a=tcp://h:1;a=tcp://h:2"})
    with pytest.raises(ConfigError):
        WorkerEndpoints.parse("no-equals-sign")


def test_a_manager_config_from_env_leaves_router_variables_to_the_router() -> None:
    # one environment for a whole deployment: the workers' ManagerConfig must not refuse
    # the router's variables (nor the router the workers')
    from kvbm.config import ManagerConfig

    env = {"KVBM_DEVICE_NUM_BLOCKS": "8", "KVBM_HOST_NUM_BLOCKS": "16",
           "KVBM_ROUTER_SERVICE_PORT": "9000"}
    assert ManagerConfig.from_env(env).host.num_blocks == 16  # type: ignore[union-attr]
    assert RouterConfig.from_env(env).service.port == 9000


def test_the_example_config_of_docs_router_md_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "router.md").read_text()
    blocks = re.findall(r'^```toml title="router.toml"\n(.*?)^```', text, flags=re.M | re.S)
    assert blocks
    for block in blocks:
        path = tmp_path / "router.toml"
        path.write_text(block)
        cfg = RouterConfig.from_toml(path, env={})
        assert cfg.cost.seed == 7 and [w.name for w in cfg.workers] == ["w0", "w1"]
        assert cfg.workers[1].object_group == "s3-a"
