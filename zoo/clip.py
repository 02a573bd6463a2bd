"""faces-clip: a tiny CLIP (``transformers.CLIPModel``) trained contrastively on faces-world renders and captions.

It is the guidance and ranking model of Blended Diffusion, and its text tower (as a standalone
``CLIPTextModel``, :func:`text_encoder_from_clip`) conditions the faces latent diffusion model the way SD 1.5's
text encoder does: on ``last_hidden_state`` of 77 token ids from our own tokenizer (:mod:`dragrt.zoo.text`).

Images: the 256 x 256 render, as float in ``[-1, 1]``, resized (bilinear, antialiased) to ``IMAGE_SIZE``
(:func:`clip_pixels`). Equivalently ``CLIPImageProcessor`` with mean = std = 0.5 (``preprocessor_config.json``).

Training data are rendered on the fly in DataLoader workers from seed streams (no data set on disk):

* **hard pairs**: most faces come with a *twin*, the same face (same pose, colours, details) with one
  caption-visible attribute changed (a categorical class, or a continuous value across a caption threshold),
  so a batch always holds negatives that differ from a positive in one phrase only;
* **partial captions**: some captions keep a random subset of their phrases (``"a cap, on a red
  background"``), so short prompts (Blended Diffusion's) are in distribution. A partial caption is true of
  every image whose full caption contains its phrases; a full caption only of images with the same caption.
  The loss is CLIP's symmetric cross-entropy with these (soft, multi-positive) targets, which is exactly
  ``CLIPModel(return_loss=True)``'s loss when every caption is full and distinct;
* **a replay buffer** on the device: each step renders ``fresh`` faces and trains on them plus older faces
  drawn from the buffer, since the small model outpaces the CPU renderer.

The schedule length is planned from the measured step rate so that the cosine decay ends inside the
first chunk's ``minutes`` (minus an evaluation reserve); a resumed chunk continues the saved schedule.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dragrt.zoo import text as ztext
from dragrt.zoo import training

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

NAME = "faces-clip"
WEIGHTS_FILE = "model.safetensors"
#: The shipped fp16 weights (text and vision towers together) must stay within this many bytes.
MAX_BYTES = 4_000_000
#: Phrase slots per caption (captions have at most 14 phrases).
MAX_PHRASES = 16
#: Continuous attributes the captions mention (a twin may move one of them across a caption threshold).
CAPTION_CONTINUOUS = ("smile", "mouth_open", "eye_size", "eye_open", "gaze", "brow_raise", "brow_tilt",
                      "nose_size", "head_yaw", "head_roll")
COMMAND = f"python -m dragrt.zoo.train {NAME} --run-dir RUN --minutes 4 --export"


@dataclass(frozen=True)
class Recipe:
    """Model size and training settings of one run (saved in the checkpoint; a resumed run keeps its own)."""

    # model
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    image_size: int = 224
    patch_size: int = 16
    projection_dim: int = 128
    # data
    render_size: int = 256
    batch_size: int = 512  # faces per step (fresh + replayed)
    fresh: int = 128  # newly rendered faces per step
    buffer: int = 32768  # replay buffer capacity (faces, uint8 at render_size, on the device)
    twin_prob: float = 0.75  # probability that a face comes with a one-attribute twin
    partial_prob: float = 0.25  # probability that a caption keeps only a random subset of its phrases
    num_workers: int = -1  # -1: one per CPU core but two, at most 15
    # optimisation
    lr: float = 1e-3
    lr_floor: float = 0.02  # final lr / lr
    warmup: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_steps: int = 400
    max_steps: int = 8000
    calib_skip: int = 60  # steps before the step rate is timed (workers warming up)
    calib_steps: int = 200
    reserve_s: float = 30.0  # seconds of the first chunk's budget kept for saving and evaluation
    fixed_steps: int = 0  # > 0: this many steps, no planning (smoke runs)
    checkpoint_every: int = 1000
    # evaluation
    eval_pairs: int = 1000
    eval_group: int = 100

    def __post_init__(self) -> None:
        for name in ("text_width", "text_layers", "text_heads", "vision_width", "vision_layers", "vision_heads",
                     "patch_size", "projection_dim", "batch_size", "fresh", "buffer", "warmup", "min_steps",
                     "max_steps", "calib_steps", "checkpoint_every", "eval_pairs", "eval_group"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.text_width % self.text_heads or self.vision_width % self.vision_heads:
            raise ValueError(f"text_width / vision_width must be multiples of text_heads / vision_heads; got "
                             f"{self.text_width}/{self.text_heads}, {self.vision_width}/{self.vision_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size must be a multiple of patch_size; got {self.image_size}, {self.patch_size}")
        if not 16 <= self.render_size <= 2048:
            raise ValueError(f"render_size must be in [16, 2048]; got {self.render_size}")
        if not 1 <= self.fresh <= self.batch_size:
            raise ValueError(f"fresh must be in [1, batch_size={self.batch_size}]; got {self.fresh}")
        if self.buffer < self.batch_size:
            raise ValueError(f"buffer must be >= batch_size={self.batch_size}; got {self.buffer}")
        for name in ("twin_prob", "partial_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        if not self.lr > 0 or not 0.0 <= self.lr_floor <= 1.0:
            raise ValueError(f"lr must be > 0 and lr_floor in [0, 1]; got {self.lr}, {self.lr_floor}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps must be <= max_steps; got {self.min_steps} > {self.max_steps}")
        if not 2 <= self.eval_group <= self.eval_pairs:
            raise ValueError(f"eval_group must be in [2, eval_pairs={self.eval_pairs}]; got {self.eval_group}")


RECIPE = Recipe()
SMOKE_RECIPE = Recipe(
    text_width=32, text_layers=1, text_heads=2, vision_width=32, vision_layers=1, vision_heads=2,
    image_size=32, patch_size=8, projection_dim=32, render_size=32, batch_size=24, fresh=8, buffer=96,
    num_workers=0, lr=1e-2, warmup=4, min_steps=1, calib_skip=0, calib_steps=1, reserve_s=0.0, fixed_steps=60,
    checkpoint_every=1000, eval_pairs=20, eval_group=10,
)


# --------------------------------------------------------------------------------------------------
# Model, tokenizer, loading
# --------------------------------------------------------------------------------------------------


def clip_config(recipe: Recipe, tokenizer: CLIPTokenizer) -> CLIPConfig:
    """The ``CLIPConfig`` of ``recipe`` with ``tokenizer``'s vocabulary and special ids (SD's 77 positions)."""
    from transformers import CLIPConfig

    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    text = dict(vocab_size=len(tokenizer), hidden_size=recipe.text_width, intermediate_size=4 * recipe.text_width,
                num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
                max_position_embeddings=ztext.MAX_LENGTH, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                projection_dim=recipe.projection_dim)
    vision = dict(hidden_size=recipe.vision_width, intermediate_size=4 * recipe.vision_width,
                  num_hidden_layers=recipe.vision_layers, num_attention_heads=recipe.vision_heads,
                  image_size=recipe.image_size, patch_size=recipe.patch_size, num_channels=3,
                  projection_dim=recipe.projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=recipe.projection_dim)


def build_clip(recipe: Recipe, tokenizer: CLIPTokenizer) -> CLIPModel:
    from transformers import CLIPModel

    return CLIPModel(clip_config(recipe, tokenizer))


def load_clip(path: str | os.PathLike = "zoo:" + NAME, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[CLIPModel, CLIPTokenizer]:
    """The exported model (a transformers folder, or ``"zoo:faces-clip"``), frozen, in eval mode, and its
    tokenizer."""
    from transformers import CLIPModel

    folder = training.resolve_zoo_path(path, "load_clip")
    for name in ("config.json", WEIGHTS_FILE, "vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"load_clip: {folder / name} is missing; expected an exported {NAME} folder")
    model = CLIPModel.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    model.to(device).eval().requires_grad_(False)
    return model, ztext.load_tokenizer(folder)


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The text tower of ``clip`` as a standalone ``CLIPTextModel`` (its own config, weights copied exactly,
    same dtype and device; frozen, in eval mode): what a Stable Diffusion pipeline conditions on
    (``last_hidden_state`` of :func:`tokenize`'s 77 ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig.from_dict(clip.config.text_config.to_dict())
    cfg.architectures = ["CLIPTextModel"]
    ref = next(clip.text_model.parameters())
    text = CLIPTextModel(cfg).to(device=ref.device, dtype=ref.dtype)
    src = {k[len("text_model."):]: v for k, v in clip.state_dict().items() if k.startswith("text_model.")}
    # transformers moved CLIPTextModel's modules up a level (5.x): map to whichever layout this one has.
    if "embeddings.token_embedding.weight" not in text.state_dict():
        src = {"text_model." + k: v for k, v in src.items()}
    text.load_state_dict(src, strict=True)
    return text.eval().requires_grad_(False)


def save_text_encoder(text_model: CLIPTextModel, dest: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``text_model`` as a transformers folder (``config.json`` + ``model.safetensors`` in ``dtype``)
    with the hub's key layout (``text_model.*``), which every transformers version loads."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in text_model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        key = k if k.startswith("text_model.") else "text_model." + k
        v = v.detach().to("cpu")
        state[key] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    cfg = copy.deepcopy(text_model.config)
    cfg.architectures = ["CLIPTextModel"]
    # The dtype a plain from_pretrained loads in: float32, as diffusers loads the other parts of a pipeline. With
    # "float16" here transformers 5 ("auto" dtype) kept the text tower in fp16 next to an fp32 UNet, and
    # StableDiffusionPipeline.from_pretrained(folder) failed with a dtype mismatch.
    cfg.dtype = torch.float32
    cfg.save_pretrained(str(dest))
    save_file(state, str(dest / WEIGHTS_FILE), metadata={"format": "pt"})
    os.chmod(dest / WEIGHTS_FILE, 0o644)
    return dest


def _write_preprocessor(dest: Path, image_size: int) -> None:
    cfg = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"height": image_size, "width": image_size}, "resample": 2, "do_center_crop": False,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
    }
    (dest / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Embeddings, loss, metrics
# --------------------------------------------------------------------------------------------------


def clip_pixels(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` (uint8 in [0, 255] or float in [-1, 1]) -> ``pixel_values`` float
    ``[B, 3, image_size, image_size]`` in [-1, 1] (bilinear, antialiased; differentiable for float input)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W]; got shape {tuple(images.shape)}")
    x = images.float().div(127.5).sub(1.0) if images.dtype == torch.uint8 else images
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


def encode_images(clip: CLIPModel, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Projected image embeddings ``[B, projection_dim]`` (unit length when ``normalize``)."""
    pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
    emb = clip.visual_projection(pooled)
    return F.normalize(emb, dim=-1) if normalize else emb


