"""FedAS's rules, each checked against a value computed here from the definition (Yang, Huang,
Ye, CVPR 2024; ``methods/fedas.py``): the NLL of the empirical Fisher, the pixel classes a model
reads, the per-class prototypes, the alignment loss, one SGD alignment step at ``align_lr``, the
Fisher trace over one epoch, the weights trᵢ / Σⱼ trⱼ with the uploads' masks, the extra passes
under their own budget labels, and the refusals word for word (issue 22: fedas survivors).

Labels 0, 1 and 2 appear together wherever a one-channel model reads them, so that the
foreground rule ``label > 0`` differs from ``>= 0``, ``> 1`` and from the raw labels.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from method_helpers import exactly, make_client, state_of, tiny_federation, tiny_unet
from torch import nn

from pflbench.client import Budget, Client
from pflbench.data import SiteData
from pflbench.messages import Message, Upload
from pflbench.methods.fedas import TRACE, alignment_loss, fisher_trace, nll, pixel_classes
from pflbench.models import UNet
from pflbench.partition import PartitionError
from pflbench.registry import get_method
from pflbench.training import Diverged

T = torch.tensor


def _three_label_site(n: int = 10) -> SiteData:
    """The tiny federation's first site (or ``n`` images of blobs) with the left half of every
    blob relabelled 2: each image holds labels 0, 1 and 2."""
    base = tiny_federation(n=n).sites[0]
    labels = base.labels.clone()
    labels[..., :8][labels[..., :8] == 1] = 2
    assert set(labels.unique().tolist()) == {0, 1, 2}
    return SiteData(name=base.name, images=base.images, labels=labels, case_ids=list(base.case_ids))


def _client(model: nn.Module, site: SiteData, budget: Budget | None = None, **work) -> Client:
    """A round-2 client over ``site`` with its batches in order."""
    return make_client(model, budget=budget, data=site, round=2, **{"shuffle": False, **work})


def _body_names(model: nn.Module) -> list[str]:
    """FedAS's shared part by definition: every parameter outside the 1×1 head."""
    return [n for n, _ in model.named_parameters() if not n.startswith("head.")]


# NLL and pixel classes ---------------------------------------------------------------------------


def test_nll_with_one_channel_is_the_bernoulli_likelihood_of_label_above_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 3, 4)
    labels = T([[[0, 1, 2, 0], [2, 2, 1, 0], [0, 0, 1, 2]]] * 2)
    z, t = logits[:, 0], (labels != 0).float()
    # −[t log σ(z) + (1 − t) log(1 − σ(z))], averaged over pixels
    hand = -(t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z)).mean()
    assert float(nll(logits, labels)) == pytest.approx(float(hand), rel=1e-6)
    assert float(nll(logits, labels)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(z, t)), rel=1e-6
    )


@pytest.mark.parametrize("channels", [2, 3])
def test_nll_with_several_channels_is_the_pixelwise_cross_entropy(channels):
    torch.manual_seed(channels)
    logits = torch.randn(2, channels, 3, 4)
    labels = torch.randint(0, channels, (2, 3, 4))
    logp = logits.log_softmax(1)
    hand = -sum(
        float(logp[n, labels[n, i, j], i, j]) for n in range(2) for i in range(3) for j in range(4)
    ) / (2 * 3 * 4)
    assert float(nll(logits, labels)) == pytest.approx(hand, rel=1e-6)
    assert float(nll(logits, labels)) == pytest.approx(
        float(F.cross_entropy(logits, labels)), rel=1e-6
    )


@pytest.mark.parametrize(
    "channels, expected",
    [(1, [0, 1, 1, 0, 1]), (2, [0, 1, 2, 0, 2]), (3, [0, 1, 2, 0, 2])],
)
def test_pixel_classes_are_foreground_for_one_channel_and_the_labels_otherwise(channels, expected):
    labels = T([0, 1, 2, 0, 2])
    got = pixel_classes(channels, labels)
    assert got.dtype == torch.int64
    assert got.tolist() == expected


# alignment loss ----------------------------------------------------------------------------------


def test_alignment_loss_sums_the_class_mses_over_the_classes_present_with_a_prototype():
    torch.manual_seed(0)
    features = torch.randn(1, 2, 2, 3)  # N×C×H×W, C = 2
    classes = T([[[0, 1, 2], [2, 0, 1]]])
    # class 1 is present without a prototype; class 5 has a prototype but is absent
    protos = {0: T([0.5, -1.0]), 2: T([2.0, 0.25]), 5: T([9.0, 9.0])}
    per_class = {}
    for c in (0, 2):
        sq = [
            float((features[0, k, i, j] - protos[c][k]) ** 2)
            for i in range(2)
            for j in range(3)
            if classes[0, i, j] == c
            for k in range(2)
        ]
        per_class[c] = sum(sq) / len(sq)
    got = alignment_loss(features, classes, protos)
    assert float(got) == pytest.approx(per_class[0] + per_class[2], rel=1e-6)
    # one class only: its own MSE
    only = alignment_loss(features, classes, {2: protos[2]})
    assert float(only) == pytest.approx(per_class[2], rel=1e-6)
    # no class present has a prototype: nothing to align
    assert alignment_loss(features, classes, {5: protos[5]}) is None


