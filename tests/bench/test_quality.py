"""dragrt eval's quality suite: task generation from renderer ground truth, the metrics, the calibration
editors (identity, oracle), both modes of DragDiffusion (tiny random SD) and DragGAN (small random StyleGAN2)
end to end, the paired mode comparison and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from small_draggan import small_generator

from dragrt import cli
from dragrt.bench import harness
from dragrt.bench import quality as q
from dragrt.zoo import evaluators, registry, world

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Which FaceParams fields each kind may change.
EDITED_FIELDS = {
    "mouth_corner": {"smile"},
    "open_mouth": {"mouth_open"},
    "raise_eyebrow": {"brow_raise"},
    "move_eye": {"eye_height", "gaze"},
    "turn_head": {"head_yaw"},
}


@pytest.fixture(scope="module")
def models():
    return evaluators.load_landmark_model(), evaluators.load_attribute_model()


@pytest.fixture(scope="module")
def suite():
    return q.drag_suite(n_per_kind=2, seed=0)


def _changed_fields(a: world.FaceParams, b: world.FaceParams) -> set[str]:
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def test_suite_is_deterministic_interleaved_and_covers_every_variant(suite) -> None:
    again = q.drag_suite(n_per_kind=2, seed=0)
    assert [t.name for t in again] == [t.name for t in suite]
    for a, b in zip(suite, again):
        assert np.array_equal(a.image, b.image) and a.handle_points == b.handle_points
        assert a.target_points == b.target_points and np.array_equal(a.region, b.region)
    assert [t.kind for t in suite] == list(q.KINDS) * 2
    assert len({t.name for t in suite}) == len(suite)
    # a shorter suite is a prefix of a longer one
    assert [t.name for t in q.drag_suite(n_per_kind=1, seed=0)] == [t.name for t in suite[: len(q.KINDS)]]
    assert {(t.variant, t.masked) for t in suite} == {("single", True), ("multi", True), ("single", False),
                                                      ("multi", False)}
    assert all(world.is_held_out(t.seed) for t in suite)
    other = q.drag_suite(n_per_kind=1, seed=1)
    assert not {t.seed for t in other} & {t.seed for t in suite}


def test_targets_are_the_edited_renders_landmarks_and_masks_contain_them(suite) -> None:
    for t in suite:
        assert _changed_fields(t.params, t.target_params) <= EDITED_FIELDS[t.kind], t.name
        a, b = world.render(t.params), world.render(t.target_params)
        assert np.array_equal(t.image, a.image) and t.prompt == a.caption
        idx = [world.LANDMARK_INDEX[n] for n in t.landmarks]
        np.testing.assert_allclose(t.handle_points, a.landmarks[idx], atol=1e-4)
        np.testing.assert_allclose(t.target_points, b.landmarks[idx], atol=1e-4)
        assert (len(t.landmarks) > 1) == (t.variant == "multi")
        disp = np.linalg.norm(np.subtract(t.target_points, t.handle_points), axis=1)
        assert disp.min() >= q.MIN_DISPLACEMENT_PX and disp.max() <= q.MAX_DISPLACEMENT_PX, t.name
        # the region holds every landmark that moves (start and end) and every changed pixel
        moved = np.linalg.norm(b.landmarks - a.landmarks, axis=1) > q.UNTOUCHED_TOLERANCE_PX
        for p in np.concatenate([a.landmarks[moved], b.landmarks[moved]]):
            x, y = np.rint(p).astype(int)
            assert t.region[y, x], (t.name, p)
        assert not np.any(a.image != b.image, axis=-1)[~t.region].any()
        assert t.region.mean() < 0.6  # something is left outside to measure fidelity on
        if t.masked:
            assert t.mask.dtype == np.uint8 and np.array_equal(t.mask.astype(bool), t.region)
        else:
            assert t.mask is None
        for name in t.untouched:
            i = world.LANDMARK_INDEX[name]
            assert not moved[i] and name not in t.landmarks
    assert any(t.untouched for t in suite)


def test_oracle_and_identity_calibrate_the_scores(suite, models) -> None:
    lm, am = models
    oracle = q.run_suite(q.oracle_editor, suite, lm, am)
    identity = q.run_suite(q.identity_editor, suite, lm, am)
    for o, i, t in zip(oracle.per_task, identity.per_task, suite):
        assert o["name"] == i["name"] == t.name
        # a perfect edit: the regressor's own error (0.31 px mean on held-out renders)
        assert o["drag_error_px"] < 1.0 and o["drag_success"] == 1.0, o
        assert o["psnr_outside_mask"] > 40 and o["ssim_outside_mask"] > 0.999 and o["feature_distance"] < 1e-6
        assert o["untouched_landmark_drift_px"] is None or o["untouched_landmark_drift_px"] < 0.5
        # no edit: drag error = the displacement, up to the regressor's error
        assert i["drag_error_px"] == pytest.approx(i["handle_start_error_px"])
        assert abs(i["drag_error_px"] - t.displacement_px) < 1.5, i
        assert i["drag_success"] == 0.0 and i["psnr_outside_mask"] == q.PSNR_MAX_DB
        assert i["ssim_outside_mask"] == pytest.approx(1.0) and i["feature_distance_full"] == 0.0
        assert o["handle_start_error_px"] == pytest.approx(i["handle_start_error_px"])
    so, si = oracle.summary(), identity.summary()
    assert so["drag_error_px"]["mean"] < 0.5
    assert abs(si["drag_error_px"]["mean"] - si["displacement_px"]["mean"]) < 1.0
    assert set(so["per_kind"]) == set(q.KINDS)
    assert so["per_variant"]["mask"]["n"] == sum(t.masked for t in suite)


def test_ssim_and_psnr() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    assert q.ssim(img, img) == pytest.approx(1.0, abs=1e-9)
    assert q.psnr(img, img) == q.PSNR_MAX_DB
    base = img.astype(np.float32) / 255
    scores = [q.ssim(img, np.clip(base + rng.normal(0, s, base.shape), 0, 1).astype(np.float32))
              for s in (0.01, 0.05, 0.2)]
    assert 1.0 > scores[0] > scores[1] > scores[2]
    noisy = np.clip(base + 0.1, 0, 1).astype(np.float32)
    mse = float(np.mean((noisy.astype(np.float64) - base) ** 2))
    assert q.psnr(base, noisy) == pytest.approx(-10 * math.log10(mse), rel=1e-6)
    where = np.zeros((48, 40), bool)
    where[:, :20] = True
    other = base.copy()
    other[:, 20:] = 0  # changes only outside `where`
    assert q.psnr(base, other, where) == q.PSNR_MAX_DB and q.ssim(base, other, where) < 1.0
    assert math.isnan(q.psnr(base, other, np.zeros((48, 40), bool)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        q.psnr(base * 2 - 1, base)


def test_ssim_matches_scikit_image_away_from_the_border() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    a = rng.random((40, 36, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    _, ref = metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=1.0, channel_axis=2, full=True)
    ours = q.ssim_map(a, b)
    np.testing.assert_allclose(ours[5:-5, 5:-5], ref.mean(-1)[5:-5, 5:-5], atol=1e-5)


def test_bad_arguments_are_clear_errors(suite, models) -> None:
    with pytest.raises(ValueError, match="n_per_kind=0 is not allowed"):
        q.drag_suite(0)
    with pytest.raises(ValueError, match="size=100 .*multiple of 64"):
        q.drag_suite(1, size=100)
    with pytest.raises(ValueError, match="kinds=.*choose"):
        q.drag_suite(1, kinds=["wink"])
    lm, am = models
    with pytest.raises(ValueError, match="edited image is 128x128 px, the task is 256x256"):
        q.score_edit(suite[0], np.zeros((128, 128, 3), np.uint8), lm, am)
    with pytest.raises(ValueError, match="target_points must be 1"):
        q.score_edit(suite[0], suite[0].image, lm, am, target_points=[[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="tasks is empty"):
        q.run_suite(q.identity_editor, [], lm, am)


def _fake_run(errors: list[float]) -> q.SuiteResult:
    return q.SuiteResult(per_task=[{"name": f"t{i}", "drag_error_px": e, "psnr_outside_mask": 30.0,
                                    "ssim_outside_mask": 0.9} for i, e in enumerate(errors)])


def test_paired_comparison_is_equal_within_noise_only_when_it_is() -> None:
    rng = np.random.default_rng(0)
    base = list(rng.uniform(1, 10, 30))
    same = q.compare_modes(_fake_run(base), _fake_run(base))
    assert same["equal_within_noise"] and same["drag_error_mean_diff_px"] == 0.0
    noisy = q.compare_modes(_fake_run([b + rng.normal(0, 0.5) for b in base]), _fake_run(base))
    assert noisy["equal_within_noise"]
    worse = q.compare_modes(_fake_run([b + 1.0 + rng.normal(0, 0.2) for b in base]), _fake_run(base))
    assert not worse["equal_within_noise"] and worse["drag_error_mean_diff_px"] > 0.8
    one = q.compare_modes(_fake_run([3.05]), _fake_run([3.0]))
    assert one["equal_within_noise"] and one["drag_error_diff_stderr_px"] is None
    assert not q.compare_modes(_fake_run([3.5]), _fake_run([3.0]))["equal_within_noise"]


def test_dragdiffusion_editor_runs_both_modes_into_a_record(models, tmp_path) -> None:
    from dragrt.runtime.config import RuntimeConfig
    from dragrt.runtime.models.sd import build_random_sd15

    lm, am = models
    sd = build_random_sd15(tiny=True, seed=0)
    tasks = q.drag_suite(n_per_kind=1, seed=0, size=128)
    tasks = [tasks[0], tasks[2]]  # one masked with one handle, one unmasked
    assert tasks[0].masked and not tasks[1].masked
    runtime = RuntimeConfig(device="cpu")
    runs = {}
    for mode in ("fast", "reference"):
        editor = q.dragdiffusion_editor(sd, mode, runtime=runtime, num_inference_steps=4, max_steps=2,
                                        start_layer=4)
        runs[mode] = q.run_suite(editor, tasks, lm, am)
        editor.close()
    for row in runs["fast"].per_task:
        assert math.isfinite(row["drag_error_px"]) and row["edit_ms"] > 0
        assert 0 < row["psnr_outside_mask"] <= q.PSNR_MAX_DB
    quality = q.quality_object(runs["fast"], runs["reference"],
                               calibration={"oracle": q.run_suite(q.oracle_editor, tasks, lm, am)})
    # fp32 on the CPU: the two modes run the same arithmetic
    assert quality["equal_within_noise"] is True
    record = harness.make_record("quality-dragdiffusion", {"tasks": len(tasks)}, runs["fast"].timing(),
                                 runs["reference"].timing())
    record["quality"] = quality
    back = json.loads(harness.write_record(record, tmp_path).read_text())
    assert back["quality"]["ours"]["n_tasks"] == 2 and len(back["quality"]["reference"]["per_task"]) == 2
    assert back["ours"]["n"] == 2 and "oracle" in back["quality"]["calibration"]
    assert "equal within noise" in q.format_table(back["quality"])


def test_draggan_editor_starts_from_the_projection(models) -> None:
    from dragrt.runtime.projector import ProjectorConfig

    lm, _ = models
    task = q.drag_suite(n_per_kind=1, seed=0)[1]  # several handles, masked
    cache: dict = {}
    config = ProjectorConfig(num_steps=3, w_avg_samples=64)
    outs = {}
    for mode in ("fast", "reference"):
        editor = q.draggan_editor(small_generator(), mode, landmark_model=lm, projector_config=config,
                                  inversion_cache=cache, max_steps=2, r1=24.0, r2=48.0, lr=0.05, cuda_graph=False)
        outs[mode] = editor(task)
    assert list(cache) == [task.name]  # one projection, shared by both modes
    fast, ref = outs["fast"], outs["reference"]
    assert fast.image.shape == fast.source_image.shape == (256, 256, 3)
    np.testing.assert_array_equal(fast.source_image, ref.source_image)
    # targets: the projection's own landmarks (regressor) plus the ground-truth displacement
    src, _ = q.regress_landmarks([fast.source_image], lm)
    idx = [world.LANDMARK_INDEX[n] for n in task.landmarks]
    disp = np.subtract(task.target_points, task.handle_points)
    np.testing.assert_allclose(fast.target_points, np.clip(src[0, idx] + disp, 0, 255), atol=1e-4)
    assert fast.timings["edit"] > 0 and fast.timings["steps"] >= 1



def test_draggan_editor_keeps_the_radii_of_256_px_on_a_small_generator(models) -> None:
    """On the 64 px test generator DragGAN's radii would be 0 and 2 px (an empty motion disc: the engine refuses
    it); the default keeps 256 px's 2 and 6 px, and given radii are used as given."""
    from dragrt.runtime.engines.draggan import DragGANConfig, DragGANEngine

    lm, _ = models
    G = small_generator()
    editor = q.draggan_editor(G, "fast", landmark_model=lm, cuda_graph=False)
    assert (editor.engine.r1_px, editor.engine.r2_px) == (2, 6) and (editor.engine.r1, editor.engine.r2) == (16, 48)
    assert (q.draggan_editor(G, "fast", landmark_model=lm, r1=8.0, r2=24.0).engine.r1_px) == 1
    with pytest.raises(ValueError, match="r1=3 is 0 px"):
        DragGANEngine(G, DragGANConfig(r1=3.0))


