"""open_clip models from local files, and GenEval's zero-shot colour classifier.

`load_open_clip(model, checkpoint, activation)`: `model` is an open_clip architecture name ("ViT-L-14") or a
path to a model-config JSON (the shipped `assets/eval/shapes_clip.json`); `checkpoint` is a local file: an
open_clip state dict, or OpenAI's own checkpoint (TorchScript archive or state dict). The activation is QuickGELU
for OpenAI's weights and GELU otherwise unless forced (eval_suites/clip_weights.py). Nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from eval_suites.clip_weights import OPENAI_ONLY_KEYS, choose_quick_gelu, read_clip_state
from eval_suites.geneval_rules import COLORS, Detection

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "eval"
SHAPES_CLIP_CONFIG = ASSETS / "shapes_clip.json"
SHAPES_CLIP_WEIGHTS = ASSETS / "shapes_clip.pt"

# GenEval's colour templates (evaluate_images.py::color_classification).
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess: object   # PIL.Image -> (3, S, S) tensor
    tokenizer: object    # list[str] -> (n, context) token ids
    device: str
    activation: str = "GELU"  # which activation the towers run, and why (goes into the results JSON)


def resolve_clip_paths(model: str, checkpoint) -> tuple[str, object]:
    """`shapes` -> the shipped tiny CLIP (config, weights); anything else passes through unchanged."""
    if model == "shapes":
        return str(SHAPES_CLIP_CONFIG), checkpoint or SHAPES_CLIP_WEIGHTS
    return model, checkpoint


def load_open_clip(model: str, checkpoint, device: str = "cpu", flag: str = "--clip-ckpt",
                   activation: str = "auto") -> ClipBundle:
    """Build an open_clip model with the activation its weights were trained with and load them from a local
    file; errors name `flag` when missing. `activation`: auto | quickgelu | gelu (clip_weights.choose_quick_gelu)."""
    if checkpoint is None:
        raise FileNotFoundError(f"no CLIP checkpoint given; pass {flag} PATH (a local open_clip state dict)")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"CLIP checkpoint {checkpoint} does not exist; pass an existing file with {flag}")
    import open_clip  # after the checks: a missing file fails fast

    name = model
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise FileNotFoundError(f"CLIP model config {model} does not exist; pass an existing --clip-model")
        open_clip.add_model_config(model)  # registers the config under its file stem
        name = Path(model).stem
    state, torchscript = read_clip_state(checkpoint)
    quick, why = choose_quick_gelu(name, checkpoint, state, torchscript, activation)
    # quick_gelu= overrides the named config either way (create_model's **model_kwargs win over the config)
    net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, quick_gelu=quick)
    load_clip_state(net, state, checkpoint, flag)
    net.to(device).eval()
    return ClipBundle(net, preprocess, open_clip.get_tokenizer(name), device, why)


def load_clip_state(net: torch.nn.Module, state: dict, checkpoint, flag: str = "--clip-ckpt") -> None:
    """Strictly load a state dict, massaged as open_clip's `load_checkpoint` does (OpenAI-only keys dropped, old
    text-tower layout converted, logit_scale shape, position-embedding resize)."""
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state = {k: v for k, v in state.items() if k not in OPENAI_ONLY_KEYS}
    if "positional_embedding" in state and not hasattr(net, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and state["logit_scale"].ndim != net.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(net.logit_scale.shape)
    resize_pos_embed(state, net)
    resize_text_pos_embed(state, net)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"CLIP checkpoint {checkpoint} does not fit the --clip-model architecture: "
                         f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}; pass the "
                         f"matching --clip-model for {flag}") from e


@torch.no_grad()
def encode_texts(bundle: ClipBundle, texts: list[str]) -> torch.Tensor:
    """(n, D) L2-normalised text embeddings."""
    tokens = bundle.tokenizer(texts).to(bundle.device)
    return F.normalize(bundle.model.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def encode_images(bundle: ClipBundle, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """(n, D) L2-normalised image embeddings."""
    feats = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([bundle.preprocess(im.convert("RGB")) for im in images[i:i + batch_size]])
        feats.append(F.normalize(bundle.model.encode_image(batch.to(bundle.device)).float(), dim=-1))
    return torch.cat(feats)


def zero_shot_weights(bundle: ClipBundle, classnames, templates) -> torch.Tensor:
    """(D, C) classifier: per class, the normalised mean of its normalised template embeddings
    (clip_benchmark `zero_shot_classifier`)."""
    cols = [F.normalize(encode_texts(bundle, [t.format(c=c) for t in templates]).mean(0), dim=0) for c in classnames]
    return torch.stack(cols, dim=1)


def masked_crop(image: Image.Image, det: Detection, background: str = "#999") -> Image.Image:
    """The object pasted on a flat grey background (by its mask, if any), cropped to its box (GenEval crop=1)."""
    image = image.convert("RGB")
    if det.mask is not None:
        blank = Image.new("RGB", image.size, color=background)
        image = Image.composite(image, blank, Image.fromarray(det.mask.astype("uint8") * 255))
    return image.crop(tuple(float(v) for v in det.box[:4]))


class ClipColorClassifier:
    """GenEval's colour check: zero-shot CLIP over the 10 colours x 3 templates on masked crops."""

    def __init__(self, bundle: ClipBundle):
        self.bundle = bundle
        self._weights: dict[str, torch.Tensor] = {}

    def __call__(self, image: Image.Image, detections: list[Detection], classname: str) -> list[str]:
        if classname not in self._weights:
            templates = [t.replace("{cls}", classname) for t in COLOR_TEMPLATES]
            self._weights[classname] = zero_shot_weights(self.bundle, COLORS, templates)
        feats = encode_images(self.bundle, [masked_crop(image, d) for d in detections])
        return [COLORS[i] for i in (feats @ self._weights[classname]).argmax(1).tolist()]


def exact_colors(image, detections: list[Detection], classname: str) -> list[str]:
    """Colour from detectors that measure it directly (the shapes domain's palette)."""
    missing = [d for d in detections if d.color is None]
    if missing:
        raise ValueError("exact colours need detections with .color set; use the shapes detector or --colors clip")
    return [d.color for d in detections]