def encode_text(clip: CLIPModel, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Projected text embeddings ``[B, projection_dim]`` of token ids (bos ... eos, eos-padded)."""
    pooled = clip.text_model(input_ids=input_ids).pooler_output
    emb = clip.text_projection(pooled)
    return F.normalize(emb, dim=-1) if normalize else emb


def tokenize(tokenizer: CLIPTokenizer, texts: Sequence[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """Token ids ``[B, 77]``: bos, words, eos, eos-padded (SD's layout)."""
    ids = tokenizer(list(texts), padding="max_length", max_length=ztext.MAX_LENGTH, truncation=True,
                    return_tensors="pt")["input_ids"]
    return ids.to(device)


@torch.no_grad()
def embed_texts(clip: CLIPModel, tokenizer: CLIPTokenizer, texts: Sequence[str], batch: int = 1024) -> torch.Tensor:
    """Unit text embeddings of ``texts`` (float32, on the model's device)."""
    dev = next(clip.parameters()).device
    out = [encode_text(clip, tokenize(tokenizer, texts[i:i + batch], dev)).float() for i in range(0, len(texts), batch)]
    return torch.cat(out) if out else torch.empty(0, clip.config.projection_dim, device=dev)


def contrastive_loss(logits_per_image: torch.Tensor, truth: torch.Tensor | None = None,
                     check: bool = True) -> torch.Tensor:
    """CLIP's symmetric cross-entropy of ``logits_per_image`` ``[I, T]``. ``truth`` ``[T, I]`` (bool) says which
    captions are true of which images; each row's (column's) targets are spread evenly over its true
    partners. ``None``: the diagonal (then equal to ``CLIPModel(return_loss=True)``'s loss). ``check=False``
    skips the test that every row and column has a true partner (it waits for the device)."""
    n_img, n_txt = logits_per_image.shape
    if truth is None:
        if n_img != n_txt:
            raise ValueError(f"without truth, logits must be square; got {n_img} x {n_txt}")
        truth = torch.eye(n_img, dtype=torch.bool, device=logits_per_image.device)
    if truth.shape != (n_txt, n_img):
        raise ValueError(f"truth must be [texts, images] = [{n_txt}, {n_img}]; got {tuple(truth.shape)}")
    t = truth.to(logits_per_image.dtype)
    if check and (bool((t.sum(0) == 0).any()) or bool((t.sum(1) == 0).any())):
        raise ValueError("truth needs at least one true caption for every image and one image for every caption")
    i2t = F.cross_entropy(logits_per_image, t.T / t.T.sum(1, keepdim=True))
    t2i = F.cross_entropy(logits_per_image.T, t / t.sum(1, keepdim=True))
    return 0.5 * (i2t + t2i)


def phrase_hash(phrase: str) -> int:
    """A stable non-zero int64 id of a caption phrase (0 marks an empty slot)."""
    h = int.from_bytes(hashlib.blake2b(phrase.encode("utf-8"), digest_size=8).digest(), "little", signed=True)
    return h or 1


def phrase_ids(text: str) -> np.ndarray:
    """The phrases of a caption (``", "``-separated) as ``MAX_PHRASES`` int64 ids, zero-padded."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) > MAX_PHRASES:
        raise ValueError(f"a caption may have at most {MAX_PHRASES} phrases; got {len(parts)} in {text!r}")
    out = np.zeros(MAX_PHRASES, np.int64)
    out[:len(parts)] = [phrase_hash(p) for p in parts]
    return out


def caption_truth(text_ids: torch.Tensor, text_partial: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """``[T, I]`` bool: whether caption ``t`` is true of image ``i``. ``text_ids`` ``[T, K]`` / ``image_ids``
    ``[I, K]``: phrase ids (:func:`phrase_ids`; the image's are those of its full caption). A partial caption
    is true when all its phrases are among the image's, a full one when the phrase sets are equal."""
    present = text_ids != 0
    match = (text_ids[:, None, :, None] == image_ids[None, :, None, :]).any(-1)  # [T, I, K]
    subset = (match | ~present[:, None, :]).all(-1)
    same_size = present.sum(-1)[:, None] == (image_ids != 0).sum(-1)[None, :]
    return subset & (text_partial[:, None] | same_size)


def retrieval_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: Sequence[str],
                       group: int = 100, k: int = 5) -> dict[str, float]:
    """Top-1 (and top-``k`` image->text) retrieval accuracy within consecutive groups of ``group`` pairs.

    Pair ``i`` is (image ``i``, caption ``i``). Image->text is right when the best-scoring caption of the
    group *reads the same* as the image's own (so identical captions are not counted as errors); text->image
    when the best-scoring image's caption reads the same as the query. A trailing partial group is left out.
    """
    n = image_emb.shape[0]
    if text_emb.shape[0] != n or len(captions) != n:
        raise ValueError(f"image_emb, text_emb and captions must have the same length; got {n}, "
                         f"{text_emb.shape[0]}, {len(captions)}")
    if not 2 <= group <= n:
        raise ValueError(f"group must be in [2, {n}] (the number of pairs); got {group}")
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions], device=image_emb.device)
    i2t = t2i = topk = 0
    groups = n // group
    for g in range(groups):
        sl = slice(g * group, (g + 1) * group)
        sim = image_emb[sl].float() @ text_emb[sl].float().T  # [images, texts]
        c = cid[sl]
        i2t += int((c[sim.argmax(1)] == c).sum())
        t2i += int((c[sim.argmax(0)] == c).sum())
        kk = min(k, group)
        topk += int((c[sim.topk(kk, dim=1).indices] == c[:, None]).any(1).sum())
    total = groups * group
    return {"i2t_top1": i2t / total, "t2i_top1": t2i / total, f"i2t_top{k}": topk / total,
            "eval_pairs_scored": total}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def twin_params(params, rng: np.random.Generator):
    """``params`` with one caption-visible attribute changed (``None`` if no change altered the caption)."""
    from dragrt.zoo import world

    names = list(world.CATEGORICAL) + list(CAPTION_CONTINUOUS)
    base = world.caption(params)
    for _ in range(8):
        name = names[int(rng.integers(len(names)))]
        if name in world.CATEGORICAL:
            classes = [c for c in world.CATEGORICAL[name] if c != getattr(params, name)]
            value = classes[int(rng.integers(len(classes)))]
        else:
            value = float(rng.random())
        twin = params.replace(**{name: value})
        if world.caption(twin) != base:
            return twin
    return None


