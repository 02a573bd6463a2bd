"""The run loop the drag engines share: how many steps it takes and what it yields."""

from __future__ import annotations

import pytest
import torch

from dragrt.runtime.engines import stepping


class _Edit:
    """A fake engine whose edit is done at step ``done_at`` (0-based); counts the steps taken."""

    def __init__(self, done_at: int, device_event: bool) -> None:
        self.done_at, self.device_event, self.taken = done_at, device_event, 0

    def step(self):
        k = self.taken
        self.taken += 1
        return torch.tensor([[float(k), 0.0]]), torch.tensor(k >= self.done_at), torch.tensor(float(k))

    def snapshot(self, handles, done, loss):
        snap = stepping.host_copy(handles, done, loss)
        return (*snap[:3], object()) if self.device_event else snap

    def result(self, k, snap, t_last):
        return stepping.step_result(k, (*snap[:3], None), t_last, lambda h: h, [[9.0, 0.0]])

    def run(self, limit):
        return list(stepping.pipelined_run(self.step, self.snapshot, self.result, limit))


@pytest.mark.parametrize("device_event", [False, True])
def test_a_run_yields_every_step_up_to_the_one_that_finished(device_event) -> None:
    edit = _Edit(done_at=3, device_event=device_event)
    results = edit.run(limit=10)
    assert [r.step for r in results] == [0, 1, 2, 3] and results[-1].done and not results[-2].done
    assert [r.handles for r in results] == [[[float(k), 0.0]] for k in range(4)]
    # host snapshots (the CPU, reference modes) take no step past the last, as the published loops; device
    # snapshots queue one step ahead so that the GPU never waits for the host
    assert edit.taken == (5 if device_event else 4)


@pytest.mark.parametrize("device_event", [False, True])
def test_a_run_stops_at_its_limit(device_event) -> None:
    edit = _Edit(done_at=100, device_event=device_event)
    results = edit.run(limit=6)
    assert [r.step for r in results] == list(range(6)) and edit.taken == 6 and not results[-1].done
