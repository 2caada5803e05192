import json
import sys

import pytest

from kvbm import BlockManager, KVLayout
from kvbm.config import DeviceTierConfig, HostTierConfig, ManagerConfig
from kvbm.errors import ConfigError
from kvbm.pool import DevicePool, HostPool

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def test_from_toml_with_env_override(tmp_path):
    p = tmp_path / "kvbm.toml"
    p.write_text('salt = "llama"\n[device]\nnum_blocks = 64\ndevice = "cpu"\n'
                 '[host]\nnum_blocks = 128\neviction = "lru"\neager_offload = false\n')
    cfg = ManagerConfig.from_toml(p, env={"KVBM_HOST_NUM_BLOCKS": "256",
                                          "KVBM_HOST_ADMISSION": "frequency"})
    assert cfg.device == DeviceTierConfig(64, "cpu")
    assert cfg.host == HostTierConfig(256, eviction="lru", admission="frequency",
                                      eager_offload=False)
    assert cfg.salt == "llama"


def test_from_env_only():
    cfg = ManagerConfig.from_env({"KVBM_DEVICE_NUM_BLOCKS": "1_024", "KVBM_SALT": "t",
                                  "KVBM_HOST_NUM_BLOCKS": "0x10", "KVBM_HOST_PIN_MEMORY": "no",
                                  "OTHER": "x"})
    assert cfg.device.num_blocks == 1024 and cfg.salt == "t"
    assert cfg.host is not None and cfg.host.num_blocks == 16 and cfg.host.pin_memory is False


@pytest.mark.parametrize(("data", "match"), [
    ({}, "device"),
    ({"device": {"num_blocks": 0}}, "num_blocks"),
    ({"device": {"num_blocks": "many"}}, "num_blocks"),
    ({"device": {"num_blocks": 4, "colour": "red"}}, "colour"),
    ({"device": 4}, "table"),
    ({"device": {"num_blocks": 4, "device": "tpu"}}, "device"),
    ({"device": {"num_blocks": 4}, "host": {"num_blocks": 4, "eager_offload": "maybe"}},
     "eager_offload"),
])
def test_bad_config_is_a_clear_error(data, match):
    with pytest.raises(ConfigError, match=match) as e:
        ManagerConfig.from_mapping(data)
    assert isinstance(e.value, ValueError)