def partial_caption(caption: str, rng: np.random.Generator) -> str:
    """A random non-empty subset of the caption's phrases, in order."""
    parts = caption.split(", ")
    keep = rng.random(len(parts)) < 0.5
    if not keep.any():
        keep[int(rng.integers(len(parts)))] = True
    return ", ".join(p for p, k in zip(parts, keep) if k)


def face_sample(params, size: int, rng: np.random.Generator, partial_prob: float,
                tokenizer: CLIPTokenizer | None = None) -> dict[str, Any]:
    """One training face: uint8 image ``[3, size, size]``, the caption to train on (and its 77 token ids when
    a tokenizer is given), phrase ids of that caption and of the face's full caption, whether it is partial."""
    from dragrt.zoo import world

    face = world.render(params, size)
    partial = bool(rng.random() < partial_prob)
    text = partial_caption(face.caption, rng) if partial else face.caption
    extra = {} if tokenizer is None else {"input_ids": tokenize(tokenizer, [text])[0]}
    return {
        **extra,
        "image": torch.from_numpy(np.ascontiguousarray(face.image.transpose(2, 0, 1))),
        "caption": text,
        "text_phrases": torch.from_numpy(phrase_ids(text)),
        "image_phrases": torch.from_numpy(phrase_ids(face.caption)),
        "partial": torch.tensor(partial),
    }


