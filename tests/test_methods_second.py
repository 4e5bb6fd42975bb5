"""FedBABU, MR-MTL and FedSM: each method's defining property, on the tiny federation."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from method_helpers import (
    assert_untouched_copy,
    exactly,
    make_client,
    run,
    state_of,
    tiny_federation,
    tiny_unet,
)
from torch import nn

from pflbench.client import Budget
from pflbench.messages import Message, Upload
from pflbench.methods.fedsm import (
    BANK,
    PERSONAL,
    SELECTOR,
    SelectorRouting,
    soft_pull,
)
from pflbench.methods.mrmtl import MEAN
from pflbench.partition import PartitionError
from pflbench.registry import get_method
from pflbench.state import clone_tree

SGD = {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0}
HEAD = ("head.weight", "head.bias")


def recording(base: type) -> type:
    """``base`` recording the client model at setup and at every ``eval_model`` call, the model
    it evaluates, and every server message (class-level lists)."""

    def setup(self, client):
        type(self).initial[client.id] = state_of(client.model)
        return base.setup(self, client)

    def eval_model(self, client):
        before = state_of(client.model)
        evaluated = base.eval_model(self, client)
        after = state_of(client.model)
        type(self).calls.append((client.id, before, state_of(evaluated), after))
        type(self).states[client.id] = clone_tree(client.state)
        type(self).evaluated[client.id] = evaluated
        return evaluated

    def aggregate(self, uploads, round):
        out = base.aggregate(self, uploads, round)
        type(self).messages.append((dict(uploads), out))
        return out

    attrs = {
        "initial": {},
        "calls": [],
        "states": {},
        "evaluated": {},
        "messages": [],
        "setup": setup,
        "eval_model": eval_model,
        "aggregate": aggregate,
    }
    return type(f"Rec{base.__name__}", (base,), attrs)


# FedBABU -----------------------------------------------------------------------------------------


def test_fedbabu_head_stays_at_its_init_in_training_and_is_fine_tuned_only_at_evaluation():
    cls = recording(get_method("fedbabu"))
    _, out = run(tiny_federation(), cls(finetune_epochs=2), rounds=2)
    _, avg = run(tiny_federation(), "fedavg", rounds=2)
    init = next(iter(cls.initial.values()))
    assert len(cls.calls) == 3 * 3  # 3 clients × (2 evaluation rounds + the final evaluation)
    for cid, before, evaluated, after in cls.calls:
        for k in HEAD:
            assert torch.equal(before[k], init[k]), (cid, k)  # never trained, never averaged
            assert not torch.equal(evaluated[k], init[k]), (cid, k)  # fine-tuned at evaluation
        assert not torch.equal(before["encoder.0.conv1.weight"], init["encoder.0.conv1.weight"])
        for k in before:  # the fine-tuning worked on a copy
            assert torch.equal(before[k], after[k]), (cid, k)
    bodies = [c[1] for c in cls.calls[-3:]]  # after the last aggregation: one averaged body
    for k, v in bodies[0].items():
        if k not in HEAD and v.is_floating_point():
            assert torch.equal(v, bodies[1][k]) and torch.equal(v, bodies[2][k]), k
    # 7 training images a site: 2 fine-tuning epochs at 9 evaluations
    assert out.info["budget"]["finetune"] == 9 * 2 * 7
    assert out.info["budget"]["local"] == avg.info["budget"]["local"]
    assert out.info["partition_sizes"]["personal"] > 0  # the head is not sent


def test_fedbabu_local_update_never_moves_the_head_even_with_weight_decay():
    client = make_client(tiny_unet(), optimizer="sgd", weight_decay=0.5, momentum=0.9)
    before = state_of(client.model)
    get_method("fedbabu")().local_update(client)
    after = state_of(client.model)
    for k in HEAD:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["encoder.0.conv1.weight"], after["encoder.0.conv1.weight"])
    assert all(p.requires_grad for p in client.model.parameters())  # the freeze did not leak


def test_fedbabu_head_only_fine_tuning_keeps_the_body_parameters():
    client = make_client(tiny_unet())
    before = dict(client.model.named_parameters())
    before = {k: v.detach().clone() for k, v in before.items()}
    tuned = get_method("fedbabu")(finetune="head", finetune_epochs=1).eval_model(client)
    for k, v in tuned.named_parameters():
        assert torch.equal(v, before[k]) != (k in HEAD), k


def test_fedbabu_refuses_a_model_without_a_declared_head():
    model = tiny_unet()
    model.head_path = ""
    with pytest.raises(PartitionError, match="^fedbabu: model .* declares no 'head_path'"):
        get_method("fedbabu")().partition(model)
    # the training and the head-only fine-tuning find the head themselves: the same refusal
    client = make_client(model)
    with pytest.raises(PartitionError, match="^fedbabu: model .* declares no 'head_path'"):
        get_method("fedbabu")().local_update(client)
    with pytest.raises(PartitionError, match="^fedbabu: model .* declares no 'head_path'"):
        get_method("fedbabu")(finetune="head").eval_model(client)


def test_fedbabu_refuses_a_head_without_parameters_naming_it():
    model = tiny_unet()
    model.head = nn.Identity()
    text = (
        "fedbabu: the personal part (head 'head') of model UNet is empty, so fedbabu would "
        "silently be FedAvg; use a model where it is not empty"
    )
    with pytest.raises(PartitionError, match=exactly(text)):
        get_method("fedbabu")().partition(model)


def test_fedbabu_default_fine_tuning_trains_body_and_head_on_a_copy_for_its_epochs():
    """finetune="all" (the paper's and PFLlib's fine_tune(['base', 'head'])): every parameter of
    the evaluated copy moves; τ_f epochs over the site's images are counted as finetune."""
    budget = Budget()
    client = make_client(tiny_unet(), budget=budget)
    before = state_of(client.model)
    tuned = get_method("fedbabu")(finetune_epochs=2).eval_model(client)
    for k, v in tuned.named_parameters():
        assert not torch.equal(v, before[k]), k
    assert budget.samples == {"finetune": 2 * len(client.train_data.images)}
    for k, v in client.model.state_dict().items():  # the client's own model is untouched
        assert torch.equal(v, before[k]), k


