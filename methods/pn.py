"""PN: FedAvg on a model whose norm layers are Population Normalization layers."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pflbench.client import Client
from pflbench.method import Method
from pflbench.methods._common import model_name
from pflbench.partition import Partition, PartitionError, floating_entries
from pflbench.population_norm import population_norm_keys, to_population_norm


class PN(Method):
    """FedAvg in which every norm layer normalises with learned population statistics.

    Paper: IEEE document 11094232 (https://ieeexplore.ieee.org/document/11094232/), as cited by
    FL-MedSegBench (Zhu et al., arXiv 2603.11659) among its generic FL baselines; the paper itself
    was not read (not public here), and its title and authors are not given by FL-MedSegBench's
    README. The definition is FL-MedSegBench's official code (meiluzhu/FL-MedSegBench), which is
    followed: ``models_dict/unet2d.py`` ``PopulationNormalization`` is the layer
    (:class:`pflbench.population_norm.PopulationNorm2d`: ``(x − pop_mean)/sqrt(pop_gamma + eps)
    · weight + bias`` with trainable ``pop_mean``/``pop_gamma``, the same in training and
    evaluation), ``utils.py`` builds the benchmark's model with ``norm='pn'`` in place of its
    usual norm layers for ``--method PN`` only, and trains it with ``client_method='local_train'``
    (plain local training) and ``server_method='fedavg'``, which averages every state-dict entry,
    the PN parameters included. So nothing is personal and each client is evaluated with the
    global model.

    Design. A pflbench suite has one model for every method, and suites have no per-method model
    override, so PN cannot be a model option (``norm: population``) that only ``pn`` would run
    with. Instead ``pn`` makes the architecture itself through the Method hook
    :meth:`~pflbench.method.Method.adapt_model`: the engine builds the suite's seeded model, and
    ``pn`` replaces each BatchNorm2d / InstanceNorm2d / GroupNorm by a fresh PN layer of the
    same width — the official code's substitution, which swaps whichever norm its model uses.
    Every convolution keeps the seeded weights the other methods start from (the conversion
    draws no random numbers), the change is confined to ``pn``, and every other method's model is
    untouched. A model with no norm layer (``unet`` with ``norm: none``), or with one PN cannot
    replace exactly (a timm encoder's fused BatchNormAct2d, LayerNorm), is refused with a
    PartitionError naming the model and the layer; a model without PN layers reaching
    ``partition``/``setup`` is refused too, so ``pn`` is never silently FedAvg.

    ``pop_gamma`` is the variance itself and unconstrained, as in the official code: should an
    update drive it below −eps the output is NaN, and the engine records the run as diverged
    rather than this class clamping what the official code does not.

    No hyperparameters beyond the suite's; no extra local passes; optimizer state reset every
    round as in FedAvg.
    """

    name = "pn"
    paper = "IEEE document 11094232, as cited by FL-MedSegBench (arXiv:2603.11659); paper not read"
    official_code = (
        "meiluzhu/FL-MedSegBench (models_dict/unet2d.py PopulationNormalization; "
        "utils.py method PN = local_train + fedavg)"
    )
    shares = (
        "every floating-point entry, the PN layers' pop_mean, pop_gamma, weight and bias included"
    )
    personal = "nothing"
    evaluates = "the global model w (with PN layers)"
    newcomer = "the final global model (PN layers included: no statistics to recompute)"
    deviations: ClassVar[tuple[str, ...]] = (
        "the official layer's running_mean/running_var buffers are omitted: it updates them in "
        "training but never uses them, so they only cost bytes when averaged",
    )

    def adapt_model(self, model: nn.Module) -> nn.Module:
        return to_population_norm(model, self.name)

    def partition(self, model: nn.Module) -> Partition:
        if not population_norm_keys(model):
            raise PartitionError(
                f"{self.name}: model {model_name(model)} has no Population Normalization layer; "
                f"{self.name} trains the model its adapt_model makes (norm layers replaced by "
                "PopulationNorm2d) and would otherwise silently be FedAvg"
            )
        return floating_entries(model)

    def setup(self, client: Client) -> None:
        self.partition(client.model)  # refuse a model without PN layers before training
        return None
