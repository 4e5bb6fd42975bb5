"""Server averaging, merging and partitions, checked element by element against hand-computed
values (the pieces every method's numbers go through)."""

from __future__ import annotations

import pytest
import torch
from method_helpers import make_client, tiny_unet
from torch import nn

from pflbench.aggregation import aggregation_weights, masked_average, merge_into
from pflbench.messages import Message, Upload
from pflbench.method import Method
from pflbench.partition import floating_entries, keys_of_types, norm_keys, partition_sizes


def up(weight: float, masks: dict | None = None, **entries: list[float]) -> Upload:
    return Upload(
        entries={k: torch.tensor(v) for k, v in entries.items()},
        weight=weight,
        masks={k: torch.tensor(m) for k, m in (masks or {}).items()},
    )


# aggregation ------------------------------------------------------------------------------------


def test_aggregation_weights_are_shares_and_refuse_a_zero_total():
    assert aggregation_weights({"a": up(2.0, w=[0.0]), "b": up(6.0, w=[0.0])}) == {
        "a": 0.25,
        "b": 0.75,
    }
    assert aggregation_weights({"a": up(5.0, w=[0.0])}) == {"a": 1.0}
    small = aggregation_weights({"a": up(0.25, w=[0.0]), "b": up(0.5, w=[0.0])})  # Σ below 1
    assert small == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    with pytest.raises(ValueError, match=r"^aggregation weights must have a positive sum$"):
        aggregation_weights({"a": up(0.0, w=[0.0]), "b": up(0.0, w=[0.0])})


def test_element_weights_count_only_the_clients_sharing_each_element():
    ups = {
        "a": up(1.0, {"w": [True, True, False]}, w=[1.0, 10.0, 100.0]),
        "b": up(3.0, {"w": [True, False, True]}, w=[5.0, 20.0, 200.0]),
        "c": up(4.0, w=[9.0, 30.0, 300.0]),  # shares the whole entry
    }
    msg = masked_average(ups)
    expected = [
        (1 * 1.0 + 3 * 5.0 + 4 * 9.0) / 8,  # everyone
        (1 * 10.0 + 4 * 30.0) / 5,  # a and c
        (3 * 200.0 + 4 * 300.0) / 7,  # b and c
    ]
    torch.testing.assert_close(msg.entries["w"], torch.tensor(expected), rtol=0, atol=1e-5)
    assert msg.masks == {}  # every element had a sharer


def test_fractional_weights_below_one_are_averaged_as_well():
    msg = masked_average({"a": up(0.2, w=[1.0, 0.0]), "b": up(0.3, w=[6.0, 10.0])})
    torch.testing.assert_close(msg.entries["w"], torch.tensor([4.0, 6.0]))


def test_identical_uploads_average_to_themselves_bit_for_bit():
    t = torch.randn(5000)
    ups = {
        c: Upload(entries={"w": t.clone()}, weight=w)
        for c, w in zip("abc", (3, 7, 11), strict=True)
    }
    assert torch.equal(masked_average(ups).entries["w"], t)  # float64 accumulation


def test_an_element_nobody_shares_is_not_sent_and_keeps_the_receivers_value():
    ups = {
        "a": up(2.0, {"w": [True, False]}, w=[4.0, 8.0]),
        "b": up(1.0, {"w": [True, False]}, w=[1.0, 2.0]),
    }
    msg = masked_average(ups)
    assert msg.masks["w"].tolist() == [True, False]
    assert msg.entries["w"][0].item() == pytest.approx(3.0)
    state = {"w": torch.tensor([-1.0, -2.0])}
    merge_into(state, msg, {"w": True})
    assert state["w"].tolist() == [3.0, -2.0]


def test_refusals_name_the_entry():
    with pytest.raises(
        TypeError, match=r"^entry 'steps' is torch.int64; only floating-point entries are averaged$"
    ):
        masked_average({"a": Upload(entries={"steps": torch.tensor([1])}, weight=1.0)})
    with pytest.raises(
        ValueError, match=r"^entry 'w': aggregation weights must have a positive sum$"
    ):
        masked_average({"a": up(0.0, w=[1.0]), "b": up(0.0, w=[2.0])})


def test_merge_writes_only_what_the_client_shares_and_the_server_sent():
    msg = Message(
        entries={
            "whole": torch.tensor([7.0, 7.0], dtype=torch.float64),
            "masked": torch.tensor([1.0, 2.0, 3.0]),
            "mine": torch.tensor([9.0]),
            "absent": torch.tensor([9.0]),
        },
        masks={"masked": torch.tensor([True, True, False])},
    )
    state = {
        "whole": torch.zeros(2),
        "masked": torch.zeros(3),
        "mine": torch.zeros(1),
        "absent": torch.zeros(1),
        "untouched": torch.zeros(1),
    }
    shared = {"whole": True, "masked": torch.tensor([False, True, True]), "mine": False}
    merge_into(state, msg, shared)
    assert state["whole"].tolist() == [7.0, 7.0] and state["whole"].dtype == torch.float32
    assert state["masked"].tolist() == [0.0, 2.0, 0.0]  # client shares 1, 2; server sent 0, 1
    assert state["mine"].tolist() == [0.0] and state["absent"].tolist() == [0.0]
    assert state["untouched"].tolist() == [0.0]


