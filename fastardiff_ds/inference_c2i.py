"""Class-conditional generation with a MAR checkpoint (the MAR row): our export folder or an official
`checkpoint-last.pth`, through `sampling/mar_loop.py` with seeded noise.

    pipe = MARPipeline.from_pretrained("runs/mar_tiny/checkpoint")             # config.json + model.safetensors
    pipe = MARPipeline.from_pretrained("pretrained_models/mar/mar_large/checkpoint-last.pth",
                                       vae_path="pretrained_models/vae/kl16.ckpt")
    images = pipe.generate([207, 360], seed=0)                                  # PIL images

A batch is one draw stream: `seed` fixes the generation orders (drawn first) and then every noise draw, in the
order the official sampler makes them, so a (labels, seed) pair always gives the same images.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from PIL import Image

from .config.c2i import C2IConfig, resolve_c2i_config
from .models.c2i_tokenizer import build_c2i_tokenizer
from .models.mar import MAR
from .models.mar_checkpoint import load_mar, load_mar_export
from .sampling.diffloss import SpacedCosine
from .sampling.mar_loop import mar_generate, random_orders


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (MAR's (x + 1) / 2, rounded to 8 bits)."""
    x = ((pixels.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


MAR_MODES = ("baseline", "dmd")


def parse_sampling_overrides(items: list[str]) -> dict:
    """`sampling.KEY=VALUE` strings -> {KEY: value} for MARPipeline.generate (types of MARSamplingConfig);
    anything else is a ValueError naming the item and the valid keys."""
    from .config.c2i import MARSamplingConfig

    kinds = {f.name: type(getattr(MARSamplingConfig(), f.name)) for f in dataclasses.fields(MARSamplingConfig)}
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        name = key.removeprefix("sampling.")
        if not key.startswith("sampling.") or name not in kinds or not raw:
            raise ValueError(f"override {item!r}: a class-conditional checkpoint takes sampling.KEY=VALUE with KEY in "
                             f"{sorted(kinds)}")
        try:
            out[name] = kinds[name](raw)
        except ValueError:
            raise ValueError(f"override {item!r}: {name} takes a {kinds[name].__name__}") from None
    MARSamplingConfig(**{**dataclasses.asdict(MARSamplingConfig()), **out})  # range checks, naming the key
    return out


def load_student(folder: Path, model: MAR):
    """(few-step student `DiffLossFlow`, its steps, its first time) from a launcher/train_c2i.py export."""
    import json

    from safetensors.torch import load_file

    from .models.mar import diffloss_net
    from .sampling.diffloss_flow import DiffLossFlow

    path = folder / "student_head.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no student_head.safetensors, so no --mode dmd: distil one with "
                                "launcher/train_c2i.py (its run_dir/export), or use --mode baseline")
    net = diffloss_net(model.cfg)
    net.load_state_dict(load_file(str(path)))
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    return DiffLossFlow(net).eval(), int(meta.get("student_steps", 4)), float(meta.get("student_s_min", 0.05))


class MARPipeline:
    def __init__(self, model: MAR, cfg: C2IConfig, tokenizer, device: str = "cpu", student=None,
                 student_steps: int = 4, student_s_min: float = 0.05):
        self.model, self.cfg, self.tokenizer = model.to(device).eval(), cfg, tokenizer
        self.device = torch.device(device)
        self.student, self.student_steps = (student.to(device) if student is not None else None), student_steps
        self.student_s_min = student_s_min
        self._procs: dict[tuple, SpacedCosine] = {}

    @property
    def mode(self) -> str:
        return "baseline" if self.student is None else "dmd"

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", vae_path: str | None = None,
                        weights: str = "model_ema", heads: int | None = None, mode: str = "baseline") -> MARPipeline:
        """Our export folder (its config.json says everything), or an official checkpoint-last.pth (sizes from its
        weights and args; sampling defaults of engine_mar.py; `vae_path` = kl16.ckpt). mode "dmd": the few-step
        student of a launcher/train_c2i.py export in place of the DiffLoss sampler."""
        if mode not in MAR_MODES:
            raise ValueError(f"mode={mode!r}: a MAR checkpoint runs {MAR_MODES}")
        path = Path(path)
        if path.is_dir():
            model, cfg = load_mar_export(path)
            if mode == "dmd":
                student, steps, s_min = load_student(path, model)
                return cls(model, cfg, build_c2i_tokenizer(cfg, device), device, student, steps, s_min)
        elif mode == "dmd":
            raise ValueError(f"{path}: an official checkpoint has no distilled student; --mode dmd needs a "
                             "launcher/train_c2i.py export folder")
        else:
            model, steps = load_mar(path, weights, heads)
            cfg = resolve_c2i_config("mar-large", overrides=[f"image.vae_path={vae_path or ''}"])
            cfg.model = dataclasses.replace(model.cfg)
            cfg.data.resolution = model.cfg.img_size
            cfg.sampling.num_sampling_steps = steps
        return cls(model, cfg, build_c2i_tokenizer(cfg, device), device)

    def process(self, steps: str, start: int = 999) -> SpacedCosine:
        if (steps, start) not in self._procs:
            self._procs[steps, start] = SpacedCosine.make(steps, start=None if start == 999 else start)
        return self._procs[steps, start]

    @torch.no_grad()
    def generate_tokens(self, labels: list[int] | torch.Tensor | None, seed: int, batch: int | None = None,
                        **overrides) -> torch.Tensor:
        """Tokens (B, L, C); `overrides` replace cfg.sampling keys (num_iter, cfg, cfg_schedule, temperature,
        num_sampling_steps). labels None: `batch` unconditional images."""
        s = dataclasses.replace(self.cfg.sampling, **overrides)
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        B = len(labels) if labels is not None else int(batch or 1)
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        orders = random_orders(B, self.model.cfg.seq_len, g).to(self.device)

        def noise(shape):
            return torch.randn(shape, generator=g).to(self.device)
        if self.student is not None:  # guidance is built into the student
            if float(overrides.get("cfg", 1.0)) != 1.0:
                raise ValueError(f"cfg={overrides['cfg']}: the dmd student has its guidance built in (distill."
                                 "guidance); sample it without sampling.cfg")
            return mar_generate(self.model, labels, orders, None, noise, num_iter=s.num_iter, student=self.student,
                                student_steps=self.student_steps, s_min=self.student_s_min)
        return mar_generate(self.model, labels, orders, self.process(str(s.num_sampling_steps), s.ddpm_start), noise,
                            num_iter=s.num_iter, cfg=s.cfg, cfg_schedule=s.cfg_schedule, temperature=s.temperature)

    @torch.no_grad()
    def generate(self, labels, seed: int = 0, **overrides) -> list[Image.Image]:
        return to_pil(self.tokenizer.decode(self.generate_tokens(labels, seed, **overrides)))