# prototypes --------------------------------------------------------------------------------------


def _hand_prototypes(model: nn.Module, site: SiteData, batch: int, foreground: bool):
    """Σ features / count per pixel class over the batches in order, each batch's forward in
    train mode (BN on that batch's statistics) on a copy of the model."""
    probe = copy.deepcopy(model).train()
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    with torch.no_grad():
        for lo in range(0, len(site.images), batch):
            f = probe.feature_forward(site.images[lo : lo + batch]).movedim(1, -1)
            y = site.labels[lo : lo + batch]
            cls = (y > 0).long() if foreground else y
            for c in (0, 1, 2):
                sel = cls == c
                if sel.any():
                    sums[c] = sums.get(c, 0) + f[sel].sum(0)
                    counts[c] = counts.get(c, 0) + int(sel.sum())
    return {c: sums[c] / counts[c] for c in sums}


def test_prototypes_of_a_one_channel_model_average_foreground_features_over_every_batch():
    site = _three_label_site()
    model = tiny_unet(0)
    own = state_of(model)
    client = _client(model, site, batch_size=4)  # 10 images: batches of 4, 4, 2
    protos, channels = get_method("fedas")().prototypes(client, model)
    assert channels == 1
    expected = _hand_prototypes(tiny_unet(0), site, 4, foreground=True)
    assert set(protos) == set(expected) == {0, 1}
    for c in expected:
        assert torch.allclose(protos[c], expected[c], atol=1e-5), c
    # the probe's train-mode BN moved none of the model's running statistics
    assert all(torch.equal(v, own[k]) for k, v in state_of(model).items())


def test_prototypes_of_a_three_channel_model_are_per_label():
    site = _three_label_site()
    torch.manual_seed(0)
    model = UNet(1, 3, base=4, depth=2)
    client = _client(model, site, batch_size=4)
    protos, channels = get_method("fedas")().prototypes(client, model)
    assert channels == 3
    expected = _hand_prototypes(model, site, 4, foreground=False)
    assert set(protos) == {0, 1, 2}
    for c in expected:
        assert torch.allclose(protos[c], expected[c], atol=1e-5), c


# alignment ---------------------------------------------------------------------------------------


def test_alignment_is_one_sgd_step_at_align_lr_on_the_received_body_towards_the_prototypes():
    site = _three_label_site(n=6)
    model = tiny_unet(0)
    own = state_of(model)
    glob = state_of(tiny_unet(1))
    body = _body_names(model)
    lr = 0.05
    client = _client(model, site, batch_size=6)  # one batch, one epoch: one step
    method = get_method("fedas")(align_lr=lr, align_epochs=1)
    method.align_and_load(client, Message(entries={k: glob[k] for k in body}))

    # by hand: prototypes of the client's own model (one-channel: foreground = label > 0)
    protos = _hand_prototypes(tiny_unet(0), site, 6, foreground=True)
    aligned = tiny_unet(0)
    aligned.load_state_dict({**own, **{k: glob[k] for k in body}})
    aligned.train()
    f = aligned.feature_forward(site.images).movedim(1, -1)
    fg = site.labels > 0
    loss = F.mse_loss(f[~fg], protos[0].expand_as(f[~fg])) + F.mse_loss(
        f[fg], protos[1].expand_as(f[fg])
    )
    params = dict(aligned.named_parameters())
    grads = torch.autograd.grad(loss, [params[k] for k in body])
    after = state_of(client.model)
    for k, g in zip(body, grads, strict=True):
        assert torch.allclose(after[k], glob[k] - lr * g, rtol=1e-4, atol=1e-6), k
    # the head and every buffer (BN statistics) stay the client's own
    for k in own:
        if k not in body:
            assert torch.equal(after[k], own[k]), k


def test_a_non_finite_alignment_loss_is_refused_naming_the_client_round_and_pass():
    site = _three_label_site(n=6)
    model = tiny_unet(0)
    glob = state_of(tiny_unet(1))
    body = _body_names(model)
    glob[body[0]].fill_(float("nan"))  # the first convolution of the received body
    client = _client(model, site, batch_size=6)
    with pytest.raises(
        Diverged, match=exactly("non-finite loss (nan) in client site0 round 2 (fedas-align)")
    ):
        get_method("fedas")().align_and_load(client, Message(entries={k: glob[k] for k in body}))


# Fisher trace ------------------------------------------------------------------------------------


def _hand_trace(model: nn.Module, site: SiteData, batch: int) -> float:
    """Σ over the batches of one epoch of ‖∇θ NLL(batch)‖², eval mode, every parameter."""
    probe = copy.deepcopy(model).eval()
    params = list(probe.parameters())
    total = 0.0
    for lo in range(0, len(site.images), batch):
        x, y = site.images[lo : lo + batch], site.labels[lo : lo + batch]
        logits = probe(x)[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, (y > 0).float())
        total += sum(float(g.square().sum()) for g in torch.autograd.grad(loss, params))
    return total


