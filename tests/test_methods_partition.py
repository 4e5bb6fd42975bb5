"""Partition methods: FedBN, SiloBN, FedPer, FedRep, LG-FedAvg keep exactly their part local."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_protocol
from method_helpers import (
    capturing,
    floating,
    make_client,
    run,
    state_of,
    tiny_federation,
    tiny_unet,
)
from torch import nn

from pflbench.client import Budget
from pflbench.data import make_splits
from pflbench.engine import Federation
from pflbench.partition import PartitionError, norm_keys
from pflbench.registry import get_method
from pflbench.suite import ModelSpec

NO_NORM = ModelSpec(name="unet", options={"base": 4, "depth": 2, "norm": "none"})


def _run_captured(name: str, **params):
    cls = capturing(get_method(name))
    _, out = run(tiny_federation(), cls(**params), rounds=2)
    return cls, out


@pytest.fixture(scope="module")
def runs():
    """One short run per partition method (module-scoped: they are shared by several tests)."""
    torch.set_num_threads(1)
    return {n: _run_captured(n) for n in ("fedbn", "silobn", "fedper", "fedrep", "lgfedavg")}


def _split_by_agreement(models: dict, keys: list[str]) -> tuple[set[str], set[str]]:
    """Floating keys equal on every client, and keys that differ somewhere."""
    same, differ = set(), set()
    ids = sorted(models)
    for k in keys:
        if all(torch.equal(models[ids[0]][k], models[c][k]) for c in ids[1:]):
            same.add(k)
        else:
            differ.add(k)
    return same, differ


def _check_local_part(models: dict, personal: set[str]) -> None:
    keys = list(floating(next(iter(models.values()))))
    same, differ = _split_by_agreement(models, keys)
    assert personal, "the test needs a non-empty personal part"
    assert differ == personal, (sorted(differ - personal), sorted(personal - differ))
    assert same == set(keys) - personal


# FedBN ------------------------------------------------------------------------------------------


def _two_clients(**options):
    return make_client(tiny_unet(0, **options), site=0), make_client(
        tiny_unet(1, **options), site=1
    )


def _exchange(method, a, b):
    """One upload / aggregate / receive cycle between two lone clients with different models."""
    before = {c.id: state_of(c.model) for c in (a, b)}
    ups = {c.id: method.fresh().upload(c) for c in (a, b)}
    msg = method.aggregate(ups, 1)
    for c in (a, b):
        method.fresh().receive(c, msg)
    return before, ups


def test_fedbn_keeps_norm_entries_bit_identical_and_averages_the_rest():
    method = get_method("fedbn")()
    a, b = _two_clients()
    with torch.no_grad():  # make running statistics differ as well
        for c, v in ((a, 0.3), (b, 1.7)):
            for m in c.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.fill_(v)
    before, ups = _exchange(method, a, b)
    norms = set(norm_keys(a.model))
    wa = ups[a.id].weight / (ups[a.id].weight + ups[b.id].weight)
    checked_norm = checked_avg = 0
    for k, va in before[a.id].items():
        vb = before[b.id][k]
        if k in norms:
            assert torch.equal(a.model.state_dict()[k], va), k
            assert torch.equal(b.model.state_dict()[k], vb), k
            checked_norm += va.is_floating_point()
        elif va.is_floating_point():
            avg = wa * va.double() + (1 - wa) * vb.double()
            for c in (a, b):
                assert torch.allclose(c.model.state_dict()[k].double(), avg, atol=1e-6), k
            assert not torch.equal(va, vb), k  # so the average is a real change
            checked_avg += 1
    assert checked_norm > 0 and checked_avg > 0
    assert all(k not in norms for k in ups[a.id].entries)  # norm layers are never sent


def test_fedbn_run_keeps_norm_layers_local_and_shares_the_rest(runs):
    cls, _ = runs["fedbn"]
    personal = {k for k in norm_keys(tiny_unet()) if not k.endswith("num_batches_tracked")}
    _check_local_part(cls.models, personal)


def test_fedbn_localizes_instancenorm_affine_parameters():
    model = tiny_unet(norm="instance")
    part = get_method("fedbn")().partition(model)
    inorm = [n for n, m in model.named_modules() if isinstance(m, nn.InstanceNorm2d)]
    assert inorm
    for n in inorm:
        assert part[f"{n}.weight"] is False and part[f"{n}.bias"] is False
    assert part["encoder.0.conv1.weight"] is True and part["head.weight"] is True


def test_fedbn_refuses_a_model_without_norm_layers():
    with pytest.raises(
        PartitionError, match=r"fedbn: the personal part \(normalization layers\) of model UNet"
    ):
        get_method("fedbn")().partition(tiny_unet(norm="none"))
    data = tiny_federation()
    proto = fast_protocol(rounds=1)
    fed = Federation(data, make_splits(data), get_method("fedbn")(), NO_NORM, proto, seed=0)
    with pytest.raises(PartitionError, match="fedbn"):
        fed.run()
    assert fed.budget.samples == {}  # refused in setup, before any training


# SiloBN -------------------------------------------------------------------------------------------


def test_silobn_shares_gamma_beta_but_not_running_statistics(runs):
    cls, _ = runs["silobn"]
    model = tiny_unet()
    stats = {
        f"{n}.{b}"
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for b in ("running_mean", "running_var")
    }
    _check_local_part(cls.models, stats)
    gamma = [k for k in norm_keys(model) if k.endswith(".weight")]
    assert gamma and all(k not in stats for k in gamma)  # γ/β fall in the shared set above


def test_silobn_refuses_a_model_without_running_statistics():
    for norm in ("group", "none"):
        with pytest.raises(
            PartitionError,
            match=r"silobn: the personal part \(normalization running statistics\) of model UNet",
        ):
            get_method("silobn")().partition(tiny_unet(norm=norm))


def test_silobn_selects_both_running_statistics_of_every_tracking_layer():
    from pflbench.methods.silobn import running_stat_keys

    # a norm layer at the model's root has no name prefix; nested ones are dotted
    assert running_stat_keys(nn.BatchNorm2d(3)) == ["running_mean", "running_var"]
    nested = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.InstanceNorm2d(2))
    assert running_stat_keys(nested) == ["1.running_mean", "1.running_var"]
    tracked = nn.Sequential(nn.InstanceNorm2d(2, track_running_stats=True))
    assert running_stat_keys(tracked) == ["0.running_mean", "0.running_var"]


# FedPer ------------------------------------------------------------------------------------------


def test_fedper_keeps_the_head_local(runs):
    cls, _ = runs["fedper"]
    _check_local_part(cls.models, {"head.weight", "head.bias"})


def test_fedper_decoder_variant_keeps_decoder_and_head_local():
    model = tiny_unet()
    part = get_method("fedper")(head="decoder").partition(model)
    personal = {
        k for k, v in part.items() if v is False and model.state_dict()[k].is_floating_point()
    }
    expected = {
        k
        for k, v in model.state_dict().items()
        if (k.startswith("decoder.") or k.startswith("head.")) and v.is_floating_point()
    }
    assert personal == expected and "encoder.0.conv1.weight" not in personal


class _EmptyHead(nn.Module):
    head_path = "head"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Identity()

    def forward(self, x):
        return self.head(self.body(x))


class _NoHeadPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 1, 3, padding=1)


@pytest.mark.parametrize("name", ["fedper", "fedrep"])
def test_head_methods_refuse_an_empty_or_undeclared_head(name):
    method = get_method(name)()
    with pytest.raises(PartitionError, match=rf"{name}.*_EmptyHead.*empty"):
        method.partition(_EmptyHead())
    with pytest.raises(PartitionError, match=rf"{name}.*_NoHeadPath.*head_path"):
        method.partition(_NoHeadPath())


# FedRep ------------------------------------------------------------------------------------------


def _head_body(model):
    head = {f"head.{n}" for n, _ in model.head.named_parameters()}
    params = dict(model.named_parameters())
    return head, set(params) - head


def _changed(before, model, names):
    now = dict(model.named_parameters())
    return {n for n in names if not torch.equal(before[n], now[n].detach())}


@pytest.mark.parametrize("cache_mb", [2048, 0])  # cached body features, and the full-forward path
def test_fedrep_head_phase_freezes_the_body(cache_mb):
    method = get_method("fedrep")(head_epochs=3, feature_cache_mb=cache_mb)
    budget = Budget()
    # two suite epochs: the cache is one pass whatever the suite's budget
    client = make_client(tiny_unet(), budget=budget, epochs=2)
    head, body = _head_body(client.model)
    before = state_of(client.model)
    method.train_head(client)
    assert _changed(before, client.model, body) == set()
    assert _changed(before, client.model, head) == head
    grads = dict(client.model.named_parameters())
    assert all(grads[n].grad is None or not grads[n].grad.any() for n in body)
    assert all(p.requires_grad for p in client.model.parameters())  # freeze did not leak
    n = client.num_train
    assert budget.samples == {"head": n if cache_mb else 3 * n}


def test_fedrep_body_phase_freezes_the_head():
    method = get_method("fedrep")()
    budget = Budget()
    client = make_client(tiny_unet(), budget=budget)
    head, body = _head_body(client.model)
    before = state_of(client.model)
    method.train_body(client)
    assert _changed(before, client.model, head) == set()
    assert _changed(before, client.model, body) == body
    grads = dict(client.model.named_parameters())
    assert all(grads[n].grad is None or not grads[n].grad.any() for n in head)
    assert all(p.requires_grad for p in client.model.parameters())
    assert budget.samples == {"local": client.num_train}


@pytest.mark.parametrize("cache_mb", [2048, 0])
def test_fedrep_keeps_head_and_body_optimizer_states_apart(cache_mb):
    """Under optimizer_state: persist each phase resumes its own Adam state across rounds."""
    client = make_client(tiny_unet(), persist_optimizer=True)
    method = get_method("fedrep")(head_epochs=2, feature_cache_mb=cache_mb)
    for _ in range(2):
        method.local_update(client)
    assert set(client.state) == {"_optimizer/main", "_optimizer/head"}
    head, body = _head_body(client.model)
    batches = 3  # 10 images, batch 4: 4 + 4 + 2

    def steps(key):
        return {int(s["step"]) for s in client.state[key]["state"].values()}

    assert len(client.state["_optimizer/head"]["state"]) == len(head)
    assert len(client.state["_optimizer/main"]["state"]) == len(body)
    assert steps("_optimizer/head") == {2 * 2 * batches}  # 2 rounds × 2 head epochs
    assert steps("_optimizer/main") == {2 * batches}  # 2 rounds × the suite's 1 epoch


def test_fedrep_cached_head_epochs_are_reproducible_whatever_the_global_rng():
    """The cached path shuffles with the client's own generator, not torch's global one."""
    out = []
    for global_seed in (0, 1):
        client = make_client(tiny_unet())
        torch.manual_seed(global_seed)
        get_method("fedrep")(head_epochs=3, feature_cache_mb=2048).train_head(client)
        out.append(state_of(client.model))
    for k in ("head.weight", "head.bias"):
        assert torch.equal(out[0][k], out[1][k]), k


class _Features(nn.Module):
    """Only what FedRep's cache rule reads: ``feature_forward`` and (optionally)
    ``feature_channels``."""

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()
        if channels is not None:
            self.feature_channels = channels

    def feature_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _site_of(n: int, side: int = 64):
    from pflbench.data import SiteData

    images = torch.zeros(n, 1, side, side)
    labels = torch.zeros(n, side, side, dtype=torch.long)
    return SiteData("site0", images, labels, [f"c{i}" for i in range(n)])


def test_fedrep_caches_features_exactly_when_they_fit_the_memory_budget():
    """N images of H×W pixels and C feature channels need N·H·W·C·4 bytes (float32): 16 images
    of 64×64 with C = 4 are exactly 1 MiB, which fits feature_cache_mb = 1; 17 do not."""
    fedrep = get_method("fedrep")(feature_cache_mb=1)
    fits = fedrep._cache_fits
    assert 16 * 64 * 64 * 4 * 4 == 2**20
    assert fits(make_client(tiny_unet(), data=_site_of(16)), _Features(4))
    assert not fits(make_client(tiny_unet(), data=_site_of(17)), _Features(4))
    assert not get_method("fedrep")(feature_cache_mb=0)._cache_fits(
        make_client(tiny_unet(), data=_site_of(1, side=2)), _Features(1)
    )
    small = make_client(tiny_unet(), data=_site_of(2, side=4))
    assert fits(small, _Features(1))  # one channel is a channel
    assert not fits(small, _Features(0))  # no declared channels: no cache
    assert not fits(small, _Features())
    assert not fits(small, nn.Conv2d(1, 1, 1))  # no feature_forward: the full forward pass


def test_fedrep_names_where_its_head_step_diverged_and_itself_in_refusals():
    from pflbench.training import Diverged

    bad = tiny_unet()
    with torch.no_grad():
        bad.head.bias.fill_(float("nan"))
    with pytest.raises(
        Diverged, match=r"^non-finite loss \(nan\) in client site0 round 3 \(head\)$"
    ):
        get_method("fedrep")(head_epochs=1).train_head(make_client(bad, round=3))
    headless = tiny_unet()
    headless.head_path = ""
    with pytest.raises(PartitionError, match=r"^fedrep: model UNet declares no 'head_path'"):
        get_method("fedrep")().train_head(make_client(headless))


def test_fedrep_cached_features_match_the_full_forward_head_step():
    """The cache is an optimisation: with one head epoch the two paths agree up to batch order."""
    init = state_of(tiny_unet())
    out = {}
    for cache_mb in (2048, 0):
        client = make_client(tiny_unet(), lr=1e-2)
        get_method("fedrep")(head_epochs=1, feature_cache_mb=cache_mb).train_head(client)
        out[cache_mb] = state_of(client.model)
    for k in ("head.weight", "head.bias"):
        moved = (out[0][k] - init[k]).abs().max()
        assert moved > 0, k
        assert (out[2048][k] - out[0][k]).abs().max() < 0.05 * moved, k
    for k, v in out[0].items():
        if "running" in k:  # one pass through the body either way
            assert torch.equal(out[2048][k], v), k


def test_fedrep_trains_head_then_body_and_keeps_the_head_local(runs):
    calls = []
    base = get_method("fedrep")

    class Spy(base):
        def train_head(self, client):
            calls.append("head")
            super().train_head(client)

        def train_body(self, client):
            calls.append("body")
            super().train_body(client)

    Spy().local_update(make_client(tiny_unet()))
    assert calls == ["head", "body"]
    cls, out = runs["fedrep"]
    _check_local_part(cls.models, {"head.weight", "head.bias"})
    assert out.info["budget"]["head"] > 0 and out.info["budget"]["local"] > 0


class _DeclaredDecoder(nn.Module):
    """A model whose decoder is not at the default path: it declares ``decoder_path``."""

    head_path = "head"
    decoder_path = "up"

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 2, 3, padding=1)
        self.up = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 1, 1)


class _ParameterFreeHead(nn.Module):
    head_path = "head"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Identity()


def test_fedper_decoder_variant_follows_the_declared_decoder_path():
    from pflbench.methods.fedper import head_keys

    model = _DeclaredDecoder()
    assert head_keys(model, "fedper") == ["head.weight", "head.bias"]
    assert head_keys(model, "fedper", "decoder") == [
        "up.weight",
        "up.bias",
        "head.weight",
        "head.bias",
    ]
    part = get_method("fedper")(head="decoder").partition(model)
    assert [k for k, shared in part.items() if not shared] == [
        "up.weight",
        "up.bias",
        "head.weight",
        "head.bias",
    ]
    with pytest.raises(
        PartitionError,
        match=r"^fedper: head='decoder' needs a decoder module, but model _ParameterFreeHead "
        r"has no module at 'decoder'$",
    ):
        head_keys(_ParameterFreeHead(), "fedper", "decoder")


def test_fedper_refuses_a_head_without_parameters_by_name():
    with pytest.raises(
        PartitionError, match=r"^fedper: the personal part \(head \(head\)\) of model"
    ):
        get_method("fedper")().partition(_ParameterFreeHead())


# LG-FedAvg ----------------------------------------------------------------------------------------


def test_lgfedavg_keeps_the_encoder_local(runs):
    cls, _ = runs["lgfedavg"]
    model = tiny_unet()
    encoder = {
        k
        for k, v in model.state_dict().items()
        if k.startswith("encoder.") and v.is_floating_point()
    }
    assert encoder
    _check_local_part(cls.models, encoder)


def test_lgfedavg_body_reading_shares_only_the_head():
    cls, _ = _run_captured("lgfedavg", local="body")
    model = tiny_unet()
    body = {
        k
        for k, v in model.state_dict().items()
        if not k.startswith("head.") and v.is_floating_point()
    }
    _check_local_part(cls.models, body)


def test_lgfedavg_refuses_an_undeclared_encoder():
    with pytest.raises(PartitionError, match=r"lgfedavg.*_NoHeadPath.*encoder_path"):
        get_method("lgfedavg")().partition(_NoHeadPath())


def test_shared_partition_helpers_keep_their_key_rules():
    from pflbench.methods._common import keys_of_module, local_partition

    model = tiny_unet()
    assert keys_of_module(model, "") == list(model.state_dict())  # the root: no "." prefix
    assert keys_of_module(model, "head") == ["head.weight", "head.bias"]
    part = local_partition(model, ["head.weight", "no.such.key"], "m", "the head")
    assert part["head.weight"] is False and "no.such.key" not in part
    with pytest.raises(PartitionError, match=r"^m: the personal part \(keys\) of model UNet is"):
        local_partition(model, ["no.such.key"], "m", "keys")  # unknown keys select nothing


class _WrongHeadPath(nn.Module):
    head_path = "nope"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 1, 3, padding=1)


def test_a_declared_path_without_a_module_is_refused_by_name():
    from pflbench.methods._common import declared_path

    with pytest.raises(
        PartitionError,
        match=r"^fedper: model _WrongHeadPath declares head_path='nope', but it has no module "
        r"at that path$",
    ):
        declared_path(_WrongHeadPath(), "head_path", "fedper")
    assert declared_path(tiny_unet(), "head_path", "fedper") == "head"
    empty = _WrongHeadPath()
    empty.head_path = ""  # an empty path would be the whole model: refused, not guessed
    with pytest.raises(PartitionError, match=r"declares no 'head_path'"):
        declared_path(empty, "head_path", "fedper")


def test_a_non_finite_step_names_where_it_happened():
    from pflbench.methods._common import step
    from pflbench.training import Diverged

    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.ones(1, 1)).sum() * float("nan")
    with pytest.raises(Diverged, match=r"^non-finite loss \(nan\) in client site3 round 2$"):
        step(opt, loss, "client site3 round 2")


# LG-FedAvg, direct (tests written from the surviving mutants of issue 22) -------------------------


@pytest.mark.parametrize("local, private", [("encoder", "encoder."), ("body", None)])
def test_lgfedavg_partition_is_exactly_the_declared_split(local, private):
    """Every entry is listed: shared (True) exactly outside the private part, the encoder
    (paper) or everything but the head (PFLlib's reading)."""
    model = tiny_unet()
    method = get_method("lgfedavg")(local=local)
    part = method.partition(model)
    rule = (lambda k: not k.startswith(private)) if private else (lambda k: k.startswith("head."))
    # integer buffers (num_batches_tracked) are local under every method
    shared = {k: v.is_floating_point() and rule(k) for k, v in model.state_dict().items()}
    assert part == shared
    assert any(shared.values()) and not all(shared.values())
    assert method.setup(make_client(tiny_unet())) is None


class _EmptyEncoder(nn.Module):
    encoder_path = "encoder"
    head_path = "head"

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Identity()
        self.head = nn.Conv2d(1, 1, 1)


class _HeadOnly(nn.Module):
    head_path = "head"

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, 1, 1)


def test_lgfedavg_refuses_an_empty_private_part_by_name():
    with pytest.raises(
        PartitionError,
        match=r"^lgfedavg: the personal part \(encoder at 'encoder'\) of model _EmptyEncoder is "
        r"empty, so lgfedavg would silently be FedAvg",
    ):
        get_method("lgfedavg")().partition(_EmptyEncoder())
    with pytest.raises(
        PartitionError,
        match=r"^lgfedavg: the personal part \(everything but the head at 'head'\) of model "
        r"_HeadOnly is empty",
    ):
        get_method("lgfedavg")(local="body").partition(_HeadOnly())
    with pytest.raises(
        PartitionError, match=r"^lgfedavg: model _NoHeadPath declares no 'head_path'"
    ):
        get_method("lgfedavg")(local="body").partition(_NoHeadPath())
    with pytest.raises(
        PartitionError, match=r"^lgfedavg: model _HeadOnly declares no 'encoder_path'"
    ):
        get_method("lgfedavg")().setup(make_client(_HeadOnly()))
