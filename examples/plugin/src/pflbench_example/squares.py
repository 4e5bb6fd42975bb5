import torch

from pflbench.data import FederatedData, SiteData
from pflbench.dataset import Dataset


class Squares(Dataset):
    """Bright squares on noise; each site has its own brightness (a toy appearance shift)."""

    name = "squares"
    description = "Toy federation: one bright square per image, site-specific brightness"

    def __init__(self, sites: int = 3, images_per_site: int = 12, size: int = 32, seed: int = 0):
        self.sites, self.images_per_site, self.size, self.seed = sites, images_per_site, size, seed

    def load(self) -> FederatedData:
        g = torch.Generator().manual_seed(self.seed)
        out = []
        for s in range(self.sites):
            n, size = self.images_per_site, self.size
            images = 0.2 * torch.rand(n, 1, size, size, generator=g)
            labels = torch.zeros(n, size, size, dtype=torch.long)
            for i in range(n):
                y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
                labels[i, y : y + size // 3, x : x + size // 3] = 1
            images += (0.4 + 0.2 * s) * labels.unsqueeze(1)
            cases = [f"site{s}-img{i}" for i in range(n)]
            out.append(SiteData(f"site{s}", images.clamp(0, 1), labels, cases))
        return FederatedData("squares", out, ["background", "square"], {"square": [1]})
