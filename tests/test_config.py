import pytest

from kvbm.config import DeviceTierConfig, HostTierConfig, ManagerConfig
from kvbm.errors import ConfigError


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
