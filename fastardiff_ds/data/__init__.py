"""Data: synthetic shapes (shapes.py, synthetic.py), img2dataset shards (shards.py, writer.py,
metadata.py), the streaming training loader (config.py, loader.py, reader.py, decode.py) and latent
caching (latents.py)."""
from fastardiff_ds.data.config import DataConfig
from fastardiff_ds.data.loader import LoaderState, StreamingLoader, build_loader

__all__ = ["DataConfig", "LoaderState", "StreamingLoader", "build_loader"]
