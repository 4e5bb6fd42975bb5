from pflbench.method import Method
from pflbench.params import Param


class HalfProx(Method):
    """FedAvg with a proximal pull towards the round-start model (paper citation here)."""

    name = "halfprox"
    paper = "Me et al., 2026"
    params = {
        "mu": Param(0.1, low=1e-4, high=1.0, log=True, valid=(0, None), help="proximal weight")
    }

    def local_update(self, client):
        anchor = [p.detach().clone() for p in client.model.parameters()]

        def prox(model):
            pairs = zip(model.parameters(), anchor, strict=True)
            return self.mu / 2 * sum(((p - a) ** 2).sum() for p, a in pairs)

        client.fit(extra_loss=prox)
