"""pflbench.training from its definitions (issue 22): the soft Dice and the BCE/CE + Dice loss,
the optimizer factory, the batch stream (epochs or steps, the short-batch merge, flips and rot90
drawn in albumentations' order), the divergence guard and its LossMeter, the fp16 scaler
registry and train_epochs. Each expected value is recomputed here by hand, not recorded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pflbench.data import SiteData
from pflbench.training import (
    Diverged,
    LossMeter,
    attach_scaler,
    backward_step,
    batch_stream,
    check_finite,
    divergence_guard,
    make_optimizer,
    per_sample_loss,
    scaler_of,
    segmentation_loss,
    soft_dice_loss,
    train_epochs,
)

# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def _dice_by_hand(probs: torch.Tensor, target: torch.Tensor, eps: float) -> float:
    """1 − mean over items and channels of (2·Σpt + ε) / (Σp + Σt + ε), with Python loops."""
    values = []
    for i in range(probs.shape[0]):
        for k in range(probs.shape[1]):
            p, t = probs[i, k].double(), target[i, k].double()
            values.append((2 * float((p * t).sum()) + eps) / (float(p.sum() + t.sum()) + eps))
    return 1.0 - sum(values) / len(values)


@pytest.mark.parametrize("eps", [1.0, 1e-6, 0.25])
def test_soft_dice_is_one_minus_the_mean_smoothed_dice_per_item_and_channel(eps):
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 2, 5, 4, generator=g)
    target = (torch.rand(3, 2, 5, 4, generator=g) > 0.6).float()
    target[1, 0] = 0  # an empty mask: where ε matters
    got = soft_dice_loss(probs, target, eps)
    assert got.item() == pytest.approx(_dice_by_hand(probs, target, eps), rel=1e-6)
    # volumes: the sums run over every dimension after the channel
    vol_p, vol_t = torch.rand(2, 1, 3, 4, 4, generator=g), torch.rand(2, 1, 3, 4, 4, generator=g)
    want = _dice_by_hand(vol_p.flatten(2), vol_t.flatten(2), eps)
    assert soft_dice_loss(vol_p, vol_t, eps).item() == pytest.approx(want, rel=1e-6)


def test_soft_dice_default_smoothing_is_one():
    g = torch.Generator().manual_seed(2)
    probs, target = torch.rand(2, 1, 4, 4, generator=g), torch.zeros(2, 1, 4, 4)
    assert soft_dice_loss(probs, target).item() == pytest.approx(
        _dice_by_hand(probs, target, 1.0), rel=1e-6
    )


def _binary_by_hand(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    t = (labels > 0).float().unsqueeze(1)
    bce = F.binary_cross_entropy_with_logits(logits.float(), t).item()
    return 0.5 * bce + 0.5 * _dice_by_hand(torch.sigmoid(logits.float()), t, eps)


def _multi_by_hand(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    logits = logits.float()
    ce = F.cross_entropy(logits, labels).item()
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()
    probs = torch.softmax(logits, 1)
    return 0.5 * ce + 0.5 * _dice_by_hand(probs[:, 1:], onehot[:, 1:], eps)


@pytest.mark.parametrize("eps", [1.0, 1e-6])
def test_binary_loss_is_half_bce_plus_half_dice_of_every_label_above_zero(eps):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 1, 6, 6, generator=g)
    labels = torch.randint(0, 3, (3, 6, 6), generator=g)  # labels 1 and 2: both foreground
    labels[2] = 0
    got = segmentation_loss(logits, labels, eps)
    assert got.item() == pytest.approx(_binary_by_hand(logits, labels, eps), rel=1e-6)
    assert segmentation_loss(logits, labels).item() == pytest.approx(
        _binary_by_hand(logits, labels, 1.0), rel=1e-6
    )


@pytest.mark.parametrize("eps", [1.0, 1e-6])
def test_multiclass_loss_is_half_ce_plus_half_dice_of_the_foreground_channels(eps):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, 5, generator=g)
    labels = torch.randint(0, 3, (2, 5, 5), generator=g)
    labels[1][labels[1] == 2] = 0  # a class absent from one image
    got = segmentation_loss(logits, labels, eps)
    assert got.item() == pytest.approx(_multi_by_hand(logits, labels, eps), rel=1e-6)
    assert segmentation_loss(logits, labels).item() == pytest.approx(
        _multi_by_hand(logits, labels, 1.0), rel=1e-6
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_the_loss_of_half_precision_logits_is_computed_in_float32(channels):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, channels, 4, 4, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, channels + 1 if channels == 1 else channels, (2, 4, 4), generator=g)
    got = segmentation_loss(logits, labels)
    assert got.dtype == torch.float32
    assert torch.equal(got, segmentation_loss(logits.float(), labels))


@pytest.mark.parametrize("channels", [1, 3])
def test_the_loss_is_computed_where_its_inputs_live(channels):
    """The one-hot classes are made on the labels' device: on the meta device (standing in for
    a GPU here) a CPU ``arange`` of several classes could not meet the labels."""
    logits = torch.randn(2, channels, 4, 4, device="meta")
    labels = torch.zeros(2, 4, 4, dtype=torch.long, device="meta")
    loss = segmentation_loss(logits, labels)
    assert loss.device.type == "meta" and loss.shape == ()


def test_per_sample_loss_is_the_loss_of_each_item_alone():
    g = torch.Generator().manual_seed(6)
    for channels in (1, 3):
        logits = torch.randn(3, channels, 4, 4, generator=g)
        labels = torch.randint(0, max(channels, 2), (3, 4, 4), generator=g)
        for eps in (None, 1e-6):
            got = (
                per_sample_loss(logits, labels)
                if eps is None
                else per_sample_loss(logits, labels, eps)
            )
            assert got.shape == (3,)
            for i in range(3):
                want = segmentation_loss(logits[i : i + 1], labels[i : i + 1], eps or 1.0)
                assert got[i].item() == pytest.approx(want.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# optimizer factory
# ---------------------------------------------------------------------------------------------


def test_make_optimizer_builds_adam_or_sgd_over_the_trainable_parameters_only():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adam = make_optimizer(model.parameters(), "adam", 0.01, 0.002, 0.9)
    assert type(adam) is torch.optim.Adam
    (group,) = adam.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.002)
    sgd = make_optimizer(model.parameters(), "sgd", 0.05, 0.003, 0.7)
    assert type(sgd) is torch.optim.SGD
    (group,) = sgd.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.05, 0.003, 0.7)


def test_make_optimizer_refuses_no_trainable_parameters_and_an_unknown_name_exactly():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError) as err:
        make_optimizer(frozen.parameters(), "sgd", 0.1, 0.0, 0.0)
    assert str(err.value) == "no trainable parameters were given to the optimizer"
    with pytest.raises(ValueError) as err:
        make_optimizer(nn.Linear(2, 2).parameters(), "rmsprop", 0.1, 0.0, 0.0)  # type: ignore[arg-type]
    assert str(err.value) == "unknown optimizer 'rmsprop'; expected adam or sgd"


# ---------------------------------------------------------------------------------------------
# batch stream
# ---------------------------------------------------------------------------------------------


def _site(n: int, h: int = 4, w: int = 4, name: str = "s") -> SiteData:
    """Image i is constant i (so a batch tells which images it holds); labels vary in space."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, h, w).clone()
    images = images + torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w) / 1000
    labels = (torch.arange(h * w).view(1, h, w) % 3).expand(n, h, w).clone()
    return SiteData(name=name, images=images, labels=labels, case_ids=[str(i) for i in range(n)])


