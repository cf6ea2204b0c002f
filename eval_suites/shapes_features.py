"""Domain feature network for FID on the synthetic shapes set (the tiny preset).

Inception features of 32x32 flat-colour shapes say little, so the tiny preset's FID uses a small CNN
trained (`train_shapes_features.py`) to predict which (shape, colour) pairs a scene holds and how many
objects of each shape; its pooled penultimate activations are the features. Weights ship in
`assets/eval/shapes_features.pt`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "eval" / "shapes_features.pt"


@dataclass
class ShapesFeatureConfig:
    input_size: int = 32   # tiny-preset images are 32x32; other sizes are resized (area) to this
    width: int = 24
    channels: int = 64     # last conv width; features = [mean-pool, max-pool] -> 2 * channels
    n_pairs: int = 0       # number of (shape, colour) presence logits
    n_shapes: int = 0
    max_count: int = 6     # count classes 0..max_count per shape


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.SiLU())


class ShapesFeatureNet(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> features (B, 2 * channels); `heads` give training logits."""

    def __init__(self, cfg: ShapesFeatureConfig):
        super().__init__()
        self.cfg, w = cfg, cfg.width
        # 32 -> 16 -> 8 px feature maps: a CPU training step stays ~0.1 s on a shared core.
        self.body = nn.Sequential(_block(3, w, 2), _block(w, 2 * w, 1), _block(2 * w, 4 * w, 2),
                                  nn.Conv2d(4 * w, cfg.channels, 1), nn.SiLU())
        self.pair_head = nn.Linear(self.dim, cfg.n_pairs)
        self.count_head = nn.Linear(self.dim, cfg.n_shapes * (cfg.max_count + 1))

    @property
    def dim(self) -> int:
        return 2 * self.cfg.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.cfg.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="area")  # box filter: exact for integer downscales
        h = self.body(2 * x - 1)  # (B, channels, s/4, s/4)
        # max-pool keeps small objects visible (one 7 px object is ~1/16 of the map); mean-pool counts them
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 2 * channels)

    def heads(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_pairs) presence logits, (B, n_shapes, max_count+1) count logits."""
        counts = self.count_head(feats).view(-1, self.cfg.n_shapes, self.cfg.max_count + 1)
        return self.pair_head(feats), counts


def save_shapes_feature_net(net: ShapesFeatureNet, path, **meta) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(net.cfg), "state_dict": net.state_dict(), "meta": meta}, path)


def load_shapes_feature_net(path=None, flag: str = "--shapes-weights") -> ShapesFeatureNet:
    """Load the shipped (default) or a given checkpoint; a missing file names `flag`."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"shapes feature weights {path} do not exist; pass {flag} PATH or run "
                                "`python -m eval_suites.train_shapes_features`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    net = ShapesFeatureNet(ShapesFeatureConfig(**blob["config"]))
    net.load_state_dict(blob["state_dict"])
    return net.eval()
