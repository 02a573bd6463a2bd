"""dragrt.zoo: our own small models and the toy-faces world they are trained and measured on.

No real Stable Diffusion, StyleGAN or CLIP weights can be had, so quality is shown on a world we control:
a procedural renderer of cartoon faces with ground truth (landmarks, attributes, captions), evaluators
trained on that ground truth, and small models with the real architectures trained on its renders.
Shipped weights live in ``weights/`` (fp16 safetensors + configs + model cards) and are reached as
``zoo:<name>`` wherever a model path is accepted.
"""

if __name__ != "dragrt.zoo":
    raise ImportError(
        f"this folder is the package 'dragrt.zoo', not a top-level '{__name__}'; "
        "install dragrt (pip install -e .) and import dragrt.zoo"
    )
