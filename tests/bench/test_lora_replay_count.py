"""The DragDiffusion LoRA records count the trainings that replayed a kept step instead of assuming it."""

from __future__ import annotations

import pytest

from dragrt.bench.scenarios import dragdiffusion as scenario
from dragrt.runtime.models import lora


def test_replays_are_counted_inside_the_block_only_and_the_trainer_is_restored(monkeypatch) -> None:
    monkeypatch.setattr(lora, "_train_warm", lambda *a, **k: {"w": a[0]})
    inner = lora._train_warm
    with scenario._counting_kept_step_replays() as replays:
        assert lora._train_warm(7) == {"w": 7}  # the replay still runs and returns its weights
        lora._train_warm(8)
    assert replays == [1, 1] and lora._train_warm is inner
    lora._train_warm(9)
    assert replays == [1, 1]
    with pytest.raises(RuntimeError), scenario._counting_kept_step_replays():
        raise RuntimeError("a failed run")
    assert lora._train_warm is inner
