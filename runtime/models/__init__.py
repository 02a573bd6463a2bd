"""dragrt.runtime.models: the models dragrt owns, and safe converters for their checkpoints.

Import the submodules directly (this package imports nothing, so loading one model never pulls in another):

- :mod:`dragrt.runtime.models.stylegan2`: a StyleGAN2 generator in plain PyTorch ops whose parameter names
  match NVIDIA stylegan2-ada-pytorch's ``G_ema`` (so real checkpoints load with ``strict=True``).
- :mod:`dragrt.runtime.models.stylegan2_convert`: NVIDIA ``.pkl`` / rosinality ``.pt`` -> ``.safetensors`` +
  ``.json`` without running code from the checkpoint; ``load_generator`` reads the pair back.
"""