def test_unreadable_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[device\n")
    with pytest.raises(ConfigError, match="cannot read"):
        ManagerConfig.from_toml(p, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        ManagerConfig.from_toml(tmp_path / "missing.toml", env={})


# -- issue 10: bad configuration fails at once, with a message that says what to do ------------
def _write(tmp_path, text):
    p = tmp_path / "kvbm.toml"
    p.write_text(text)
    return p


FULL_TOML = """
salt = "m"
max_pending_events = 1000
[device]
num_blocks = 64
device = "cpu"
eviction = "LRU"
[host]
num_blocks = 128
pin_memory = false
admission = "frequency"
[disk]
path = "kv-disk"
capacity_bytes = 1_048_576
durability = "process_crash"
direct_io = false
[s3]
bucket = "b"
prefix = "p/"
[s3.retry]
max_attempts = 5
[offload]
batch_bytes = 4096
"""


def test_cli_config_prints_every_section(tmp_path, capsys):
    """`kvbm config` crashed on a [disk] table (Durability is not JSON serializable)."""
    from kvbm.cli import main

    assert main(["config", "--file", str(_write(tmp_path, FULL_TOML))]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["disk"]["durability"] == "process_crash"
    assert out["disk"]["path"] == "kv-disk"
    assert out["s3"]["retry"]["max_attempts"] == 5
    assert out["host"]["pin_memory"] is False


def test_cli_config_toml_output_loads_back(tmp_path, capsys):
    from kvbm.cli import main

    p = _write(tmp_path, FULL_TOML)
    assert main(["config", "--file", str(p), "--toml"]) == 0
    text = capsys.readouterr().out
    again = ManagerConfig.from_mapping(tomllib.loads(text))
    assert again == ManagerConfig.from_toml(p, env={})


@pytest.mark.parametrize("extra", ["", '[gcs]\nbucket = "g"\nanonymous = true\n'
                                   '[gcs.breaker]\ncooldown_s = 1.5\n'])
def test_to_dict_round_trip(tmp_path, extra):
    text = FULL_TOML.replace("[s3]\nbucket", "[s3x]\nbucket") if extra else FULL_TOML
    if extra:  # one object tier at most: swap s3 for gcs
        text = text.split("[s3x]")[0] + "[offload]\nbatch_bytes = 4096\n" + extra
    from kvbm.config import config_to_dict

    cfg = ManagerConfig.from_toml(_write(tmp_path, text), env={})
    d = cfg.to_dict()
    json.dumps(d)  # plain data only
    assert config_to_dict(cfg) == d
    assert ManagerConfig.from_mapping(d) == cfg


@pytest.mark.parametrize(("data", "closest"), [
    ({"device": {"num_blocks": 4, "eviction": "lruu"}}, "'lru'"),
    ({"device": {"num_blocks": 4}, "host": {"num_blocks": 4, "eviction": "predictve"}},
     "'predictive'"),
    ({"device": {"num_blocks": 4}, "host": {"num_blocks": 4, "admission": "frequencey"}},
     "'frequency'"),
    ({"device": {"num_blocks": 4}, "host": {"num_blocks": 4},
      "disk": {"path": "d", "capacity_bytes": 1 << 20, "eviction": "linage"}}, "'lineage'"),
    ({"device": {"num_blocks": 4}, "host": {"num_blocks": 4},
      "disk": {"path": "d", "capacity_bytes": 1 << 20, "admission": "freq"}}, "frequency"),
])
def test_unknown_policy_name_is_a_config_error(data, closest):
    with pytest.raises(ConfigError, match="valid names") as e:
        ManagerConfig.from_mapping(data)
    assert closest in str(e.value)


def test_policy_names_are_case_insensitive_and_none_admits_everything():
    cfg = ManagerConfig.from_mapping({"device": {"num_blocks": 4, "eviction": "S3FIFO"},
                                      "host": {"num_blocks": 4, "admission": "none"}})
    assert cfg.device.eviction == "S3FIFO"


def test_unknown_policy_in_code_is_refused_too():
    with pytest.raises(ConfigError, match="did you mean 'arc'"):
        DeviceTierConfig(4, eviction="arcc")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def test_pin_memory_without_cuda_fails_at_load(tmp_path):
    p = _write(tmp_path, "[device]\nnum_blocks = 4\n[host]\nnum_blocks = 4\npin_memory = true\n")
    if _cuda():
        assert ManagerConfig.from_toml(p, env={}).host.pin_memory is True
        return
    with pytest.raises(ConfigError, match="pin_memory") as e:
        ManagerConfig.from_toml(p, env={})
    assert "pin_memory = false" in str(e.value) and "unset" in str(e.value)


def test_cuda_device_without_cuda_fails_at_load():
    if _cuda():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA"):
        ManagerConfig.from_mapping({"device": {"num_blocks": 4, "device": "cuda:0"}})


def test_misspelt_env_variable_names_the_closest_field():
    with pytest.raises(ConfigError, match="KVBM_HOST_NUM_BLOCKS") as e:
        ManagerConfig.from_env({"KVBM_DEVICE_NUM_BLOCKS": "4", "KVBM_HOST_NUMBLOCKS": "8"})
    assert "KVBM_HOST_NUMBLOCKS" in str(e.value)


def test_misspelt_env_variable_fails_from_toml_too(tmp_path):
    p = _write(tmp_path, "[device]\nnum_blocks = 4\n")
    with pytest.raises(ConfigError, match="KVBM_SALT"):
        ManagerConfig.from_toml(p, env={"KVBM_SALTT": "x"})


def test_non_config_kvbm_variables_are_allowed():
    cfg = ManagerConfig.from_env({"KVBM_DEVICE_NUM_BLOCKS": "4", "KVBM_XXH3_SCALAR": "1"})
    assert cfg.device.num_blocks == 4


def test_env_reaches_nested_sections_and_none_drops_a_section(tmp_path):
    p = _write(tmp_path, '[device]\nnum_blocks = 4\n[host]\nnum_blocks = 4\n'
                         '[s3]\nbucket = "b"\n')
    cfg = ManagerConfig.from_toml(p, env={"KVBM_S3_RETRY_MAX_ATTEMPTS": "7",
                                          "KVBM_S3_BREAKER_COOLDOWN_S": "2.5"})
    assert cfg.s3 is not None and cfg.s3.retry.max_attempts == 7
    assert cfg.s3.breaker.cooldown_s == 2.5
    assert ManagerConfig.from_toml(p, env={"KVBM_S3": "none"}).s3 is None
    with pytest.raises(ConfigError, match="KVBM_S3_RETRY_MAX_ATTEMPTS"):
        ManagerConfig.from_toml(p, env={"KVBM_S3_RETRY": "3"})


def test_toml_typo_names_the_closest_key():
    with pytest.raises(ConfigError, match="did you mean 'num_blocks'"):
        ManagerConfig.from_mapping({"device": {"num_blocks": 4}, "host": {"numblocks": 4}})


def test_nan_is_refused_where_a_number_is_meant():
    with pytest.raises(ConfigError, match=r"retry\.deadline_s"):
        ManagerConfig.from_env({"KVBM_DEVICE_NUM_BLOCKS": "4", "KVBM_HOST_NUM_BLOCKS": "4",
                                "KVBM_S3_BUCKET": "b", "KVBM_S3_RETRY_DEADLINE_S": "nan"})


# -- sizes that cannot be allocated on this machine -------------------------------------------
TINY = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype="float16")


def test_host_tier_too_big_for_this_machine_fails_fast_with_sizes():
    cfg = ManagerConfig(device=DeviceTierConfig(8, device="cpu"),
                        host=HostTierConfig(1 << 40, pin_memory=False))
    with pytest.raises(ConfigError) as e:
        BlockManager(TINY, cfg)
    msg = str(e.value)
    assert "host tier" in msg and f"{1 << 40} blocks" in msg and "16 KiB" in msg
    assert "16 PiB asked" in msg and "available" in msg and "host.num_blocks" in msg


def test_device_tier_too_big_for_this_machine_fails_fast_with_sizes():
    device = "cuda" if _cuda() else "cpu"
    cfg = ManagerConfig(device=DeviceTierConfig(1 << 40, device=device))
    with pytest.raises(ConfigError, match=r"device tier \(\w+\): .* asked, .* available; lower "
                                          r"device.num_blocks"):
        BlockManager(TINY, cfg)


def test_pool_size_check_directly():
    with pytest.raises(ConfigError, match="asked"):
        HostPool(TINY, 1 << 40, pin_memory=False)
    with pytest.raises(ConfigError, match="asked"):
        DevicePool(TINY, 1 << 40, "cpu")


def test_format_bytes():
    from kvbm.capacity import format_bytes

    assert format_bytes(4 << 20) == "4 MiB"
    assert format_bytes(256 << 30) == "256 GiB"
    assert format_bytes(int(20.1 * (1 << 30))) == "20.1 GiB"
    assert format_bytes(512) == "512 B"


def test_failed_allocation_is_reported_with_sizes():
    """mmap's ENOMEM used to surface bare; now it names the sizes and the setting."""
    from kvbm.capacity import allocation_errors
    from kvbm.pool import dma_memory

    # 1 PiB exceeds any x86-64/arm64 user address space: mmap fails whatever the overcommit.
    with (pytest.raises(ConfigError, match=r"host tier: 1024 blocks × 1 TiB = 1 PiB asked and "
                                           r"the allocation failed .*lower host.num_blocks"),
          allocation_errors("host tier", 1024, 1 << 40, "host.num_blocks")):
        dma_memory(1 << 50)


@pytest.mark.parametrize("name", ["none", "None", ""])
def test_admission_none_by_name_admits_everything(name):
    """``admission = "none"`` (documented as "admit everything") made BlockManager fail
    with "admission None takes no options"."""
    cfg = ManagerConfig(device=DeviceTierConfig(4, device="cpu"),
                        host=HostTierConfig(4, admission=name, pin_memory=False))
    assert cfg.host is not None and cfg.host.admission is None
    with BlockManager(TINY, cfg) as mgr:
        assert mgr.stats().tiers


@pytest.mark.parametrize(("var", "value"), [("KVBM_DEVICE_NUM_BLOCKS", "abc"),
                                            ("KVBM_HOST_PIN_MEMORY", "maybe"),
                                            ("KVBM_OFFLOAD_LOAD_TIMEOUT_S", "soon")])
def test_a_bad_environment_value_names_its_variable(var, value):
    env = {"KVBM_DEVICE_NUM_BLOCKS": "8", "KVBM_HOST_NUM_BLOCKS": "8", var: value}
    with pytest.raises(ConfigError, match=var):
        ManagerConfig.from_env(env)


def test_nan_is_refused_as_not_a_number(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[device]\nnum_blocks = 8\n[offload]\nload_timeout_s = nan\n")
    with pytest.raises(ConfigError, match="must be a number, got NaN"):
        ManagerConfig.from_toml(p, env={})