class FaceTextStream(IterableDataset):
    """Endless training faces with captions, twins and partial captions (see the module docstring).

    Worker ``w`` of ``W`` walks :func:`dragrt.zoo.data.stream_seeds` ``(seed, epoch, w, W)``; everything about
    a face (twin, caption subset) comes from its own seed, so the stream is deterministic given those keys.
    With a ``tokenizer`` the workers also tokenize (``input_ids``), which keeps the training loop's process free."""

    def __init__(self, seed: int, size: int, epoch: int = 0, twin_prob: float = 0.75,
                 partial_prob: float = 0.25, tokenizer: CLIPTokenizer | None = None) -> None:
        super().__init__()
        self.seed, self.size, self.epoch = int(seed), int(size), int(epoch)
        self.twin_prob, self.partial_prob = float(twin_prob), float(partial_prob)
        self.tokenizer = tokenizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from dragrt.zoo import data, world

        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for s in data.stream_seeds(self.seed, self.epoch, worker, n):
            rng = np.random.default_rng([s, 0xC11])
            params = world.sample_params(s)
            yield face_sample(params, self.size, rng, self.partial_prob, self.tokenizer)
            if rng.random() < self.twin_prob:
                twin = twin_params(params, rng)
                if twin is not None:
                    yield face_sample(twin, self.size, rng, self.partial_prob, self.tokenizer)


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``t`` on ``dev``; CPU tensors go through pinned memory without waiting for the device's queue."""
    if dev.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def default_workers(requested: int) -> int:
    return training.default_workers(requested, cap=15)


