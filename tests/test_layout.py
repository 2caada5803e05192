import pytest

from kvbm import Arrangement, KVLayout
from kvbm.errors import KvbmError, LayoutError
from kvbm.layout import PRESETS


def test_bytes_per_block_llama():
    lay = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
    assert lay.bytes_per_block == 32 * 2 * 16 * 8 * 128 * 2 == 2 * 1024 * 1024
    assert lay.block_shape == (32, 2, 16, 8, 128)
    assert lay.layer_shape == (2, 16, 8, 128)
    assert PRESETS["small"].bytes_per_block == 32 * 1024


def test_fingerprint_depends_on_fields_and_model():
    a = KVLayout(4, 2, 8, 16, "float16")
    assert a.fingerprint == KVLayout(4, 2, 8, 16, "fp16").fingerprint
    others = [KVLayout(5, 2, 8, 16, "float16"), KVLayout(4, 3, 8, 16, "float16"),
              KVLayout(4, 2, 16, 16, "float16"), KVLayout(4, 2, 8, 32, "float16"),
              KVLayout(4, 2, 8, 16, "bfloat16"), KVLayout(4, 2, 8, 16, "float16", model_id="m")]
    assert len({o.fingerprint for o in others} | {a.fingerprint}) == 7
    # the device arrangement does not change the page format
    assert KVLayout(4, 2, 8, 16, "float16", Arrangement.LAYER_SEPARATE).fingerprint == a.fingerprint


@pytest.mark.parametrize("kwargs", [
    dict(num_layers=0, num_kv_heads=1, head_dim=1, block_size=1),
    dict(num_layers=1, num_kv_heads=-2, head_dim=1, block_size=1),
    dict(num_layers=1, num_kv_heads=1, head_dim=1.5, block_size=1),
    dict(num_layers=1, num_kv_heads=1, head_dim=1, block_size=True),
    dict(num_layers=1, num_kv_heads=1, head_dim=1, block_size=16, dtype="complex64"),
    dict(num_layers=1, num_kv_heads=1, head_dim=1, block_size=16, arrangement="diagonal"),
])
def test_invalid_layouts_raise_clear_errors(kwargs):
    with pytest.raises(LayoutError) as e:
        KVLayout(**kwargs)
    assert isinstance(e.value, ValueError) and isinstance(e.value, KvbmError)
    assert str(e.value)


def test_dict_round_trip_and_unknown_field():
    lay = KVLayout(2, 2, 4, 8, "float32", "layer_separate", "x")
    assert lay.arrangement is Arrangement.LAYER_SEPARATE
    assert KVLayout.from_dict(lay.to_dict()) == lay
    with pytest.raises(LayoutError, match="unknown layout fields"):
        KVLayout.from_dict({**lay.to_dict(), "heads": 3})


def test_torch_dtype():
    import torch

    assert KVLayout(1, 1, 1, 1, "bf16").torch_dtype() is torch.bfloat16