def test_fedbabu_head_only_fine_tuning_runs_its_own_epochs_and_state():
    """finetune="head": τ_f epochs (not the suite's), counted as finetune, with the optimizer
    state of the fine-tuning kept apart from training's under optimizer_state: persist."""
    budget = Budget()
    client = make_client(tiny_unet(), budget=budget, persist_optimizer=True, epochs=1)
    get_method("fedbabu")(finetune="head", finetune_epochs=3).eval_model(client)
    assert budget.samples == {"finetune": 3 * len(client.train_data.images)}
    assert set(client.state) == {"_optimizer/finetune"}


def test_fedbabu_with_zero_fine_tuning_epochs_evaluates_an_untouched_copy():
    budget = Budget()
    client = make_client(tiny_unet(), budget=budget, persist_optimizer=True)
    tuned = get_method("fedbabu")(finetune_epochs=0).eval_model(client)
    assert_untouched_copy(tuned, client, budget)  # no pass, no optimizer made


# MR-MTL ------------------------------------------------------------------------------------------


def test_mrmtl_with_lambda_zero_is_local():
    data = tiny_federation()
    _, mr = run(data, get_method("mrmtl")(lam=0.0), rounds=3)
    _, loc = run(data, "local", rounds=3)
    pd.testing.assert_frame_equal(mr.rounds, loc.rounds)
    pd.testing.assert_frame_equal(mr.cases, loc.cases)
    assert mr.info["bytes_up"] > 0 and loc.info["bytes_up"] == 0


def test_mrmtl_server_state_is_the_weighted_mean_of_the_personal_models():
    cls = recording(get_method("mrmtl"))
    data = tiny_federation(sizes=[6, 10, 14])  # unequal sizes: a plain mean would differ
    fed, _ = run(data, cls(lam=0.5), rounds=2)
    n = {cid: len(fed.by_id[cid].train) for cid in fed.ids}
    assert len(set(n.values())) == 3
    # at round 2's evaluation every client's model is its vᵢ after round 2's update
    personal = {cid: before for cid, before, _, _ in cls.calls[3:6]}
    _, message = cls.messages[-1]
    params = {k for k, _ in tiny_unet().named_parameters()}
    assert set(message.entries) == params  # parameters only: buffers stay with the client
    for k, v in message.entries.items():
        mean = sum(n[c] * personal[c][k].double() for c in n) / sum(n.values())
        assert torch.allclose(v.double(), mean, atol=1e-6), k
        assert not torch.equal(personal["site0"][k], v)  # v̄ never overwrote vᵢ