def face_text_loader(recipe: Recipe, seed: int, epoch: int, device: torch.device,
                     tokenizer: CLIPTokenizer) -> DataLoader:
    workers = default_workers(recipe.num_workers)
    ds = FaceTextStream(seed, recipe.render_size, epoch, recipe.twin_prob, recipe.partial_prob, tokenizer)
    kw: dict[str, Any] = {}
    if workers > 0:
        kw = dict(prefetch_factor=4, worker_init_fn=_worker_init, persistent_workers=False)
    return DataLoader(ds, batch_size=recipe.fresh, num_workers=workers, pin_memory=device.type == "cuda", **kw)


class ReplayBuffer:
    """A ring of the last ``capacity`` training faces on the device (uint8 images, token ids, phrase ids)."""

    def __init__(self, capacity: int, render_size: int, device: torch.device) -> None:
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.images = torch.empty(capacity, 3, render_size, render_size, dtype=torch.uint8, device=device)
        self.ids = torch.empty(capacity, ztext.MAX_LENGTH, dtype=torch.long, device=device)
        self.text_phrases = torch.empty(capacity, MAX_PHRASES, dtype=torch.long, device=device)
        self.image_phrases = torch.empty(capacity, MAX_PHRASES, dtype=torch.long, device=device)
        self.partial = torch.empty(capacity, dtype=torch.bool, device=device)

    def fields(self) -> tuple[torch.Tensor, ...]:
        return self.images, self.ids, self.text_phrases, self.image_phrases, self.partial

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        n = min(n, self.size)
        idx = to_device(torch.randperm(self.size, generator=gen)[:n], self.images.device)
        return tuple(t[idx] for t in self.fields())

    def add(self, batch: Sequence[torch.Tensor]) -> None:
        n = batch[0].shape[0]
        idx = to_device((torch.arange(n) + self.pos) % self.capacity, self.images.device)
        for dst, src in zip(self.fields(), batch):
            dst[idx] = src
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(clip: CLIPModel, tokenizer: CLIPTokenizer, *, pairs: int, group: int, render_size: int,
             num_workers: int = 0, zero_shot: bool = True) -> dict[str, Any]:
    """Held-out metrics: retrieval within groups of ``group`` of the first ``pairs`` held-out faces
    (:func:`retrieval_accuracy`), and zero-shot attribute accuracy: for every categorical attribute, the
    face's caption is written once per class of that attribute (all else as it is) and the best-scoring
    one must name the true class."""
    from dragrt.zoo import data, world

    dev = next(clip.parameters()).device
    image_size = clip.config.vision_config.image_size
    was_training = clip.training
    clip.eval()
    loader = data.make_loader(100, num_workers=num_workers, size=render_size, held_out=pairs, uint8=True)
    img, captions, seeds = [], [], []
    for b in loader:
        img.append(encode_images(clip, clip_pixels(b["image"].to(dev), image_size)).float())
        captions += list(b["caption"])
        seeds += [int(s) for s in b["seed"]]
    image_emb = torch.cat(img)
    text_emb = embed_texts(clip, tokenizer, captions)
    out: dict[str, Any] = retrieval_accuracy(image_emb, text_emb, captions, group)
    if zero_shot:
        params = [world.sample_params(s) for s in seeds]
        accs = {}
        for name, classes in world.CATEGORICAL.items():
            texts = [world.caption(p.replace(**{name: c})) for p in params for c in classes]
            emb = embed_texts(clip, tokenizer, texts).view(len(params), len(classes), -1)
            pred = torch.einsum("nd,ncd->nc", image_emb, emb).argmax(1).cpu()
            truth = torch.tensor([classes.index(getattr(p, name)) for p in params])
            accs[name] = float((pred == truth).float().mean())
        out.update({f"zero_shot_{k}": round(v, 4) for k, v in accs.items()})
        out["zero_shot_mean"] = round(float(np.mean(list(accs.values()))), 4)
    for k in ("i2t_top1", "t2i_top1", "i2t_top5"):
        out[k] = round(out[k], 4)
    clip.train(was_training)
    return out


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or name == "logit_scale":
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu or cuda[:N]; got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is cuda but no CUDA GPU is usable here; pass --device cpu (with --smoke)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif dev.type != "cpu":
        raise ValueError(f"device must be cpu or cuda[:N]; got {device!r}")
    return dev


