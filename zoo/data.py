"""Toy faces as torch data, rendered on the fly in DataLoader workers from seed streams.

:class:`FaceStream` is an endless stream of training faces: worker ``w`` of ``W`` draws its own training
seeds from a generator keyed by ``(seed, epoch, w, W)``, so a stream is deterministic given ``seed``,
``epoch`` and the worker count, and two epochs never share a stream. :class:`FaceSeeds` is a map-style
dataset over an explicit list of seeds (e.g. :func:`dragrt.zoo.world.held_out_seeds`).

Each sample is a dict: ``image`` float32 ``[3, H, W]`` in ``[-1, 1]``, ``landmarks`` float32 ``[L, 2]``
(pixels of ``size``), ``continuous`` float32 ``[K]``, ``categorical`` int64 ``[M]``, ``caption`` str,
``seed`` int64. The default collate batches them (captions become a list of strings).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from . import world

_CHUNK = 1024


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` (or ``[N, H, W, 3]``) -> float32 ``[3, H, W]`` (``[N, 3, H, W]``) in [-1, 1]."""
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3] or [N, H, W, 3]; got shape {tuple(image.shape)}")
    axes = (2, 0, 1) if image.ndim == 3 else (0, 3, 1, 2)
    x = np.ascontiguousarray(image.transpose(axes), dtype=np.float32)  # numpy: no torch threads in workers
    x *= 1.0 / 127.5
    x -= 1.0
    return torch.from_numpy(x)


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """float ``[3, H, W]`` or ``[N, 3, H, W]`` in [-1, 1] -> uint8 ``[H, W, 3]`` / ``[N, H, W, 3]``."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return (x.permute(1, 2, 0) if x.ndim == 3 else x.permute(0, 2, 3, 1)).numpy()


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` (e.g. a ``uint8=True`` batch, moved to the GPU first) -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def sample(seed: int, size: int = world.IMAGE_SIZE, uint8: bool = False) -> dict:
    """One rendered face as tensors (see the module docstring). ``uint8=True``: the image stays uint8
    ``[3, H, W]`` (4x less to move between processes; convert with :func:`uint8_to_float`)."""
    f = world.render_seed(seed, size)
    img = torch.from_numpy(np.ascontiguousarray(f.image.transpose(2, 0, 1))) if uint8 else image_to_tensor(f.image)
    return {
        "image": img,
        "landmarks": torch.from_numpy(f.landmarks),
        "continuous": torch.from_numpy(f.continuous),
        "categorical": torch.from_numpy(f.categorical),
        "caption": f.caption,
        "seed": torch.tensor(int(seed), dtype=torch.int64),
    }


def stream_seeds(seed: int, epoch: int = 0, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
    """The endless training seeds of one worker of a stream (all in ``[0, world.HELD_OUT_OFFSET)``)."""
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker must be in [0, {num_workers - 1}]; got {worker}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0; got seed={seed}, epoch={epoch}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(worker), int(num_workers)]))
    while True:
        yield from rng.integers(0, world.HELD_OUT_OFFSET, size=_CHUNK, dtype=np.int64).tolist()


class FaceStream(IterableDataset):
    """An endless stream of training faces, sharded over DataLoader workers (see the module docstring)."""

    def __init__(self, seed: int = 0, size: int = world.IMAGE_SIZE, epoch: int = 0, uint8: bool = False) -> None:
        super().__init__()
        world._check_size(size)
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0; got seed={seed}, epoch={epoch}")
        self.seed, self.size, self.epoch, self.uint8 = int(seed), int(size), int(epoch), bool(uint8)

    def set_epoch(self, epoch: int) -> None:
        """Use another stream (e.g. on resume: the epoch as the number of restarts or the step)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0; got {epoch}")
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for s in stream_seeds(self.seed, self.epoch, worker, n):
            yield sample(s, self.size, self.uint8)


class FaceSeeds(Dataset):
    """Faces of an explicit list of seeds (map-style): e.g. ``FaceSeeds(world.held_out_seeds(1000))``."""

    def __init__(self, seeds: Sequence[int], size: int = world.IMAGE_SIZE, uint8: bool = False) -> None:
        world._check_size(size)
        self.seeds = [world._check_seed(s) for s in seeds]
        self.size, self.uint8 = int(size), bool(uint8)

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> dict:
        return sample(self.seeds[i], self.size, self.uint8)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(batch_size: int, seed: int = 0, num_workers: int = 0, size: int = world.IMAGE_SIZE, *,
                epoch: int = 0, held_out: int | None = None, uint8: bool = False, pin_memory: bool = False,
                prefetch_factor: int = 4) -> DataLoader:
    """A DataLoader of faces. By default an endless training stream keyed by ``(seed, epoch)``; with
    ``held_out=n`` the first ``n`` held-out faces, in order, once. ``uint8=True`` keeps images uint8
    ``[N, 3, H, W]`` (convert on the device with :func:`uint8_to_float`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {num_workers}")
    if held_out is not None:
        ds = FaceSeeds(world.held_out_seeds(held_out), size, uint8)
    else:
        ds = FaceStream(seed, size, epoch, uint8)
    kw = {}
    if num_workers > 0:
        kw = dict(prefetch_factor=prefetch_factor, persistent_workers=False, worker_init_fn=_worker_init)
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      drop_last=held_out is None, **kw)