def test_mrmtl_pulls_towards_the_received_mean_not_the_clients_own_model():
    model = tiny_unet()
    anchor = {k: v.detach() + 0.5 for k, v in model.named_parameters()}
    moved = {}
    for lam in (0.0, 2.0):
        client = make_client(tiny_unet(), state={MEAN: anchor}, epochs=None, steps=1, **SGD)
        get_method("mrmtl")(lam=lam).local_update(client)
        moved[lam] = dict(client.model.named_parameters())
    lr = 1e-2  # make_client's rate; same batch and gradient in both runs (same seed streams)
    for k, p in model.named_parameters():
        expected = -lr * 2.0 * (p.detach() - anchor[k])  # −lr·λ·(v − v̄)
        assert torch.allclose(moved[2.0][k] - moved[0.0][k], expected, atol=1e-6), k


def test_mrmtl_receive_stores_a_copy_of_the_mean_as_the_next_anchor():
    model = tiny_unet()
    entries = {k: v.detach() + 0.25 for k, v in model.named_parameters()}
    client = make_client(tiny_unet())
    own = state_of(client.model)
    get_method("mrmtl")().receive(client, Message(entries=entries))
    stored = client.state[MEAN]
    assert set(stored) == set(entries)
    for k, v in entries.items():
        assert torch.equal(stored[k], v) and stored[k].data_ptr() != v.data_ptr(), k
    for k, v in client.model.state_dict().items():  # v̄ is an anchor: vᵢ is not overwritten
        assert torch.equal(v, own[k]), k


# FedSM -------------------------------------------------------------------------------------------


def _models(seed: int, m: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"c{i}": {"w": torch.randn(4, generator=g), "b": torch.randn(2, generator=g)}
        for i in range(m)
    }


def test_soft_pull_with_lambda_one_returns_each_clients_own_model():
    models = _models(0)
    out = soft_pull(models, 1.0)
    for c in models:
        for k in models[c]:
            assert torch.equal(out[c][k], models[c][k]), (c, k)


def test_soft_pull_mixes_own_and_the_mean_of_the_others_by_hand():
    models = _models(1)
    out = soft_pull(models, 0.7)
    w = {c: models[c]["w"] for c in models}
    assert torch.allclose(out["c0"]["w"], 0.7 * w["c0"] + 0.15 * (w["c1"] + w["c2"]))
    assert torch.allclose(out["c2"]["w"], 0.7 * w["c2"] + 0.15 * (w["c0"] + w["c1"]))
    one = {"c0": models["c0"]}
    assert torch.equal(soft_pull(one, 0.7)["c0"]["w"], models["c0"]["w"])


def _upload(seed: int, weight: float) -> Upload:
    m = _models(seed, 1)["c0"]
    g = {k: v + 1 for k, v in m.items()}
    return Upload(
        entries=g,
        weight=weight,
        extras={
            "personal": m,
            "selector": g,
            "exp_avg": {"0": m["w"]},
            "exp_avg_sq": {"0": g["w"]},
        },
    )


def test_fedsm_aggregate_sends_each_client_its_own_pull_and_everyone_the_bank():
    method = get_method("fedsm")(lam=1.0)
    method.setup_server({"b": 1, "a": 1})  # labels follow sorted ids: a → 0, b → 1
    ups = {"a": _upload(0, 1.0), "b": _upload(1, 3.0)}
    msgs = method.aggregate(ups, 1)
    assert set(msgs) == {"a", "b"}
    for cid, u in ups.items():
        for k, v in u.extras["personal"].items():
            assert torch.equal(msgs[cid].extras["personal"][k], v)  # λ = 1: its own model
    bank = msgs["a"].extras["bank"]
    assert torch.equal(bank["0"]["w"], ups["a"].extras["personal"]["w"])
    assert torch.equal(bank["1"]["w"], ups["b"].extras["personal"]["w"])
    mean = (ups["a"].entries["w"] + 3 * ups["b"].entries["w"]) / 4
    assert torch.allclose(msgs["b"].entries["w"], mean)  # w: the weighted FedAvg
    assert torch.allclose(msgs["b"].extras["selector"]["w"], mean)  # the selector too


