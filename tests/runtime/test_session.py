"""EditSession on a small random generator (CPU): points, mask, undo/redo, runs, stop, export/open."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from small_draggan import BASE, HANDLES, TARGETS, small_generator

from dragrt.runtime.config import RuntimeConfig
from dragrt.runtime.engines.draggan import DragGANConfig
from dragrt.runtime.models.stylegan2 import Generator
from dragrt.runtime.session import HISTORY_LIMIT, EditSession, SessionBusyError, model_sha256

# As the engine tests: at 64 px the reference radii round to nothing, so scale them up, and take big Adam steps so
# that handles move within a few steps. With seed 0 and these points the drag converges in about 16 steps.
RUNTIME = RuntimeConfig(device="cpu", compile_mode="none")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def new_session(generator: Generator | None = None, **config) -> EditSession:
    return EditSession.from_seed(generator or small_generator(), 0, config=DragGANConfig(**{**BASE, **config}),
                                 runtime=RUNTIME)


def with_points(session: EditSession) -> EditSession:
    for h, t in zip(HANDLES, TARGETS):
        session.add_point(h, t)
    return session


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def full_state(s: EditSession) -> dict:
    """Everything an edit can change: the public view plus (privately) the snapshot object, both histories and
    the next point id, so that a failed call which touched anything at all is caught."""
    return {"points": s.points, "mask": s.mask, "latent": s.latent(), "runs": s.runs, "can_undo": s.can_undo,
            "can_redo": s.can_redo, "running": s.running, "state": s._state, "undo": list(s._undo),
            "redo": list(s._redo), "next_id": s._next_id}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key == "state":
            assert x is y, "the state snapshot was replaced"
        elif key in ("undo", "redo"):
            assert len(x) == len(y) and all(p is q for p, q in zip(x, y)), f"{key} history changed"
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y), key
        else:
            assert x == y, key


# --- points, mask, history ----------------------------------------------------------------------------------------


def test_add_move_remove_undo_redo() -> None:
    s = new_session()
    assert s.points == [] and not s.can_undo and s.undo() is False and s.redo() is False
    a = s.add_point([20, 30], [30, 36])
    b = s.add_point((44.5, 12), np.array([38, 20]))
    assert (a, b) == (1, 2)
    assert s.points == [{"id": 1, "handle": [20.0, 30.0], "target": [30.0, 36.0]},
                        {"id": 2, "handle": [44.5, 12.0], "target": [38.0, 20.0]}]
    s.move_point(1, target=[31, 35])
    s.move_point(2, handle=torch.tensor([43, 13]))
    assert s.points[0]["target"] == [31.0, 35.0] and s.points[1]["handle"] == [43.0, 13.0]
    s.remove_point(1)
    assert [p["id"] for p in s.points] == [2]

    assert s.undo() and [p["id"] for p in s.points] == [1, 2]  # remove undone
    assert s.undo() and s.points[1]["handle"] == [44.5, 12.0]  # handle move undone
    assert s.redo() and s.points[1]["handle"] == [43.0, 13.0]
    assert s.can_redo
    c = s.add_point([1, 1], [2, 2])  # a new edit clears redo; ids are never reused
    assert c == 3 and not s.can_redo and s.redo() is False
    while s.undo():
        pass
    assert s.points == []
    assert s.add_point([5, 5], [6, 6]) == 4


def test_history_is_bounded() -> None:
    s = new_session()
    pid = s.add_point([10, 10], [20, 20])
    for i in range(HISTORY_LIMIT + 20):
        s.move_point(pid, target=[20, i % 60])
    undone = 0
    while s.undo():
        undone += 1
    assert undone == HISTORY_LIMIT


def test_mask_inputs_and_undo() -> None:
    s = new_session()
    free = np.zeros((64, 64), dtype=bool)
    free[:, :40] = True
    s.set_mask(free)
    torch.testing.assert_close(s.mask, torch.from_numpy(free).float())
    s.set_mask(Image.fromarray(np.where(free, 255, 0).astype(np.uint8)))
    torch.testing.assert_close(s.mask, torch.from_numpy(free).float())
    soft = torch.full((64, 64), 0.5)
    s.set_mask(soft)  # stored at 8-bit precision, as the edit record saves it
    assert torch.equal(s.mask, torch.full((64, 64), 128 / 255))
    s.set_mask(None)
    assert s.mask is None
    assert s.undo() and torch.equal(s.mask, torch.full((64, 64), 128 / 255))


def test_image_is_uint8_rgb_of_the_generators_size() -> None:
    s = new_session()
    image = s.image()
    assert image.mode == "RGB" and image.size == (64, 64)
    assert np.array_equal(pixels(image), pixels(s.image()))
    assert s.size == (64, 64) and s.seed == 0


# --- validation: every bad input is a ValueError that changes nothing ------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_INPUT = [
    ("handle x too large", lambda s, p: s.add_point([64, 10], [5, 5]),
     r"handle=\[64, 10\] is outside the image: x must be within 0 to 63"),
    ("handle y negative", lambda s, p: s.add_point([3, -1], [5, 5]), r"y within 0 to 63"),
    ("target NaN", lambda s, p: s.add_point([3, 3], [NAN, 5]), r"target=.*NaN or infinity"),
    ("target infinite", lambda s, p: s.add_point([3, 3], [5, INF]), r"target=.*NaN or infinity"),
    ("handle three numbers", lambda s, p: s.add_point([1, 2, 3], [5, 5]), r"handle must be \[x, y\]"),
    ("handle a string", lambda s, p: s.add_point("12", [5, 5]), r"handle must be \[x, y\]"),
    ("handle None", lambda s, p: s.add_point(None, [5, 5]), r"handle must be \[x, y\]"),
    ("too many points", lambda s, p: s.add_point([1, 1], [2, 2]), r"max_handles=2"),
    ("move unknown id", lambda s, p: s.move_point(99, target=[1, 1]), r"id=99 is not a point.*\[1, 2\]"),
    ("move id as string", lambda s, p: s.move_point("1", target=[1, 1]), r"id='1' is not a point"),
    ("move id as bool", lambda s, p: s.move_point(True, target=[1, 1]), r"id=True is not a point"),
    ("move nothing", lambda s, p: s.move_point(1), r"needs a new handle, a new target or both"),
    ("move target outside", lambda s, p: s.move_point(1, target=[0, 64]), r"target=\[0, 64\] is outside"),
    ("move good handle, bad target", lambda s, p: s.move_point(1, handle=[1, 1], target=[NAN, 1]), r"target="),
    ("remove unknown id", lambda s, p: s.remove_point(3), r"id=3 is not a point"),
    ("mask wrong size", lambda s, p: s.set_mask(torch.ones(32, 32)), r"mask must be \[H, W\] = \[64, 64\]"),
    ("mask with a batch dim", lambda s, p: s.set_mask(np.ones((1, 64, 64))), r"mask must be \[H, W\]"),
    ("mask above 1", lambda s, p: s.set_mask(np.full((64, 64), 2.0)), r"mask values must be within 0 to 1"),
    ("mask 0..255", lambda s, p: s.set_mask(np.full((64, 64), 255, np.uint8)), r"divide by 255"),
    ("mask negative", lambda s, p: s.set_mask(-torch.ones(64, 64)), r"mask values must be within 0 to 1"),
    ("mask NaN", lambda s, p: s.set_mask(torch.full((64, 64), NAN)), r"NaN and infinity are not allowed"),
    ("mask image wrong size", lambda s, p: s.set_mask(Image.new("L", (32, 64))), r"mask must be 64x64 pixels"),
    ("mask not an array", lambda s, p: s.set_mask(object()), r"mask must be an \[H, W\]"),
    ("run max_steps 0", lambda s, p: s.run(max_steps=0), r"max_steps=0 is not allowed; use an integer >= 1"),
    ("run max_steps float", lambda s, p: s.run(max_steps=1.5), r"max_steps=1.5 is not allowed"),
    ("run preview_every negative", lambda s, p: s.run(preview_every=-1), r"preview_every=-1 .* >= 0"),
    ("run preview_size 0", lambda s, p: s.run(preview_size=0), r"preview_size=0 .* >= 1"),
    ("export to a folder", lambda s, p: s.export(p), r"names a folder"),
    ("export to a non-path", lambda s, p: s.export(3), r"path_prefix must be a path"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_a_value_error_and_changes_nothing(call, message, tmp_path) -> None:
    s = with_points(new_session(max_handles=2))
    s.set_mask(torch.ones(64, 64))
    list(s.run(max_steps=2))
    s.move_point(1, target=[31, 36])
    s.undo()  # the redo history is not empty: an accidental commit would clear it
    before = full_state(s)
    with pytest.raises(ValueError, match=message):
        call(s, tmp_path)
    assert_same_state(before, full_state(s))
    assert list(tmp_path.iterdir()) == []


def test_run_without_points_is_refused() -> None:
    s = new_session()
    before = full_state(s)
    with pytest.raises(ValueError, match="points: run needs at least one point"):
        s.run()
    assert_same_state(before, full_state(s))


def test_bad_latents_and_seeds_are_refused(tmp_path) -> None:
    G = small_generator()
    with pytest.raises(ValueError, match=r"w must be a float \[1, 10, 32\] latent"):
        EditSession.from_latent(G, torch.zeros(1, 9, 32), runtime=RUNTIME)
    with pytest.raises(ValueError, match="w contains NaN"):
        EditSession.from_latent(G, torch.full((1, 10, 32), NAN), runtime=RUNTIME)
    from safetensors.torch import save_file

    save_file({"z": torch.zeros(1, 10, 32)}, tmp_path / "z.safetensors")
    with pytest.raises(ValueError, match="needs the key 'w'"):
        EditSession.from_latent(G, tmp_path / "z.safetensors", runtime=RUNTIME)
    with pytest.raises(FileNotFoundError, match="no latent file"):
        EditSession.from_latent(G, tmp_path / "missing.safetensors", runtime=RUNTIME)
    with pytest.raises(ValueError, match="seed=-1 is not allowed"):
        EditSession.from_seed(G, -1, runtime=RUNTIME)


# --- runs ---------------------------------------------------------------------------------------------------------


def test_run_yields_events_with_previews_and_drags_handles_to_targets() -> None:
    s = with_points(new_session())
    w_before, image_before, points_before = s.latent(), pixels(s.image()), s.points
    events = list(s.run(max_steps=40, preview_every=4, preview_size=24))

    assert [e.step for e in events] == list(range(len(events)))
    assert all(e.max_steps == 40 and set(e.handles) == {1, 2} == set(e.distances) for e in events)
    assert [e.step for e in events if e.preview is not None] == [k for k in range(len(events)) if (k + 1) % 4 == 0]
    assert all(e.preview.size == (24, 24) and e.preview.mode == "RGB" for e in events if e.preview is not None)
    first, last = events[0].distances, events[-1].distances
    assert events[-1].done and not any(e.done for e in events[:-1])
    assert all(last[i] < first[i] / 3 for i in (1, 2)), (first, last)
    assert max(last.values()) <= 2.0  # the engine's stop distance at 64 px

    # Handles move to where the drag ended, targets stay; the latent and the image moved.
    assert [p["handle"] for p in s.points] == [events[-1].handles[1], events[-1].handles[2]]
    assert [p["target"] for p in s.points] == [[30.0, 36.0], [38.0, 20.0]]
    assert not torch.equal(s.latent(), w_before)
    assert not np.array_equal(pixels(s.image()), image_before)
    (run,) = s.runs
    assert run["steps"] == len(events) and run["done"] and not run["stopped"] and run["points"] == points_before
    assert [h["handle"] for h in run["final_handles"]] == [p["handle"] for p in s.points]

    # A run is one undoable change.
    assert s.undo()
    assert torch.equal(s.latent(), w_before) and s.points == points_before and s.runs == []
    assert np.array_equal(pixels(s.image()), image_before)
    assert s.redo() and s.runs == [run]


def test_a_second_run_continues_the_drag() -> None:
    s = with_points(new_session())
    first = list(s.run(max_steps=5))
    assert len(first) == 5 and not first[-1].done
    assert [p["handle"] for p in s.points] == [first[-1].handles[1], first[-1].handles[2]]
    second = list(s.run(max_steps=40))
    # The second run starts where the first ended (tracking at the start stays on the reference feature)...
    assert second[0].handles == first[-1].handles
    # ...and drags further.
    assert second[-1].done and sum(second[-1].distances.values()) < sum(first[-1].distances.values())
    assert [r["steps"] for r in s.runs] == [5, len(second)]
    assert s.runs[1]["points"] == [{"id": i, "handle": first[-1].handles[i], "target": t}
                                   for i, t in zip((1, 2), ([30.0, 36.0], [38.0, 20.0]))]


def test_stop_from_the_consumer_ends_the_run_and_commits_the_reached_state() -> None:
    s = with_points(new_session())
    events = []
    for ev in s.run(max_steps=50):
        events.append(ev)
        if len(events) == 2:
            s.stop()
    assert len(events) <= 3 and not events[-1].done
    assert not s.running
    (run,) = s.runs
    assert run["stopped"] and run["steps"] == len(events)
    # The state is the engine's, i.e. the last step it completed (it runs one step ahead of the events).
    assert torch.equal(s.latent(), s._engine.latent())
    assert [p["handle"] for p in s.points] == s._engine.handles
    # Editable again, and a new run starts from the stopped state.
    s.move_point(1, target=[29, 36])
    assert s.undo()
    stopped_at = [p["handle"] for p in s.points]
    run_again = s.run(max_steps=3)
    resumed = next(run_again)
    assert [resumed.handles[1], resumed.handles[2]] == stopped_at
    run_again.close()  # closing commits, like stop()
    assert len(s.runs) == 2 and s.runs[1]["steps"] == 1


def test_stop_from_another_thread_ends_within_one_step() -> None:
    s = with_points(new_session())
    events: list = []
    errors: list = []

    def consume() -> None:
        try:
            for ev in s.run(max_steps=200):
                events.append(ev)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    worker = threading.Thread(target=consume)
    worker.start()
    deadline = time.monotonic() + 30
    while len(events) < 2 and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    s.stop()
    seen_at_stop = len(events)
    worker.join(30)
    assert not worker.is_alive() and not errors
    assert 2 <= seen_at_stop and len(events) <= seen_at_stop + 1
    assert not events[-1].done and s.runs[-1]["stopped"] and not s.running


def test_editing_while_running_is_refused_and_changes_nothing(tmp_path) -> None:
    s = with_points(new_session())
    two_events, release = threading.Event(), threading.Event()
    events: list = []

    def consume() -> None:
        for ev in s.run(max_steps=200):
            events.append(ev)
            if len(events) == 2:
                two_events.set()
                release.wait(30)

    worker = threading.Thread(target=consume)
    worker.start()
    try:
        assert two_events.wait(30) and s.running
        before = full_state(s)
        for call in (lambda: s.add_point([1, 1], [2, 2]), lambda: s.move_point(1, target=[1, 1]),
                     lambda: s.remove_point(1), lambda: s.set_mask(None), s.undo, s.redo, s.run, s.image,
                     lambda: s.export(tmp_path / "e")):
            with pytest.raises(SessionBusyError, match="the session is running; call stop"):
                call()
        assert_same_state(before, full_state(s))
        assert list(tmp_path.iterdir()) == []
    finally:
        s.stop()
        release.set()
        worker.join(30)
    assert len(events) == 2 and not s.running and s.runs[-1]["stopped"]


def test_closing_the_iterator_commits_like_stop() -> None:
    s = with_points(new_session())
    it = s.run(max_steps=50)
    next(it)
    next(it)
    it.close()
    assert not s.running and s.runs[-1]["steps"] == 2 and s.runs[-1]["stopped"]
    assert torch.equal(s.latent(), s._engine.latent())


def test_stop_before_the_first_step_runs_nothing() -> None:
    s = with_points(new_session())
    before = full_state(s)
    it = s.run(max_steps=50)
    s.stop()
    assert list(it) == []
    assert_same_state(before, full_state(s))


def test_an_engine_error_leaves_the_state_as_before(monkeypatch) -> None:
    s = with_points(new_session())
    before = full_state(s)

    def broken_render():
        raise RuntimeError("render failed")

    monkeypatch.setattr(s._engine, "render", broken_render)
    with pytest.raises(RuntimeError, match="render failed"):
        list(s.run(max_steps=10, preview_every=3))
    assert_same_state(before, full_state(s))


# --- export and open ----------------------------------------------------------------------------------------------


def test_export_open_round_trip(tmp_path) -> None:
    G = small_generator()
    s = with_points(new_session(G))
    w0 = s.latent()
    s.set_mask(torch.linspace(0, 1, 64).repeat(64, 1))  # a soft mask: 8-bit values must round-trip exactly
    list(s.run(max_steps=6))
    record = s.export(tmp_path / "edit.json")  # a trailing .json is dropped

    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.json", "edit.png", "edit_mask.png",
                                                          "edit_w.safetensors"]
    assert json.loads((tmp_path / "edit.json").read_text()) == record
    assert record["format"] == "dragrt-edit-session" and record["format_version"] == 1
    assert record["points"] == s.points and record["seed"] == 0 and record["next_point_id"] == 3
    assert record["engine"]["config"] == dataclasses.asdict(s.config)
    assert record["model"]["sha256"] == model_sha256(G) and record["runs"] == s.runs
    assert record["mask"]["file"] == "edit_mask.png" and record["dragrt_version"]
    assert np.array_equal(pixels(Image.open(tmp_path / "edit.png")), pixels(s.image()))
    latents = load_file(tmp_path / "edit_w.safetensors")
    assert torch.equal(latents["w"], s.latent()) and torch.equal(latents["w0"], w0)

    # Re-open with a second copy of the same weights: everything comes back, the image bit for bit.
    o = EditSession.open(tmp_path / "edit", small_generator(), runtime=RUNTIME)
    assert np.array_equal(pixels(o.image()), pixels(s.image()))
    assert o.points == s.points and torch.equal(o.mask, s.mask) and torch.equal(o.latent(), s.latent())
    assert o.seed == 0 and o.config == s.config and o.runs == s.runs and not o.can_undo
    assert o.add_point([1, 1], [2, 2]) == 3
    assert np.array_equal(pixels(EditSession.from_latent(G, tmp_path / "edit_w.safetensors", config=s.config,
                                                         runtime=RUNTIME).image()), pixels(s.image()))

    # Exporting again without a mask replaces the set and drops the old mask file.
    o.set_mask(None)
    assert o.export(tmp_path / "edit")["mask"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.json", "edit.png", "edit_w.safetensors"]


def test_open_refuses_another_model_unless_not_strict(tmp_path) -> None:
    s = with_points(new_session())
    s.export(tmp_path / "edit")
    other = small_generator(seed=1)
    with pytest.raises(ValueError, match=r"made with model .* sha256 .* strict=False"):
        EditSession.open(tmp_path / "edit.json", other)
    with pytest.warns(UserWarning, match="opening anyway"):
        o = EditSession.open(tmp_path / "edit.json", other, strict=False, runtime=RUNTIME)
    assert o.points == s.points


def test_open_refuses_a_changed_latent_file(tmp_path) -> None:
    from safetensors.torch import save_file

    s = new_session()
    s.export(tmp_path / "edit")
    save_file({"w": torch.zeros(1, 10, 32), "w0": torch.zeros(1, 10, 32)}, tmp_path / "edit_w.safetensors")
    with pytest.raises(ValueError, match="sha256 does not match the record's"):
        EditSession.open(tmp_path / "edit.json", small_generator())


def test_model_hash_follows_the_weights() -> None:
    a, b = small_generator(0), small_generator(0)
    assert model_sha256(a) == model_sha256(b) == model_sha256(a)
    other = small_generator(1)
    assert model_sha256(other) != model_sha256(a)
    a.load_state_dict(other.state_dict())  # in place: the cached hash must notice
    assert model_sha256(a) == model_sha256(other)


def test_export_to_a_missing_folder_or_a_file_is_a_clear_error(tmp_path) -> None:
    s = new_session()
    with pytest.raises(FileNotFoundError, match="the export folder does not exist; create it first"):
        s.export(tmp_path / "missing" / "edit")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        s.export(tmp_path / "file" / "edit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_export_to_a_read_only_folder_is_a_clear_error(tmp_path, monkeypatch) -> None:
    s = new_session()
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        # root writes into read-only folders anyway: make creating files fail as the kernel would for a user.
        def refuse(path, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

        monkeypatch.setattr(os, "open", refuse)
    else:
        folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=r"cannot write in .*ro \(Permission denied\); nothing was written"):
            s.export(folder / "edit")
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_a_failing_export_leaves_no_partial_files_and_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    s = with_points(new_session())
    s.set_mask(torch.ones(64, 64))
    s.export(tmp_path / "edit")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    s.move_point(1, target=[10, 10])
    real_fsync, calls = os.fsync, []

    def disk_full_on_third_file(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_on_third_file)
    with pytest.raises(OSError, match="No space left on device.*nothing was written"):
        s.export(tmp_path / "edit")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
