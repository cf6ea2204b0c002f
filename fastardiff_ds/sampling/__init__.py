"""Flow-head samplers (Gaussian-transition chains), CFG, the baseline AR loop and exact speculative decoding."""
from .ar_loop import generate_ar
from .common import ARFlow, DecodeStats, GenerationResult
from .flow import SamplerConfig, Trajectory, require_density, sample_tokens, trajectory_logprob
from .guidance import CFGConfig, VelocityField, guidance_scale
from .noise import make_generators
from .speculative import SpecConfig, speculative_generate

__all__ = [
    "ARFlow", "CFGConfig", "DecodeStats", "GenerationResult", "SamplerConfig", "SpecConfig", "Trajectory",
    "VelocityField", "generate_ar", "guidance_scale", "make_generators", "require_density", "sample_tokens",
    "speculative_generate", "trajectory_logprob",
]