class _Const(nn.Module):
    """Outputs a constant map (tells which model produced a prediction)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 2, *x.shape[2:]), self.value)


class _FixedSelector(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def test_selector_routing_follows_the_official_threshold_rule():
    logits = torch.tensor([[0.0, 10.0, 0.0], [1.0, 1.2, 0.8], [10.0, 0.0, 0.0], [0.0, 0.0, 10.0]])
    experts = [_Const(1.0), _Const(2.0), None]  # site 2 has no personalized model yet
    router = SelectorRouting(_FixedSelector(logits), experts, _Const(-1.0), threshold=0.9)
    out = router(torch.zeros(4, 1, 4, 4))
    # image 0 → site 1 (confident); image 1 → global (unsure); image 2 → site 0;
    # image 3 → global (its site has no model)
    assert out[:, 0, 0, 0].tolist() == [2.0, -1.0, 1.0, -1.0]


def test_fedsm_run_trains_three_models_counts_each_pass_and_routes_at_evaluation():
    cls = recording(get_method("fedsm"))
    data = tiny_federation()
    fed, out = run(data, cls(), rounds=2)
    _, avg = run(data, "fedavg", rounds=2)
    budget = out.info["budget"]
    assert budget["local"] == avg.info["budget"]["local"]
    assert budget["personal"] == budget["local"]  # pᵢ: the same budget as w
    assert budget["selector"] == 3 * 2 * 7  # one epoch of 7 images, 3 clients, 2 rounds
    assert out.info["bytes_down"] > 3 * avg.info["bytes_down"]  # w + pᵢ + the bank of 3 pⱼ
    state = cls.states["site1"]
    assert state["setup"] == {"label": 1, "sites": 3}
    assert sorted(state[BANK]) == ["0", "1", "2"]
    evaluated = cls.evaluated["site1"]
    assert isinstance(evaluated, SelectorRouting) and len(evaluated.experts) == 3
    # the bank entry of this site is its own SoftPull model, also kept as pᵢ
    for k, v in state[BANK]["1"].items():
        assert torch.equal(v, state[PERSONAL][k]), k


def test_fedsm_clients_hold_the_averaged_selector_and_personal_inference_evaluates_p_i():
    data = tiny_federation()
    cls = recording(get_method("fedsm"))
    fed, _ = run(data, cls(selector_epochs=3, inference="personal"), rounds=1)
    states = [cls.states[cid] for cid in fed.ids]
    sel = [s[SELECTOR] for s in states]
    for k in sel[0]:  # after the round all hold the averaged selector
        assert torch.equal(sel[0][k], sel[1][k]) and torch.equal(sel[0][k], sel[2][k])
    # inference="personal" evaluates pᵢ, sends no bank
    assert all(BANK not in s for s in states)
    cid, _, evaluated, _ = cls.calls[-1]
    for k, v in evaluated.items():
        assert torch.equal(v, cls.states[cid][PERSONAL][k]), k


def test_fedsm_lone_client_selector_step_uses_adam_and_counts_selector_budget():
    budget = Budget()
    client = make_client(tiny_unet(), budget=budget)
    m = get_method("fedsm")()
    m.receive_setup(client, {"label": 0, "sites": 2})
    start = {k: v.clone() for k, v in client.state[SELECTOR].items()}
    m.train_selector(client)
    assert budget.samples == {"selector": 10}
    assert any(not torch.equal(start[k], v) for k, v in client.state[SELECTOR].items())
    assert "exp_avg" in next(iter(client.state["fedsm/selector_opt"]["state"].values()))


def test_fedsm_selector_init_is_shared_by_clients_with_the_same_initial_model():
    m = get_method("fedsm")()
    states = []
    for seed, site in [(0, 0), (0, 1), (1, 0)]:
        client = make_client(tiny_unet(seed), site=site)
        m.receive_setup(client, {"label": site, "sites": 3})
        states.append(client.state[SELECTOR])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k  # same init model: same selector
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])  # follows the seed
    assert states[0]["classifier.weight"].shape[0] == 3


@pytest.mark.slow
def test_fedsm_disk_store_gives_the_same_result_as_memory():
    # FedSM keeps the most client state (pᵢ, selector, its Adam state, the bank of pⱼ)
    data = tiny_federation()
    _, a = run(data, "fedsm", rounds=2, store="memory")
    _, b = run(data, "fedsm", rounds=2, store="disk")
    pd.testing.assert_frame_equal(a.rounds, b.rounds)
    pd.testing.assert_frame_equal(a.cases, b.cases)