def train(run_dir: str | os.PathLike, *, minutes: float = 4.0, device: str = "cuda", seed: int = 0,
          smoke: bool = False) -> dict[str, Any]:
    """Train (or resume) faces-clip in ``run_dir`` for at most ``minutes``; returns the held-out metrics.

    Stops when the schedule is done or the budget (minus ``reserve_s``) is spent, saves ``checkpoint.pt``,
    evaluates, writes ``metrics.json``."""
    budget = training.Budget(minutes)
    dev = _check_device(device)
    if seed < 0:
        raise ValueError(f"seed must be >= 0; got {seed}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = training.load_checkpoint(run_dir)
    if state is not None:
        if state.get("name") != NAME:
            raise ValueError(f"{run_dir} holds a checkpoint of {state.get('name')!r}, not {NAME!r}")
        recipe = Recipe(**state["recipe"])
        seed = int(state["seed"])
        vocabulary = list(state["vocabulary"])
        progress = dict(state["progress"])
    else:
        recipe = SMOKE_RECIPE if smoke else RECIPE
        vocabulary = list(ztext.world_vocabulary())
        progress = {"step": 0, "images": 0, "seconds": 0.0, "chunks": 0,
                    "schedule_steps": recipe.fixed_steps, "workers": default_workers(recipe.num_workers)}
    recipe = Recipe(**{**asdict(recipe), "num_workers": int(progress["workers"])})
    tokenizer = ztext.build_tokenizer(run_dir / "tokenizer", vocabulary)

    torch.manual_seed(seed)
    model = build_clip(recipe, tokenizer).to(dev)
    fused = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6,
                            **fused)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    start_step = int(progress["step"])
    gen = torch.Generator().manual_seed(training.mix_seed(seed, start_step, 2))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    max_scale = math.log(100.0)
    train_end = max(budget.seconds - recipe.reserve_s, 0.5 * budget.seconds)
    calib_t0: float | None = None
    losses: list[torch.Tensor] = []
    model.train()
    chunk_start = time.monotonic()

    def done() -> bool:
        s = progress["schedule_steps"]
        return s > 0 and progress["step"] >= s

    loader = it = buffer = None
    if not done():
        loader = face_text_loader(recipe, seed, epoch=start_step, device=dev, tokenizer=tokenizer)
        it = iter(loader)
        buffer = ReplayBuffer(recipe.buffer, recipe.render_size, dev)
    while not done() and budget.elapsed < train_end:
        step = progress["step"]
        b = next(it)
        fresh = tuple(to_device(b[k], dev) for k in ("image", "input_ids", "text_phrases", "image_phrases", "partial"))
        if buffer.size:
            old = buffer.sample(recipe.batch_size - recipe.fresh, gen)
            images, ids, tph, iph, partial = (torch.cat([f, o]) for f, o in zip(fresh, old))
        else:
            images, ids, tph, iph, partial = fresh
        buffer.add(fresh)
        truth = caption_truth(tph, partial, iph)
        for g in opt.param_groups:
            total = progress["schedule_steps"] or recipe.max_steps
            g["lr"] = recipe.lr * training.lr_factor(step, recipe.warmup, total, recipe.lr_floor)
        with autocast:
            img = encode_images(model, clip_pixels(images, recipe.image_size), normalize=False)
            txt = encode_text(model, ids, normalize=False)
        # logits in fp32: bf16 cannot resolve a logit scale of up to 100
        logits = model.logit_scale.exp() * (F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).T)
        loss = contrastive_loss(logits, truth, check=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, max_scale)
        losses.append(loss.detach())
        progress["step"] += 1
        progress["images"] += int(b["image"].shape[0])
        chunk_step = progress["step"] - start_step
        calib = (recipe.calib_skip, recipe.calib_skip + recipe.calib_steps)
        if progress["schedule_steps"] == 0 and chunk_step in calib:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if chunk_step == recipe.calib_skip:
                calib_t0 = time.monotonic()
            elif calib_t0 is not None:
                rate = recipe.calib_steps / max(time.monotonic() - calib_t0, 1e-6)
                more = int(0.95 * rate * max(train_end - budget.elapsed, 0.0))
                progress["schedule_steps"] = max(min(max(progress["step"] + more, recipe.min_steps),
                                                     recipe.max_steps), progress["step"] + 1)
                _log(f"{NAME}: {rate:.1f} steps/s, schedule {progress['schedule_steps']} steps")
        if progress["step"] % 250 == 0:
            _log(f"{NAME} step {progress['step']}/{progress['schedule_steps'] or '?'} loss {loss.item():.4f} "
                 f"scale {model.logit_scale.exp().item():.1f} lr {opt.param_groups[0]['lr']:.2e} "
                 f"{budget.elapsed:.0f}s")
        if progress["step"] % recipe.checkpoint_every == 0:
            _save(run_dir, recipe, seed, vocabulary, progress, model, opt)
    del it, loader, buffer
    progress["seconds"] += time.monotonic() - chunk_start
    progress["chunks"] += 1
    _save(run_dir, recipe, seed, vocabulary, progress, model, opt)

    t0 = time.monotonic()
    metrics = evaluate(model, tokenizer, pairs=recipe.eval_pairs, group=recipe.eval_group,
                       render_size=recipe.render_size, num_workers=recipe.num_workers)
    loss_values = torch.stack(losses).float().cpu().tolist() if losses else []
    if loss_values:
        k = max(1, min(50, len(loss_values) // 4))
        metrics["loss_first"] = round(float(np.mean(loss_values[:k])), 4)
        metrics["loss_last"] = round(float(np.mean(loss_values[-k:])), 4)
    metrics.update(
        name=NAME, step=progress["step"], schedule_steps=progress["schedule_steps"],
        images_rendered=progress["images"], train_seconds=round(progress["seconds"], 1), chunks=progress["chunks"],
        chunk_steps=progress["step"] - start_step,
        eval_seconds=round(time.monotonic() - t0, 1), device=str(dev), device_name=training.device_name(dev), seed=seed,
        smoke=bool(smoke), params=sum(p.numel() for p in model.parameters()),
        logit_scale=round(float(model.logit_scale.detach().exp()), 2), commit=training.git_commit(),
    )
    training.write_metrics(run_dir, metrics)
    return metrics


def _save(run_dir: Path, recipe: Recipe, seed: int, vocabulary: list[str], progress: Mapping[str, Any],
          model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    training.save_checkpoint(run_dir, {
        "name": NAME, "recipe": asdict(recipe), "seed": seed, "vocabulary": vocabulary, "progress": dict(progress),
        "model": model.state_dict(), "optimizer": opt.state_dict(),
    })


@training.staged_export
def export(run_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write ``run_dir``'s model as a transformers folder into ``dest``: ``config.json``, fp16
    ``model.safetensors``, the tokenizer files, ``preprocessor_config.json`` and ``MODEL_CARD.md``."""
    from safetensors.torch import save_file

    run_dir, dest = Path(run_dir), Path(dest)
    state = training.load_checkpoint(run_dir)
    if state is None or state.get("name") != NAME:
        raise FileNotFoundError(f"export: {run_dir} has no {NAME} checkpoint; train first")
    metrics = training.read_metrics(run_dir)
    recipe = Recipe(**state["recipe"])
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = ztext.build_tokenizer(dest, state["vocabulary"])
    model = build_clip(recipe, tokenizer)
    model.load_state_dict(state["model"])
    model.config.architectures = ["CLIPModel"]
    model.config.save_pretrained(str(dest))
    weights = {k: v for k, v in training.fp16_state_dict(model).items() if not k.endswith("position_ids")}
    save_file(weights, str(dest / WEIGHTS_FILE), metadata={"format": "pt"})
    os.chmod(dest / WEIGHTS_FILE, 0o644)  # package data: readable by all
    _write_preprocessor(dest, recipe.image_size)
    size = (dest / WEIGHTS_FILE).stat().st_size
    if size > MAX_BYTES and not metrics.get("smoke"):
        raise ValueError(f"export: {NAME} weights are {size} bytes, over the {MAX_BYTES}-byte budget")
    progress = state["progress"]
    n_text = sum(p.numel() for p in model.text_model.parameters())
    n_vision = sum(p.numel() for p in model.vision_model.parameters())
    shown = ("i2t_top1", "t2i_top1", "i2t_top5", "eval_pairs_scored", "zero_shot_mean",
             *sorted(k for k in metrics if k.startswith("zero_shot_") and k != "zero_shot_mean"),
             "loss_first", "loss_last", "logit_scale")
    training.write_card(
        dest, name=NAME,
        summary=(
            "A tiny CLIP (`transformers.CLIPModel`) for the faces world. "
            f"Text tower: {recipe.text_layers} layers, width {recipe.text_width}, {recipe.text_heads} heads, "
            f"77 positions, vocabulary {len(tokenizer)} ({n_text} parameters). Vision tower: ViT with "
            f"{recipe.image_size}px input, {recipe.patch_size}px patches, {recipe.vision_layers} layers, width "
            f"{recipe.vision_width} ({n_vision} parameters). Projection {recipe.projection_dim}. "
            f"fp16 safetensors ({size} bytes).\n\n"
            "Inputs: token ids from the tokenizer in this folder (our own, built from the world's caption "
            "vocabulary: one token per word, bos/eos, eos-padded to 77); images as the 256px render in [-1, 1] "
            f"resized to {recipe.image_size} (bilinear, antialiased; `dragrt.zoo.clip.clip_pixels`, or "
            "`preprocessor_config.json`). Load with `dragrt.zoo.clip.load_clip('zoo:faces-clip')`; the text "
            "tower as a Stable Diffusion text encoder with `text_encoder_from_clip`."),
        data=(
            "Faces-world renders (`dragrt.zoo.world`) from training seeds, rendered on the fly; most faces come "
            f"with a twin that differs in one caption-visible attribute (p={recipe.twin_prob}); "
            f"{recipe.partial_prob:.0%} of captions keep a random subset of their phrases. Multi-positive "
            "symmetric contrastive loss (a partial caption is true of every image that has its phrases). "
            f"Evaluation on held-out seeds 2_000_000_000 + i, i < {recipe.eval_pairs}: retrieval within groups "
            f"of {recipe.eval_group} (chance {1 / recipe.eval_group:.0%}); zero-shot attribute accuracy: the "
            "face's caption written with each class of the attribute, best one must be the true class."),
        training={
            "steps": progress["step"], "schedule steps": progress["schedule_steps"],
            "batch": f"{recipe.batch_size} ({recipe.fresh} newly rendered per step, the rest replayed)",
            "faces rendered": progress["images"], "chunks": progress["chunks"],
            "train seconds": round(progress["seconds"], 1), "device": metrics.get("device_name", "?"),
            "commit": metrics.get("commit", "?"), "recipe": json.dumps(state["recipe"], sort_keys=True),
            "command": COMMAND,
        },
        metrics={k: metrics[k] for k in shown if k in metrics},
        files=["config.json", WEIGHTS_FILE, *ztext.FILES, "preprocessor_config.json"],
    )
    return dest


__all__ = [
    "NAME", "RECIPE", "SMOKE_RECIPE", "Recipe", "build_clip", "clip_config", "clip_pixels", "contrastive_loss",
    "caption_truth", "embed_texts", "encode_images", "encode_text", "evaluate", "export", "load_clip",
    "phrase_ids", "retrieval_accuracy", "save_text_encoder", "text_encoder_from_clip", "tokenize", "train",
]