def test_merge_goes_on_past_personal_entries_and_applies_a_client_mask_alone():
    msg = Message(entries={"mine": torch.tensor([9.0]), "later": torch.tensor([1.0, 2.0])})
    state = {"mine": torch.zeros(1), "later": torch.zeros(2)}
    merge_into(state, msg, {"mine": False, "later": torch.tensor([False, True])})
    assert state["mine"].tolist() == [0.0]  # personal, and the entries after it still merge
    assert state["later"].tolist() == [0.0, 2.0]  # the client's mask, no server mask


# partitions -------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.block = nn.Sequential(nn.Conv2d(2, 2, 1), nn.GroupNorm(1, 2))


def test_floating_entries_share_floats_and_keep_integer_buffers_local():
    part = floating_entries(_Net())
    assert part["bn.running_mean"] is True and part["bn.num_batches_tracked"] is False
    assert all(v is True for k, v in part.items() if not k.endswith("num_batches_tracked"))


def test_norm_keys_go_by_module_type_with_full_paths():
    assert norm_keys(_Net()) == [
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "block.1.weight",
        "block.1.bias",
    ]
    assert keys_of_types(_Net(), (nn.Conv2d,)) == ["conv.weight", "conv.bias"] + [
        "block.0.weight",
        "block.0.bias",
    ]
    # a model that is itself a norm layer: its keys carry no prefix
    assert norm_keys(nn.BatchNorm2d(3))[:2] == ["weight", "bias"]


def test_partition_sizes_count_elements_of_masks_whole_entries_and_unlisted_keys():
    net = _Net()  # conv 2+2, bn 2+2+2+2+1, block.0 4+2, block.1 2+2
    part = {
        "conv.weight": torch.tensor([True, False]).view(2, 1, 1, 1),
        "conv.bias": True,
        "bn.weight": False,
        "block.0.weight": torch.ones(2, 2, 1, 1, dtype=torch.bool),
    }
    # shared: 1 + 2 + 4 = 7; personal: 1 + everything not listed
    total = sum(v.numel() for v in net.state_dict().values())
    assert partition_sizes(net, part) == {"shared": 7, "personal": total - 7}


# the Method defaults (FedAvg) ---------------------------------------------------------------------


class _Mixed(Method):
    name = "mixed"

    def client_partition(self, client):
        part = {k: False for k in client.model.state_dict()}
        part["head.weight"] = torch.zeros_like(client.model.head.weight, dtype=torch.bool)
        part["head.weight"].view(-1)[0] = True
        part["head.bias"] = True
        part["encoder.0.conv1.weight"] = torch.zeros_like(
            client.model.encoder[0].conv1.weight, dtype=torch.bool
        )  # all-False mask: nothing of it is sent
        return part


def test_upload_sends_copies_of_shared_entries_with_their_masks_and_the_sample_count():
    client = make_client(tiny_unet(), site=1)
    upload = _Mixed().upload(client)
    assert set(upload.entries) == {"head.weight", "head.bias"} and set(upload.masks) == {
        "head.weight"
    }
    assert int(upload.masks["head.weight"].sum()) == 1
    for k in ("head.weight", "head.bias"):  # the client's values, masked entries too
        assert torch.equal(upload.entries[k], client.model.state_dict()[k]), k
    assert upload.weight == float(client.num_train) == 10.0
    before = upload.entries["head.bias"].clone()
    with torch.no_grad():
        client.model.head.bias.add_(1.0)  # later training must not change what was sent
    assert torch.equal(upload.entries["head.bias"], before)


def test_method_defaults_are_fedavg():
    m = Method()
    client = make_client(tiny_unet())
    assert m.partition(client.model) == floating_entries(client.model)
    assert m.client_partition(client) == floating_entries(client.model)
    assert m.setup(client) is None and m.setup_server({"a": 1}) == {}
    m.receive_setup(client, {"x": 1})
    assert client.state["setup"] == {"x": 1}
    assert m.eval_model(client) is client.model
    fresh = m.fresh()
    assert type(fresh) is Method and fresh is not m and fresh.hparams == m.hparams
    with pytest.raises(AttributeError, match="Method has no attribute 'mu'"):
        _ = m.mu
    # receive writes the server's average into the shared entries
    msg = Message(entries={"head.bias": torch.tensor([0.5])})
    m.receive(client, msg)
    assert client.model.head.bias.tolist() == [0.5]


def test_a_bad_hyperparameter_names_the_method_or_its_class():
    from pflbench.params import ParamError
    from pflbench.registry import get_method

    with pytest.raises(ParamError, match=r"^method fedprox: unknown parameter\(s\) \['nu'\]"):
        get_method("fedprox")(nu=1)
    unnamed = type("Unnamed", (Method,), {})  # no ``name``: the class name says which one
    with pytest.raises(ParamError, match=r"^method Unnamed: unknown parameter"):
        unnamed(nu=1)