def test_cli_eval_oracle_writes_a_record(tmp_path, capsys) -> None:
    assert cli.main(["eval", "oracle", "--tasks", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "oracle fast" in out and "equal within noise" in out
    (path,) = tmp_path.glob("quality-oracle__*.json")
    rec = json.loads(path.read_text())
    assert rec["scenario"] == "quality-oracle" and rec["config"]["tasks"] == 3
    assert rec["ours"]["n"] == 3 and rec["reference"]["n"] == 3
    assert rec["quality"]["equal_within_noise"] is True
    assert rec["quality"]["ours"]["drag_error_px"]["mean"] < 1.0



def test_cli_eval_draggan_on_a_small_generator_writes_a_record_with_its_radii(tmp_path, capsys) -> None:
    """`dragrt eval draggan --model PATH` end to end on a 64 px generator in the converted format: both modes run
    the same task, and the record says at which resolution and with which radii (256 px's 2 and 6 px) they
    dragged."""
    from dragrt.runtime.models.stylegan2_convert import save_generator

    save_generator(small_generator(), tmp_path / "g" / "generator")
    argv = ["eval", "draggan", "--model", str(tmp_path / "g"), "--tasks", "1", "--steps", "2",
            "--projection-steps", "2", "--warmup", "0", "--no-calibration", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    (path,) = tmp_path.glob("quality-draggan__*.json")
    rec = json.loads(path.read_text())
    assert rec["config"]["generator_resolution"] == 64 and rec["config"]["radii_px"] == [2, 6]
    assert rec["ours"]["n"] == rec["reference"]["n"] == 1
    for role in ("ours", "reference"):
        assert math.isfinite(rec["quality"][role]["drag_error_px"]["mean"])


@pytest.fixture
def zoo_without_generators(tmp_path, monkeypatch):
    """A zoo folder with only the evaluators, whatever the checkout ships later."""
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("faces-landmarks", "faces-attributes"):
        (weights / name).symlink_to(registry.WEIGHTS_DIR / name, target_is_directory=True)
    monkeypatch.setattr(registry, "WEIGHTS_DIR", weights)


@pytest.mark.parametrize(("argv", "expected"), [
    (["dragdiffusion"], "zoo model 'faces-sd' is not installed"),  # the default model, missing from this zoo
    (["draggan"], "zoo model 'faces-stylegan2' is not installed"),
    (["dragdiffusion", "--model", "zoo:faces-sd"], "zoo model 'faces-sd' is not installed"),
    (["draggan", "--model", "zoo:faces-stylegan2"], "zoo model 'faces-stylegan2' is not installed"),
    (["oracle", "--landmarks", "zoo:faces-nope"], "zoo model 'faces-nope' is not installed"),
    (["oracle", "--modes", "fast"], "--modes='fast' is not allowed"),
    (["oracle", "--modes", "fast,quick"], "from: fast, reference"),
    (["oracle", "--tasks", "0"], "--tasks=0 is not allowed; use an integer from 1 to 5000"),
])
def test_cli_eval_errors_are_one_clear_line(argv, expected, zoo_without_generators, tmp_path, capsys) -> None:
    assert cli.main(["eval", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    if argv[0] in ("dragdiffusion", "draggan"):
        assert "is not in this installation; pass --model with" in err
    assert not list(tmp_path.glob("*.json"))
