"""The small DragGAN setup shared by the engine and session tests (importable: tests/ is on sys.path
because tests/conftest.py sits there without an __init__.py)."""

from __future__ import annotations

import torch

from dragrt.runtime.models.stylegan2 import Generator, GeneratorConfig, MappingConfig, SynthesisConfig

# At 64 px the reference radii (3 / 12 at 512) round to 0 / 2; scale them up so the tests have a disc, and
# take big Adam steps so that handles move within a few steps (a parity test where nothing moves proves little).
# The top block's features (the default is b32 at 64 px): what these random-weight tests were tuned on.
BASE = dict(r1=24.0, r2=48.0, lr=0.05, cuda_graph=False, feature_resolution=64)
HANDLES = [[20, 30], [44, 12]]
TARGETS = [[30, 36], [38, 20]]


def small_generator(seed: int = 0) -> Generator:
    """A 64 px StyleGAN2 (10 styles of 32, b64 features of 16 channels), fp32, seeded."""
    torch.manual_seed(seed)
    cfg = GeneratorConfig(img_resolution=64, z_dim=32, w_dim=32, mapping=MappingConfig(num_layers=2),
                          synthesis=SynthesisConfig(channel_base=1024, channel_max=32, num_fp16_res=0))
    return Generator.from_config(cfg)
