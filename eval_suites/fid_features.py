"""Image files -> feature arrays for FID, with the protocol's resize recorded.

Every image is resized (PIL, bicubic) to the protocol resolution when it is not already that size, and
converted to [0, 1]; the feature network then applies its own input resize (299 bilinear for the FID
Inception, as pytorch-fid). The protocol dict travels into the results JSON and the `.npz` caches.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm


@dataclass
class FIDProtocol:
    resolution: int = 1024          # MJHQ-30K card: "All FID metrics are computed at resolution 1024x1024"
    resize: str = "PIL bicubic"     # applied to images not already at `resolution`
    features: str = "inception"     # inception (FID Inception-v3 pool3) | shapes (domain feature net)
    library: str = "eval_suites.fid_inception (pytorch-fid-compatible FID Inception-v3, pool3, 2048-d)"
    weights: str = ""               # feature-network file and its sha256 prefix (caches are keyed on it)

    def as_dict(self) -> dict:
        return asdict(self)


def load_image(path, resolution: int) -> torch.Tensor:
    """(3, resolution, resolution) float tensor in [0, 1]."""
    image = Image.open(path).convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0


@torch.no_grad()
def extract_features(paths: list, net: torch.nn.Module, resolution: int, batch_size: int = 32,
                     device: str = "cpu", desc: str = "features") -> np.ndarray:
    """(N, D) float64 features of the images at `paths`."""
    if not paths:
        raise ValueError(f"no images to extract {desc} from")
    net = net.to(device).eval()
    out = []
    for i in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
        batch = torch.stack([load_image(p, resolution) for p in paths[i:i + batch_size]]).to(device)
        out.append(net(batch).double().cpu().numpy())
    return np.concatenate(out)


def build_feature_net(kind: str, inception_weights=None, shapes_weights=None) -> torch.nn.Module:
    """`inception` (needs --inception-weights) or `shapes` (needs --shapes-weights)."""
    if kind == "inception":
        from eval_suites.fid_inception import load_fid_inception
        return load_fid_inception(inception_weights)
    if kind == "shapes":
        from eval_suites.shapes_features import load_shapes_feature_net
        return load_shapes_feature_net(shapes_weights)
    raise ValueError(f"unknown feature network {kind!r}; choose --features inception or --features shapes")


def file_digest(path) -> str:
    """`path sha256:<12 hex>` of a weights file, so cached statistics never mix feature networks."""
    import hashlib
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return f"{Path(path).name} sha256:{digest}"


def image_paths(folder) -> list[Path]:
    """Sorted image files (png/jpg/jpeg/webp) directly under `folder`."""
    exts = {".png", ".jpg", ".jpeg", ".webp"}
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in exts)
