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


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_run_computes_in_half_and_keeps_float32_weights(amp, dtype):
    from method_helpers import capturing

    data = tiny_federation()
    seen: list[torch.dtype] = []
    method = capturing(get_method("fedavg"))()
    fed = Federation(
        data, make_splits(data), method, TINY_MODEL, fast_protocol(amp=amp, rounds=6), 0
    )
    hook = _conv_dtypes(fed.model, seen)
    out = fed.run()
    hook.remove()
    assert out.info["status"] == "ok"
    assert seen and set(seen) == {dtype}  # training and evaluation forwards
    assert all(v.dtype == torch.float32 for v in _global(fed).values() if v.is_floating_point())
    scalers = [type(method).states[cid].get("_grad_scaler/main") for cid in fed.ids]
    if amp == "fp16":
        # each client keeps the scale its scaler reached, so a round does not start again at
        # 2¹⁶: more successful steps since the last back-off than one round has (≤ 6)
        assert all(k["scale"] > 0 and k["_growth_tracker"] > 6 for k in scalers)
    else:
        assert scalers == [None] * len(fed.ids)  # bf16 keeps float32's range: no scaler
    _, plain = run(data, "fedavg", rounds=6)
    # the same federation learns about as well in half precision once past its first rounds
    # (bf16 keeps 8 significant bits: it lags early, 0.37 vs 0.74 at round 2, level by round 4)
    late = "split == 'val' and metric == 'dice' and round >= 4"
    a = out.rounds.query(late)["value"].mean()
    b = plain.rounds.query(late)["value"].mean()
    assert not out.rounds["value"].equals(plain.rounds["value"])
    assert a > 0.4 and abs(a - b) < 0.15
    assert Protocol(rounds=2, amp=amp).key_dict()["amp"] == amp


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


# fp16's gradient scaler ----------------------------------------------------------------------


def _sgd_pair(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_a_scaled_step_is_the_plain_step_and_an_overflow_skips_it():
    from pflbench.training import attach_scaler, backward_step

    x = torch.randn(8, 3)
    plain, opt = _sgd_pair()
    backward_step(opt, plain(x).pow(2).mean())
    scaled, opt_s = _sgd_pair()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    attach_scaler(opt_s, scaler)
    backward_step(opt_s, scaled(x).pow(2).mean())
    # a power-of-two scale is exact in float32: the unscaled step is the plain one, bit for bit
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in scaled.parameters()]
    backward_step(opt_s, scaled(x).sum() * float("inf"))  # gradients overflow
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**9  # backed off, as GradScaler does after a skipped step


def test_fp16_optimizers_of_a_client_get_a_scaler_and_others_none():
    from method_helpers import make_client, tiny_unet

    from pflbench.training import scaler_of

    client = make_client(tiny_unet(), amp="fp16")
    opt = client.optimizer(client.model.parameters())
    assert scaler_of(opt) is not None
    client.keep_optimizer(opt)
    assert client.state["_grad_scaler/main"]["scale"] == scaler_of(opt).get_scale()
    off = make_client(tiny_unet())
    assert scaler_of(off.optimizer(off.model.parameters())) is None