def test_fisher_trace_is_one_epoch_even_when_the_suite_trains_two():
    site = tiny_federation().sites[0]
    budget = Budget()
    client = _client(tiny_unet(0), site, budget=budget, batch_size=4, epochs=2)
    got = fisher_trace(client.model, client, "fedas-fisher")
    assert got == pytest.approx(_hand_trace(tiny_unet(0), site, 4), rel=1e-5)
    assert budget.samples == {"fedas-fisher": 10}


def test_fisher_trace_takes_the_gradient_of_each_whole_batch_even_above_32_images():
    site = tiny_federation(n=34).sites[0]
    client = _client(tiny_unet(0), site, batch_size=34)  # one batch of 34
    got = fisher_trace(client.model, client, "fedas-fisher")
    assert got == pytest.approx(_hand_trace(tiny_unet(0), site, 34), rel=1e-5)


# extra passes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("align_epochs", [1, 3])
def test_a_round_counts_one_prototype_pass_align_epochs_and_one_fisher_pass(align_epochs):
    budget = Budget()
    client = make_client(tiny_unet(0), budget=budget, round=2, epochs=2)
    method = get_method("fedas")(align_epochs=align_epochs)
    glob = state_of(tiny_unet(1))
    method.receive(client, Message(entries={k: glob[k] for k in _body_names(client.model)}))
    method.local_update(client)
    assert budget.samples == {
        "fedas-prototypes": 10,
        "fedas-align": 10 * align_epochs,
        "local": 20,
        "fedas-fisher": 10,
    }


def test_prototypes_alone_count_one_pass_when_the_suite_trains_two():
    budget = Budget()
    client = make_client(tiny_unet(0), budget=budget, epochs=2)
    get_method("fedas")().prototypes(client, client.model)
    assert budget.samples == {"fedas-prototypes": 10}


# server ------------------------------------------------------------------------------------------


def test_aggregation_weights_each_shared_element_by_the_traces_of_its_sharers():
    ups = {
        "a": Upload(
            entries={"w": T([1.0, 2.0])},
            weight=1.0,
            masks={"w": T([True, False])},
            extras={TRACE: 3.0},
        ),
        "b": Upload(entries={"w": T([10.0, 20.0])}, weight=5.0, extras={TRACE: 1.0}),
    }
    msg = get_method("fedas")().aggregate(ups, 1)
    # element 0: (3·1 + 1·10) / 4; element 1: only b shares it
    assert torch.allclose(msg.entries["w"], T([3.25, 20.0]))


def test_all_zero_traces_are_refused_word_for_word():
    ups = {
        "a": Upload(entries={"w": T([1.0])}, weight=1.0, extras={TRACE: 0.0}),
        "b": Upload(entries={"w": T([2.0])}, weight=1.0, extras={TRACE: 0.0}),
    }
    text = (
        "fedas round 4: every uploaded Fisher trace is zero ({'a': 0.0, 'b': 0.0}); the "
        "aggregation weights tr_i / Σ tr_j are undefined"
    )
    with pytest.raises(ValueError, match=exactly(text)):
        get_method("fedas")().aggregate(ups, 4)


# refusals ----------------------------------------------------------------------------------------


class _Headless(nn.Module):
    """Features and logits, but no declared head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 2, 3, padding=1)
        self.out = nn.Conv2d(2, 1, 1)

    def feature_forward(self, x):
        return self.body(x)

    def forward(self, x):
        return self.out(self.body(x))


class _EmptyHead(_Headless):
    """Declares a head that holds no parameter."""

    head_path = "act"

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()


class _Featureless(nn.Module):
    """A declared head, no ``feature_forward``."""

    head_path = "head"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 1, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_model_without_a_declared_head_is_refused_naming_fedas_and_the_model():
    text = (
        "fedas: model _Headless declares no 'head_path'; fedas partitions the model by that "
        "declared module path and cannot guess it from parameter names"
    )
    method = get_method("fedas")()
    with pytest.raises(PartitionError, match=exactly(text)):
        method.partition(_Headless())
    client = make_client(_Headless())
    with pytest.raises(PartitionError, match=exactly(text)):
        method.setup(client)
    with pytest.raises(PartitionError, match=exactly(text)):
        method.prototypes(client, client.model)


def test_a_head_without_parameters_is_refused_as_silently_fedavg():
    text = (
        "fedas: the personal part (head) of model _EmptyHead is empty, so fedas would silently "
        "be FedAvg; use a model where it is not empty"
    )
    with pytest.raises(PartitionError, match=exactly(text)):
        get_method("fedas")().partition(_EmptyHead())


def test_a_model_without_feature_forward_is_refused_before_training():
    text = (
        "fedas: model _Featureless has no feature_forward(x); "
        "FedAS aligns the body features entering the head"
    )
    with pytest.raises(TypeError, match=exactly(text)):
        get_method("fedas")().setup(make_client(_Featureless()))
