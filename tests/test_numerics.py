"""Throughput options that change numerics (issue 18, the parts a CPU can check): bf16 autocast
and channels_last. Defaults must leave every run, and every run key, as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_protocol
from method_helpers import TINY_MODEL, run, tiny_federation
from torch import nn

from pflbench.data import make_splits
from pflbench.engine import Federation, autocast
from pflbench.registry import get_method
from pflbench.suite import KEYED_WHEN_SET, Protocol


def _global(fed) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in fed.model.state_dict().items()}


def _conv_dtypes(fed_model: nn.Module, seen: list[torch.dtype]):
    conv = next(m for m in fed_model.modules() if isinstance(m, nn.Conv2d))
    return conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))


def test_defaults_leave_run_keys_as_they_were():
    key = Protocol(rounds=2).key_dict()
    assert "amp" not in key and "channels_last" not in key
    assert {"amp", "channels_last"} <= set(KEYED_WHEN_SET)
    on = Protocol(rounds=2, amp="bf16", channels_last=True).key_dict()
    assert on["amp"] == "bf16" and on["channels_last"] is True
    with pytest.raises(ValueError):
        Protocol(rounds=2, amp="fp8")


def test_autocast_off_is_a_no_op_and_bf16_casts_convolutions():
    conv = nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8)
    with autocast("off", torch.device("cpu")):
        assert conv(x).dtype == torch.float32
    with autocast("bf16", torch.device("cpu")):
        assert conv(x).dtype == torch.bfloat16


def test_bf16_run_computes_in_bfloat16_and_keeps_float32_weights():
    data = tiny_federation()
    seen: list[torch.dtype] = []
    method = get_method("fedavg")()
    fed = Federation(
        data, make_splits(data), method, TINY_MODEL, fast_protocol(amp="bf16", rounds=6), 0
    )
    hook = _conv_dtypes(fed.model, seen)
    out = fed.run()
    hook.remove()
    assert out.info["status"] == "ok"
    assert seen and set(seen) == {torch.bfloat16}  # training and evaluation forwards
    assert all(v.dtype == torch.float32 for v in _global(fed).values() if v.is_floating_point())
    _, plain = run(data, "fedavg", rounds=6)
    # the same federation learns about as well in bf16 once past its first rounds (bf16 keeps 8
    # significant bits: it lags early, 0.37 vs 0.74 at round 2, and is level by round 4)
    late = "split == 'val' and metric == 'dice' and round >= 4"
    a = out.rounds.query(late)["value"].mean()
    b = plain.rounds.query(late)["value"].mean()
    assert not out.rounds["value"].equals(plain.rounds["value"])
    assert a > 0.4 and abs(a - b) < 0.15


def test_channels_last_trains_the_same_model_up_to_rounding():
    data = tiny_federation()
    # one round of one epoch: Adam turns rounding differences into ~1e-4 per step
    fed_cl, out_cl = run(data, "fedavg", channels_last=True, rounds=1, local_epochs=1)
    fed, out = run(data, "fedavg", rounds=1, local_epochs=1)
    convs = [m for m in fed_cl.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    a, b = _global(fed_cl), _global(fed)
    for k in b:
        if b[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=1e-3, rtol=1e-3), k
    assert out_cl.info["status"] == out.info["status"] == "ok"
