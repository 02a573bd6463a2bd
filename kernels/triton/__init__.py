"""Triton implementations of dragrt's ops, one file per op (private kernels, then launchers).

This module registers them with :mod:`dragrt.kernels.dispatch` without importing Triton: the launcher
module is imported on first use, so a machine without Triton still imports dragrt and gets a reason
("the package triton is not installed") from ``dragrt info`` and from dispatch errors.
"""

from __future__ import annotations

import importlib

import torch

from dragrt.kernels import dispatch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _lazy(module: str, attr: str):
    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"dragrt.kernels.triton.{module}"), attr)(*args, **kwargs)

    call.__name__ = f"{module}.{attr}"
    return call


for _op, _module, _attr in (
    ("bilinear_sample", "bilinear_sample", "bilinear_sample"),
    ("bilinear_sample_backward", "bilinear_sample", "bilinear_sample_backward"),
    ("patch_track", "patch_track", "patch_track"),
    ("masked_blend", "masked_blend", "masked_blend"),
):
    dispatch.register(_op, "triton", devices=dispatch.TRITON_DEVICES, dtypes=_FLOATS, priority=10,
                      requirement=dispatch.triton_requirement, auto_devices=("cuda",))(_lazy(_module, _attr))
