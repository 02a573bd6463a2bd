"""zoo:faces-clip: smoke training and resumption, export/load round trip, text tower extraction, the loss,
the caption-truth matrix and the retrieval metric."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dragrt.zoo import clip as zclip
from dragrt.zoo import text as ztext
from dragrt.zoo import training, world

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("faces-clip-run")
    metrics = zclip.train(run, minutes=5, device="cpu", seed=0, smoke=True)
    return run, metrics


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    run, _ = smoke_run
    return zclip.export(run, tmp_path_factory.mktemp("faces-clip-export"))


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    return ztext.build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_smoke_training_lowers_the_loss_and_reports_metrics(smoke_run):
    run, m = smoke_run
    assert m["step"] == m["schedule_steps"] == zclip.SMOKE_RECIPE.fixed_steps
    assert m["loss_last"] < m["loss_first"] - 0.05, (m["loss_first"], m["loss_last"])
    for k in ("i2t_top1", "t2i_top1", "i2t_top5", "zero_shot_mean", *(f"zero_shot_{a}" for a in world.CATEGORICAL)):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["eval_pairs_scored"] == zclip.SMOKE_RECIPE.eval_pairs
    assert json.loads((run / training.METRICS).read_text())["step"] == m["step"]
    assert (run / training.CHECKPOINT).is_file()


def test_resume_continues_the_saved_run(smoke_run):
    run, m = smoke_run
    again = zclip.train(run, minutes=5, device="cpu", seed=123, smoke=True)  # schedule done: evaluates only
    assert again["step"] == m["step"] and again["chunk_steps"] == 0 and again["chunks"] == 2
    assert again["seed"] == 0  # the run keeps its own seed
    assert again["i2t_top1"] == m["i2t_top1"]


def test_export_writes_a_transformers_folder(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "MODEL_CARD.md", "preprocessor_config.json", *ztext.FILES} <= names
    from safetensors.torch import load_file

    weights = load_file(str(exported / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    card = (exported / "MODEL_CARD.md").read_text()
    assert "i2t_top1" in card and "zero_shot_mean" in card
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["text_config"]["max_position_embeddings"] == 77


def test_export_load_round_trip_is_exact_in_fp16(smoke_run, exported):
    run, _ = smoke_run
    state = training.load_checkpoint(run)
    recipe = zclip.Recipe(**state["recipe"])
    model, tok = zclip.load_clip(exported, dtype=torch.float16)
    assert model.dtype == torch.float16 and not model.training
    ref = zclip.build_clip(recipe, tok)
    ref.load_state_dict(state["model"])
    ref = ref.half().eval()
    faces = world.render_batch(world.held_out_seeds(3), size=recipe.render_size)
    images = torch.from_numpy(faces["images"]).permute(0, 3, 1, 2)
    pix = zclip.clip_pixels(images, recipe.image_size).half()
    ids = zclip.tokenize(tok, faces["captions"])
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pix)
        b = ref(input_ids=ids, pixel_values=pix)
    assert torch.equal(a.logits_per_image, b.logits_per_image)
    assert torch.equal(a.text_embeds, b.text_embeds) and torch.equal(a.image_embeds, b.image_embeds)


def test_text_tower_extraction_gives_equal_hidden_states(exported, tmp_path):
    from transformers import CLIPTextModel

    model, tok = zclip.load_clip(exported)
    text = zclip.text_encoder_from_clip(model)
    assert isinstance(text, CLIPTextModel) and not text.training
    assert text.config.max_position_embeddings == 77 and text.config.vocab_size == len(tok)
    ids = zclip.tokenize(tok, ["a cap, on a red background", world.caption(world.sample_params(5))])
    with torch.no_grad():
        want = model.text_model(input_ids=ids)
        got = text(input_ids=ids)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)
    # saved and reloaded (fp16 on disk, hub key layout)
    zclip.save_text_encoder(text, tmp_path / "text_encoder")
    back = CLIPTextModel.from_pretrained(str(tmp_path / "text_encoder"), local_files_only=True,
                                         dtype=torch.float32).eval()
    half = zclip.text_encoder_from_clip(model.half()).float()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).last_hidden_state, half(input_ids=ids).last_hidden_state)


def test_shipped_recipe_fits_the_budget(small_tokenizer):
    model = zclip.build_clip(zclip.RECIPE, small_tokenizer)
    n = sum(p.numel() for p in model.parameters())
    assert 2 * n + 100_000 <= zclip.MAX_BYTES, f"{2 * n} fp16 bytes"
    assert model.config.text_config.vocab_size == len(small_tokenizer)
    assert model.config.text_config.eos_token_id == small_tokenizer.eos_token_id


def test_loss_equals_clip_return_loss_on_distinct_captions(small_tokenizer):
    recipe = zclip.SMOKE_RECIPE
    model = zclip.build_clip(recipe, small_tokenizer).eval()
    ids = zclip.tokenize(small_tokenizer, ["a cap", "a beanie", "round glasses, a smile"])
    pix = torch.randn(3, 3, recipe.image_size, recipe.image_size)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pix, return_loss=True)
    ours = zclip.contrastive_loss(out.logits_per_image)
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)
    eye = torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(zclip.contrastive_loss(out.logits_per_image, eye), out.loss, rtol=1e-5, atol=1e-6)


def test_loss_spreads_targets_over_true_partners():
    logits = torch.tensor([[2.0, 2.0], [0.0, 5.0]])  # [images, texts]
    truth = torch.tensor([[True, True], [False, True]])  # text 0 is true of both images
    t = truth.float()
    i2t = -(torch.log_softmax(logits, 1) * (t.T / t.T.sum(1, keepdim=True))).sum(1).mean()
    t2i = -(torch.log_softmax(logits.T, 1) * (t / t.sum(1, keepdim=True))).sum(1).mean()
    torch.testing.assert_close(zclip.contrastive_loss(logits, truth), 0.5 * (i2t + t2i))
    with pytest.raises(ValueError, match="at least one true"):
        zclip.contrastive_loss(logits, torch.tensor([[True, False], [False, False]]))


def test_caption_truth_full_and_partial():
    full_a = "an oval cartoon face with pale skin, short red hair, a smile, a cap, on a red background"
    full_b = "an oval cartoon face with pale skin, short red hair, a smile, on a red background"
    texts = [full_a, full_b, "a cap", "a smile, on a red background", "a beanie"]
    partial = torch.tensor([False, False, True, True, True])
    tid = torch.from_numpy(np.stack([zclip.phrase_ids(t) for t in texts]))
    iid = torch.from_numpy(np.stack([zclip.phrase_ids(t) for t in (full_a, full_b)]))
    truth = zclip.caption_truth(tid, partial, iid)
    want = torch.tensor([[True, False],  # a full caption is true only of its own phrase set
                         [False, True],  # b's phrases are a subset of a's, but b says "no hat"
                         [True, False],
                         [True, True],
                         [False, False]])
    assert torch.equal(truth, want)


def test_retrieval_accuracy_on_a_constructed_case():
    e = torch.eye(4)
    caps = ["a", "b", "c", "d"]
    assert zclip.retrieval_accuracy(e, e, caps, group=2)["i2t_top1"] == 1.0
    # pairs (0, 1) swapped: group 0 wrong both ways, group 1 right
    t = e[[1, 0, 2, 3]]
    r = zclip.retrieval_accuracy(e, t, caps, group=2, k=2)
    assert r["i2t_top1"] == 0.5 and r["t2i_top1"] == 0.5 and r["i2t_top2"] == 1.0
    # the same swap is no error when the two captions read the same
    r = zclip.retrieval_accuracy(e, t, ["a", "a", "c", "d"], group=2)
    assert r["i2t_top1"] == 1.0 and r["t2i_top1"] == 1.0
    # retrieval is only within a group: image 0 best matches text 2 overall, but that is another group
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.9, 0.1], [0.1, 0.9], [1.0, 0.0], [0.0, 1.0]])
    r = zclip.retrieval_accuracy(img, txt, caps, group=2)
    assert r["i2t_top1"] == 1.0 and r["eval_pairs_scored"] == 4
    with pytest.raises(ValueError, match="group"):
        zclip.retrieval_accuracy(e, e, caps, group=5)


def test_clip_pixels_maps_uint8_and_float_alike():
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    f = u8.float() / 127.5 - 1.0
    torch.testing.assert_close(zclip.clip_pixels(u8, 16), zclip.clip_pixels(f, 16))
    assert zclip.clip_pixels(u8, 32).shape == (2, 3, 32, 32)
    assert math.isclose(float(zclip.clip_pixels(u8, 32).max()), float(f.max()))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        zclip.clip_pixels(torch.zeros(3, 32, 32), 16)


def test_twins_change_one_attribute_and_the_caption():
    rng = np.random.default_rng(0)
    for s in range(20):
        p = world.sample_params(s)
        q = zclip.twin_params(p, rng)
        assert q is not None
        changed = [n for n in (*world.CONTINUOUS, *world.CATEGORICAL) if getattr(p, n) != getattr(q, n)]
        assert len(changed) == 1 and world.caption(p) != world.caption(q)
        assert (p.detail_seed, p.scale, p.shift_x) == (q.detail_seed, q.scale, q.shift_x)


def test_stream_is_deterministic_and_partial_captions_are_subsets(small_tokenizer):
    a = zclip.FaceTextStream(seed=3, size=16, partial_prob=0.5, tokenizer=small_tokenizer)
    b = zclip.FaceTextStream(seed=3, size=16, partial_prob=0.5)
    xs = [x for _, x in zip(range(6), a)]
    ys = [y for _, y in zip(range(6), b)]
    for x, y in zip(xs, ys):
        assert x["caption"] == y["caption"] and torch.equal(x["image"], y["image"])
        assert x["image"].shape == (3, 16, 16) and x["image"].dtype == torch.uint8
        assert torch.equal(x["input_ids"], zclip.tokenize(small_tokenizer, [x["caption"]])[0])
        tp, ip = set(x["text_phrases"].tolist()) - {0}, set(x["image_phrases"].tolist()) - {0}
        assert tp <= ip and (bool(x["partial"]) or tp == ip)


def test_recipe_and_train_reject_bad_values(tmp_path):
    with pytest.raises(ValueError, match="fresh"):
        zclip.Recipe(fresh=600)
    with pytest.raises(ValueError, match="image_size"):
        zclip.Recipe(image_size=100, patch_size=16)
    with pytest.raises(ValueError, match="twin_prob"):
        zclip.Recipe(twin_prob=1.5)
    with pytest.raises(ValueError, match="minutes"):
        zclip.train(tmp_path, minutes=0, device="cpu", smoke=True)
    with pytest.raises(ValueError, match="device"):
        zclip.train(tmp_path, minutes=1, device="tpu", smoke=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zclip.load_clip(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no faces-clip checkpoint"):
        zclip.export(tmp_path / "empty", tmp_path / "out")