def _ids(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return [int(v) for v in batch[0][:, 0, 0, 0].floor()]


def _chunks_by_hand(perm: list[int], batch_size: int) -> list[list[int]]:
    chunks = [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:  # a batch of one joins the one before
        last = chunks.pop()
        chunks[-1] = chunks[-1] + last
    return chunks


def _stream(data: SiteData, batch_size: int, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kw.setdefault("order", torch.Generator().manual_seed(0))
    kw.setdefault("augment", None)
    kw.setdefault("steps", None)
    return list(batch_stream(data, batch_size, **kw))


@pytest.mark.parametrize(
    ("n", "batch_size", "sizes"),
    [(9, 4, [4, 5]), (10, 4, [4, 4, 2]), (8, 4, [4, 4]), (1, 4, [1]), (5, 4, [5]), (3, 8, [3])],
)
def test_an_unshuffled_epoch_is_in_order_with_a_single_last_image_merged(n, batch_size, sizes):
    batches = _stream(_site(n), batch_size, epochs=1, shuffle=False)
    assert [len(b[0]) for b in batches] == sizes
    assert [i for b in batches for i in _ids(b)] == list(range(n))


def test_shuffled_epochs_are_fresh_permutations_of_the_order_generator():
    n, bs = 9, 4
    batches = _stream(_site(n), bs, epochs=3, order=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    want = []
    for _ in range(3):
        want += _chunks_by_hand(torch.randperm(n, generator=g).tolist(), bs)
    assert [_ids(b) for b in batches] == want
    # shuffle is the default; a shuffle draws from the given generator only
    torch.manual_seed(0)
    again = _stream(_site(n), bs, epochs=3, order=torch.Generator().manual_seed(7))
    assert [_ids(b) for b in again] == want


@pytest.mark.parametrize("steps", [0, 1, 2, 5, 7])
def test_steps_give_exactly_that_many_batches_across_epochs(steps):
    n, bs = 10, 4  # 3 batches an epoch
    batches = _stream(
        _site(n), bs, epochs=None, steps=steps, order=torch.Generator().manual_seed(3)
    )
    g = torch.Generator().manual_seed(3)
    want: list[list[int]] = []
    while len(want) < steps:
        want += _chunks_by_hand(torch.randperm(n, generator=g).tolist(), bs)
    assert [_ids(b) for b in batches] == want[:steps]


def test_a_batch_is_the_indexed_images_with_their_labels_unchanged_without_augment():
    data = _site(6)
    batches = _stream(data, 4, epochs=1, shuffle=False, augmentations=("flips", "rot90"))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(x, data.images) and torch.equal(y, data.labels)
    assert x.dtype == torch.float32 and y.dtype == data.labels.dtype
    # an augment generator with no augmentations: nothing drawn, nothing changed
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    plain = _stream(data, 4, epochs=1, shuffle=False, augment=g, augmentations=())
    assert torch.equal(torch.cat([b[0] for b in plain]), data.images)
    assert torch.equal(g.get_state(), state)


def test_batches_come_on_the_requested_device():
    batches = _stream(_site(4), 2, epochs=1, device="meta")
    assert all(x.device.type == "meta" and y.device.type == "meta" for x, y in batches)
    assert all(x.device.type == "cpu" for x, _ in _stream(_site(4), 2, epochs=1))


def _augmented_by_hand(data, batch_size, seed, augmentations):
    """flips (horizontal, vertical: p 0.5 each), then rot90 (p 0.5, k uniform in 0..3), drawn per
    batch in that order from the augment generator, as the docstring defines."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(data), batch_size):
        xs = [data.images[i] for i in range(start, min(start + batch_size, len(data)))]
        ys = [data.labels[i] for i in range(start, min(start + batch_size, len(data)))]
        m = len(xs)
        if "flips" in augmentations:
            u = torch.rand(m, 2, generator=g)
            for i in range(m):
                if u[i, 0] < 0.5:
                    xs[i], ys[i] = xs[i].flip(-1), ys[i].flip(-1)
                if u[i, 1] < 0.5:
                    xs[i], ys[i] = xs[i].flip(-2), ys[i].flip(-2)
        if "rot90" in augmentations:
            turn = torch.rand(m, generator=g)
            k = torch.randint(0, 4, (m,), generator=g)
            for i in range(m):
                if turn[i] < 0.5:
                    xs[i], ys[i] = (
                        xs[i].rot90(int(k[i]), (-2, -1)),
                        ys[i].rot90(int(k[i]), (-2, -1)),
                    )
        out.append((torch.stack(xs), torch.stack(ys)))
    return out


@pytest.mark.parametrize("augmentations", [("flips",), ("rot90",), ("flips", "rot90")])
def test_augmentations_move_image_and_mask_together_as_drawn(augmentations):
    data = _site(16, 5, 5)
    labels = (data.images[:, 0] * 1000).long() % 7  # labels that differ under every symmetry
    data = SiteData(name="s", images=data.images, labels=labels, case_ids=data.case_ids)
    got = _stream(
        data,
        4,
        epochs=1,
        shuffle=False,
        augment=torch.Generator().manual_seed(11),
        augmentations=augmentations,
    )
    want = _augmented_by_hand(data, 4, 11, augmentations)
    assert len(got) == len(want)
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(gx, wx) and torch.equal(gy, wy)
    changed = sum(
        not torch.equal(gx, data.images[4 * i : 4 * i + 4]) for i, (gx, _) in enumerate(got)
    )
    assert changed > 0
    assert torch.equal(data.images, _site(16, 5, 5).images)  # the held data are not touched


def _seed_drawing_exactly_one_half(n: int, augmentations) -> int:
    """A seed whose first batch of ``n`` draws holds a uniform of exactly 0.5 where it decides
    (a flip, or a turn by a nonzero k): the boundary of ``u < 0.5``."""
    for seed in range(100_000):
        g = torch.Generator().manual_seed(seed)
        if "flips" in augmentations:
            if (torch.rand(n, 2, generator=g) == 0.5).any():
                return seed
            continue
        turn = torch.rand(n, generator=g)
        k = torch.randint(0, 4, (n,), generator=g)
        if ((turn == 0.5) & (k != 0)).any():
            return seed
    raise AssertionError("no seed found")


@pytest.mark.parametrize("augmentations", [("flips",), ("rot90",)])
def test_a_draw_of_exactly_one_half_does_not_augment(augmentations):
    """p 0.5 as albumentations draws it: augment when u < 0.5 for u uniform on [0, 1)."""
    n = 1024
    images = torch.arange(4, dtype=torch.float32).view(1, 1, 2, 2).expand(n, 1, 2, 2).clone()
    data = SiteData(name="s", images=images, labels=images[:, 0].long(), case_ids=["c"] * n)
    seed = _seed_drawing_exactly_one_half(n, augmentations)
    got = _stream(
        data,
        n,
        epochs=1,
        shuffle=False,
        augment=torch.Generator().manual_seed(seed),
        augmentations=augmentations,
    )
    ((gx, gy),) = got
    ((wx, wy),) = _augmented_by_hand(data, n, seed, augmentations)
    assert torch.equal(gx, wx) and torch.equal(gy, wy)


def test_flips_and_rot90_hit_each_case_at_about_their_probabilities():
    """p 0.5 per flip axis and p 0.5 for a turn (k uniform over 0..3, so 3/8 of images turn)."""
    n = 400
    images = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).expand(n, 1, 4, 4).clone()
    data = SiteData(name="s", images=images, labels=torch.zeros(n, 4, 4).long(), case_ids=["c"] * n)
    src = images[0]

    def share(augmentations, variant) -> float:
        batches = _stream(
            data,
            50,
            epochs=1,
            shuffle=False,
            augment=torch.Generator().manual_seed(0),
            augmentations=augmentations,
        )
        x = torch.cat([b[0] for b in batches])
        return sum(torch.equal(x[i], variant) for i in range(n)) / n

    assert share(("flips",), src) == pytest.approx(0.25, abs=0.07)
    assert share(("flips",), src.flip(-1)) == pytest.approx(0.25, abs=0.07)
    assert share(("flips",), src.flip(-2)) == pytest.approx(0.25, abs=0.07)
    assert share(("rot90",), src) == pytest.approx(5 / 8, abs=0.07)
    for k in (1, 2, 3):
        assert share(("rot90",), src.rot90(k, (-2, -1))) == pytest.approx(1 / 8, abs=0.05)


def test_batch_stream_refusals_are_exact():
    data = _site(4)
    for kw in ({"epochs": 1, "steps": 2}, {"epochs": None, "steps": None}):
        with pytest.raises(ValueError) as err:
            _stream(data, 2, **kw)
        assert str(err.value) == "give exactly one of epochs or steps"
    with pytest.raises(ValueError) as err:
        _stream(data, 2, epochs=1, augmentations=("rot90", "zoom", "blur", "flips"))
    assert str(err.value) == "unknown augmentation(s) ['blur', 'zoom']; expected flips, rot90"
    wide = _site(3, 4, 6, name="wide")
    with pytest.raises(ValueError) as err:
        _stream(wide, 2, epochs=1, augment=torch.Generator(), augmentations=("rot90",))
    assert str(err.value) == (
        "site 'wide': rot90 augmentation needs square images, got 4×6 (use augment: [flips])"
    )
    # no augment generator, flips only, or an empty site: nothing to refuse
    assert len(_stream(wide, 2, epochs=1, augmentations=("rot90",))) == 1
    assert len(_stream(wide, 2, epochs=1, augment=torch.Generator(), augmentations=("flips",))) == 1
    empty = SiteData(
        name="e", images=torch.zeros(0, 1, 4, 6), labels=torch.zeros(0, 4, 6).long(), case_ids=[]
    )
    got = _stream(empty, 2, epochs=1, augment=torch.Generator(), augmentations=("rot90",))
    assert sum(len(x) for x, _ in got) == 0


# ---------------------------------------------------------------------------------------------
# divergence: check_finite, LossMeter, divergence_guard
# ---------------------------------------------------------------------------------------------


def test_outside_a_guard_a_non_finite_loss_raises_at_once_with_its_value_and_place():
    assert issubclass(Diverged, FloatingPointError)
    check_finite(torch.tensor([1.0, 2.0]), "fine")
    for value, shown in ((float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")):
        with pytest.raises(Diverged) as err:
            check_finite(torch.tensor(value), "client x (local)")
        assert str(err.value) == f"non-finite loss ({shown}) in client x (local)"
    with pytest.raises(Diverged):  # one bad element of several
        check_finite(torch.tensor([1.0, float("nan")]).sum(), "sum")


def test_loss_meter_sums_each_label_in_float64_and_names_every_bad_label_in_order():
    meter = LossMeter()
    meter.check()  # nothing recorded: nothing to refuse
    a = [torch.tensor(0.1, dtype=torch.float32), torch.tensor([0.2, 0.3]), torch.tensor(1e-8)]
    for v in a:
        meter.add(v, "a")
    meter.add(torch.tensor(2.5, requires_grad=True) * 1, "b")
    want = sum(float(x) for v in a for x in v.to(torch.float64).flatten())
    assert meter.sums["a"].dtype == torch.float64 and meter.sums["a"].item() == want
    assert meter.sums["b"].item() == 2.5 and not meter.sums["b"].requires_grad
    assert list(meter.sums) == ["a", "b"]
    meter.check()  # all finite
    meter.add(torch.tensor(float("nan")), "c")
    meter.add(torch.tensor(3.0), "d")
    meter.add(torch.tensor(float("inf")), "a")
    meter.add(torch.tensor(1.0), "a")  # a later finite loss does not clear the label
    with pytest.raises(Diverged) as err:
        meter.check()
    assert str(err.value) == "non-finite loss in a, c"


def test_a_guard_raises_after_its_block_naming_every_non_finite_label():
    steps = []
    with pytest.raises(Diverged) as err:
        with divergence_guard():
            check_finite(torch.tensor(float("nan")), "client a")
            check_finite(torch.tensor(1.0), "client b")
            check_finite(torch.tensor(float("inf")), "client c")
            steps.append("block ran to its end")
    assert steps == ["block ran to its end"]
    assert str(err.value) == "non-finite loss in client a, client c"
    # the guard is gone afterwards: a non-finite loss raises at once again
    with pytest.raises(Diverged, match=r"^non-finite loss \(nan\) in after$"):
        check_finite(torch.tensor(float("nan")), "after")


def test_a_guard_resets_after_an_error_and_passes_a_divergence_through_unchanged():
    with pytest.raises(Diverged) as err:
        with divergence_guard():
            check_finite(torch.tensor(float("nan")), "recorded")
            raise Diverged("raised inside")
    assert str(err.value) == "raised inside"  # not replaced by the meter's message
    with pytest.raises(KeyError):
        with divergence_guard():
            raise KeyError("k")
    with pytest.raises(Diverged, match=r"^non-finite loss \(inf\) in after$"):
        check_finite(torch.tensor(float("inf")), "after")
    # an error after a non-finite loss is that divergence, named exactly
    with pytest.raises(Diverged) as err:
        with divergence_guard():
            check_finite(torch.tensor(float("inf")), "step one")
            raise RuntimeError("later")
    assert str(err.value) == "non-finite loss in step one"


def test_nested_guards_record_into_the_innermost_and_restore_the_outer():
    with divergence_guard() as outer:
        check_finite(torch.tensor(1.0), "outer")
        with divergence_guard() as inner:
            check_finite(torch.tensor(2.0), "inner")
        check_finite(torch.tensor(3.0), "outer")
    assert list(inner.sums) == ["inner"]
    assert list(outer.sums) == ["outer"] and outer.sums["outer"].item() == 4.0


# ---------------------------------------------------------------------------------------------
# gradient scaler registry, backward_step
# ---------------------------------------------------------------------------------------------


class _RecordingScaler:
    """Stands in for a GradScaler: records what backward_step asks of it, scales by 4."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def scale(self, loss):
        self.calls.append(("scale", loss))
        return loss * 4

    def step(self, optimizer):
        self.calls.append(("step", optimizer))
        optimizer.step()

    def update(self):
        self.calls.append(("update",))


def _linear_sgd():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_the_scaler_is_used_only_for_the_optimizer_it_is_attached_to():
    x = torch.randn(4, 3)
    plain, opt = _linear_sgd()
    scaled, opt_s = _linear_sgd()
    scaler = _RecordingScaler()
    assert scaler_of(opt_s) is None
    attach_scaler(opt_s, scaler)  # type: ignore[arg-type]
    assert scaler_of(opt_s) is scaler and scaler_of(opt) is None
    start = plain.weight.detach().clone()
    loss = plain(x).pow(2).mean()
    backward_step(opt, loss)
    grad = plain.weight.grad.clone()
    assert torch.allclose(plain.weight.detach(), start - 0.1 * grad)  # loss.backward(); step()
    assert not torch.equal(plain.weight.detach(), start)
    loss_s = scaled(x).pow(2).mean()
    backward_step(opt_s, loss_s)
    assert [c[0] for c in scaler.calls] == ["scale", "step", "update"]
    assert scaler.calls[0][1] is loss_s and scaler.calls[1][1] is opt_s
    # the gradient came from the scaled loss (this stand-in does not unscale)
    assert torch.allclose(scaled.weight.grad, 4 * grad)


def test_attaching_a_scaler_keeps_the_optimizer_alive_no_longer():
    import gc
    import weakref

    _, opt = _linear_sgd()
    attach_scaler(opt, _RecordingScaler())  # type: ignore[arg-type]
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None


# ---------------------------------------------------------------------------------------------
# train_epochs
# ---------------------------------------------------------------------------------------------


def _batches(n: int, size: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(size, 1, 6, 6, generator=g), (torch.rand(size, 6, 6, generator=g) > 0.5).long())
        for _ in range(n)
    ]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1))


def test_train_epochs_is_sgd_by_hand_with_the_extra_loss_and_returns_mean_and_samples():
    batches = _batches(4, 2) + _batches(1, 3, seed=5)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    extra = lambda m: 0.1 * sum(p.pow(2).sum() for p in m.parameters())  # noqa: E731
    model.eval()  # train_epochs puts it in training mode itself
    mean, seen = train_epochs(model, iter(batches), opt, extra_loss=extra)
    assert model.training
    ref = _net()
    params = list(ref.parameters())
    losses = []
    for x, y in batches:
        loss = segmentation_loss(ref(x), y) + extra(ref)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 0.2 * g
        losses.append(loss.item())
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    assert mean == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    assert seen == 11


def test_train_epochs_uses_the_given_loss_and_names_its_place_when_it_diverges():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def loss_fn(logits, labels):
        calls.append(labels.shape)
        return logits.mean() * 0 + 3.0

    mean, seen = train_epochs(model, _batches(3), opt, loss_fn=loss_fn)
    assert (mean, seen, len(calls)) == (3.0, 6, 3)
    with pytest.raises(Diverged) as err:
        train_epochs(model, _batches(2), opt, loss_fn=lambda lg, lb: lg.mean() * float("nan"))
    assert str(err.value) == "non-finite loss (nan) in local training"
    with pytest.raises(Diverged) as err:
        train_epochs(
            model,
            _batches(2),
            opt,
            where="client 7",
            loss_fn=lambda lg, lb: lg.mean() * float("inf"),
        )
    assert str(err.value).endswith(" in client 7")
    assert train_epochs(model, iter([]), opt) == (0.0, 0)


def test_train_epochs_clears_stale_gradients_so_an_unreached_parameter_stays_put():
    """zero_grad(set_to_none=True): a parameter no loss reaches has no gradient, so SGD with
    weight decay (or momentum) leaves it alone; a zeroed gradient would decay it."""
    model = _net()
    model.unused = nn.Parameter(torch.ones(3))
    model.unused.grad = torch.full((3,), 5.0)  # left over from some earlier pass
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5, momentum=0.9)
    train_epochs(model, _batches(2), opt)
    assert torch.equal(model.unused.detach(), torch.ones(3))
    assert model.unused.grad is None


def test_train_epochs_steps_through_an_attached_scaler():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = _RecordingScaler()
    attach_scaler(opt, scaler)  # type: ignore[arg-type]
    train_epochs(model, _batches(2), opt)
    assert [c[0] for c in scaler.calls] == ["scale", "step", "update"] * 2


def test_the_mean_loss_is_summed_in_float64():
    """Losses whose float32 sum rounds: the mean is the float64 sum over the count."""
    model = nn.Conv2d(1, 1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    values = iter([1.0, 2.0**-24, 2.0**-24, 2.0**-24])

    def loss_fn(logits, labels):
        return logits.sum() * 0 + torch.tensor(next(values), dtype=torch.float32)

    mean, _ = train_epochs(model, _batches(4), opt, loss_fn=loss_fn)
    assert mean == (1.0 + 3 * 2.0**-24) / 4
