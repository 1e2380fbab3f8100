"""The local text backends on tiny random models, loaded through the same ``from_pretrained`` path as hub ids.

The models are built once per session by :mod:`spti.testing.tiny_text` (about a second each, offline).
Their outputs are noise, so the tests check the mechanics: shapes, order, batching, seeding, padding
side, prompt stripping, one image per caption prompt, and clear errors for missing models.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")

import torch
from PIL import Image

from spti.backends.base import Captioner, TextEmbedder, TextGenerator
from spti.backends.local.text import HFCaptioner, HFTextGenerator, SentenceTransformerEmbedder
from spti.errors import ModelNotFoundError, SptiError
from spti.testing import tiny_text

SYSTEM = "You write short, concrete, visual descriptions of interior photographs."


# ---------------------------------------------------------------------------------------------
# Fixtures: build each tiny model once, load each backend once


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_text")


@pytest.fixture(scope="session")
def lm_path(tiny_dir: Path) -> Path:
    return tiny_text.build_tiny_chat_lm(tiny_dir / "lm")


@pytest.fixture(scope="session")
def vlm_path(tiny_dir: Path) -> Path:
    return tiny_text.build_tiny_vlm(tiny_dir / "vlm")


@pytest.fixture(scope="session")
def st_path(tiny_dir: Path) -> Path:
    return tiny_text.build_tiny_sentence_transformer(tiny_dir / "sentence")


@pytest.fixture(scope="session")
def generator(lm_path: Path) -> HFTextGenerator:
    return HFTextGenerator(str(lm_path), device="cpu", batch_size=3)


@pytest.fixture(scope="session")
def captioner(vlm_path: Path) -> HFCaptioner:
    return HFCaptioner(str(vlm_path), device="cpu", batch_size=2)


@pytest.fixture(scope="session")
def embedder(st_path: Path) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(str(st_path), device="cpu", batch_size=4)


def conversations(n: int) -> list[list[dict[str, str]]]:
    """Prompts of different lengths, deliberately not sorted by length."""
    lengths = [3, 1, 5, 2, 4, 1, 6][:n]
    return [
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"write a short description of a bedroom {'with a lamp ' * k}"},
        ]
        for k in lengths
    ]


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [
        Image.fromarray(rng.integers(0, 256, size=(24 + 8 * i, 40, 3), dtype=np.uint8), mode="RGB") for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# Builders


def test_import_is_light() -> None:
    """Importing the backend and builder modules must not import torch or transformers (fast CLI start)."""
    code = (
        "import sys, spti.backends.local.text, spti.testing.tiny_text; "
        "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builders_are_deterministic_and_leave_global_rng_alone(tmp_path: Path, lm_path: Path) -> None:
    state = torch.get_rng_state()
    again = tiny_text.build_tiny_chat_lm(tmp_path / "lm")
    assert torch.equal(torch.get_rng_state(), state)
    assert (again / "model.safetensors").read_bytes() == (lm_path / "model.safetensors").read_bytes()


def test_tokenizer_covers_the_prompt_words(generator: HFTextGenerator) -> None:
    tok = generator.tokenizer
    text = "Write an extremely short description of a photo of a bedroom, in a plain factual tone."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text.lower()


# ---------------------------------------------------------------------------------------------
# HFTextGenerator


def test_generator_satisfies_the_interface(generator: HFTextGenerator) -> None:
    assert isinstance(generator, TextGenerator)
    assert generator.generate([]) == []


def test_greedy_outputs_are_strings_in_order_and_batching_does_not_change_them(generator: HFTextGenerator) -> None:
    convs = conversations(7)  # 3 batches of 3, 3, 1 after sorting by length
    batched = generator.generate(convs, temperature=0.0, max_new_tokens=8)
    assert len(batched) == len(convs)
    assert all(isinstance(t, str) and t for t in batched)
    one_by_one = [generator.generate([c], temperature=0.0, max_new_tokens=8)[0] for c in convs]
    assert batched == one_by_one
    assert len(set(batched)) > 1  # different prompts give different answers, so order is meaningful


def test_greedy_matches_plain_transformers_generate_and_strips_the_prompt(generator: HFTextGenerator) -> None:
    conv = conversations(1)[0]
    inputs = generator.prepare([conv])
    with torch.inference_mode():
        full = generator.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    expected = generator.tokenizer.decode(full[0, prompt_len:], skip_special_tokens=True).strip()
    echoed = generator.tokenizer.decode(full[0], skip_special_tokens=True)

    (answer,) = generator.generate([conv], temperature=0.0, max_new_tokens=6)
    assert answer == expected
    assert answer != echoed.strip()
    assert "description of a bedroom" not in answer
    assert len(answer.split()) <= 6


def test_left_padding(generator: HFTextGenerator) -> None:
    convs = conversations(3)
    inputs = generator.prepare(convs)
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    assert bool(mask[:, -1].all()), "every row must end with a real token (left padding)"
    lengths = mask.sum(dim=1)
    assert int(lengths.min()) < mask.shape[1]
    shortest = int(lengths.argmin())
    n_pad = mask.shape[1] - int(lengths[shortest])
    assert bool((mask[shortest, :n_pad] == 0).all())
    assert bool((ids[shortest, :n_pad] == generator.tokenizer.pad_token_id).all())
    assert generator.tokenizer.padding_side == "left"


def test_prompt_has_one_bos_and_ends_with_the_assistant_turn(generator: HFTextGenerator) -> None:
    ids = generator.prepare(conversations(1))["input_ids"][0].tolist()
    tok = generator.tokenizer
    assert ids.count(tok.bos_token_id) == 1
    assert tok.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"


def test_sampling_is_deterministic_given_a_seed(generator: HFTextGenerator) -> None:
    convs = conversations(5)
    kwargs = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 8}
    state = torch.get_rng_state()
    first = generator.generate(convs, seed=11, **kwargs)
    assert torch.equal(torch.get_rng_state(), state), "seeded generation must not touch the global RNG"
    assert generator.generate(convs, seed=11, **kwargs) == first
    assert generator.generate(convs, seed=12, **kwargs) != first
    assert all(isinstance(t, str) for t in first)


def test_identical_prompts_in_one_call_are_different_samples(generator: HFTextGenerator) -> None:
    convs = [conversations(1)[0]] * 4
    out = generator.generate(convs, temperature=1.0, max_new_tokens=8, seed=3, keys=[f"k/{i}" for i in range(4)])
    assert len(set(out)) > 1


def test_keys_must_match_the_batch(generator: HFTextGenerator) -> None:
    with pytest.raises(ValueError, match="keys"):
        generator.generate(conversations(2), keys=["only-one"])


def test_system_turn_is_folded_when_the_template_refuses_it(lm_path: Path) -> None:
    gen = HFTextGenerator(str(lm_path), device="cpu")
    gen.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    text = gen.render(conversations(1)[0])
    assert "<|system|>" not in text
    assert text.startswith(f"<|user|> {SYSTEM}\n\nwrite a short description")
    assert gen.generate(conversations(1), temperature=0.0, max_new_tokens=3)[0]


def test_tokenizer_without_pad_token(tmp_path: Path) -> None:
    path = tiny_text.build_tiny_chat_lm(tmp_path / "nopad", with_pad_token=False)
    gen = HFTextGenerator(str(path), device="cpu", batch_size=4)
    assert gen.tokenizer.pad_token == gen.tokenizer.eos_token
    convs = conversations(4)
    batched = gen.generate(convs, temperature=0.0, max_new_tokens=5)
    assert batched == [gen.generate([c], temperature=0.0, max_new_tokens=5)[0] for c in convs]


def test_model_without_chat_template_is_refused(tmp_path: Path, lm_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(lm_path, plain)
    (plain / "chat_template.jinja").unlink()
    with pytest.raises(SptiError, match="chat template"):
        HFTextGenerator(str(plain), device="cpu")


def test_dtype_is_honoured(lm_path: Path) -> None:
    assert HFTextGenerator(str(lm_path), device="cpu").model.dtype == torch.float32  # auto on CPU
    gen = HFTextGenerator(str(lm_path), device="cpu", dtype="bf16")
    assert gen.model.dtype == torch.bfloat16
    assert isinstance(gen.generate(conversations(1), temperature=0.0, max_new_tokens=2)[0], str)


# ---------------------------------------------------------------------------------------------
# HFCaptioner


def test_captioner_satisfies_the_interface(captioner: HFCaptioner) -> None:
    assert isinstance(captioner, Captioner)
    assert captioner.caption([]) == []


def test_captions_are_strings_in_order_and_batching_does_not_change_them(captioner: HFCaptioner) -> None:
    imgs = images(5)  # batches of 2, 2, 1
    caps = captioner.caption(imgs, max_new_tokens=8, keys=[f"caption/{i}" for i in range(5)])
    assert len(caps) == 5
    assert all(isinstance(c, str) and c for c in caps)
    assert caps == [captioner.caption([im], max_new_tokens=8)[0] for im in imgs]
    assert len(set(caps)) > 1  # captions depend on the image, so order is meaningful


def test_each_caption_prompt_holds_exactly_one_image(captioner: HFCaptioner) -> None:
    imgs = images(2)
    inputs = captioner.prepare(imgs, "Describe the image.")
    assert inputs["pixel_values"].shape[0] == 2
    image_token_id = captioner.processor.image_token_id
    per_image = (32 // 8) ** 2  # patches of the tiny CLIP tower (CLS dropped by the "default" strategy)
    counts = (inputs["input_ids"] == image_token_id).sum(dim=1).tolist()
    assert counts == [per_image, per_image]
    text = captioner.processor.apply_chat_template(
        [captioner.conversation(imgs[0], "Describe the image.")], add_generation_prompt=True, tokenize=False
    )[0]
    assert text.count("<image>") == 1
    assert text.rstrip().endswith("<|assistant|>")
    assert captioner.tokenizer.padding_side == "left"


def test_caption_prompt_is_not_echoed(captioner: HFCaptioner) -> None:
    img = images(1)
    inputs = captioner.prepare(img, "Describe the image.")
    with torch.inference_mode():
        full = captioner.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    expected = captioner.tokenizer.decode(full[0, prompt_len:], skip_special_tokens=True).strip()
    (cap,) = captioner.caption(img, prompt="Describe the image.", max_new_tokens=6)
    assert cap == expected
    assert not cap.startswith("describe the image")
    assert len(cap.split()) <= 6


def test_caption_prompt_changes_the_request(captioner: HFCaptioner) -> None:
    img = images(1)
    a = captioner.prepare(img, "Describe the image.")["input_ids"]
    b = captioner.prepare(img, "Describe the bedroom in the photo.")["input_ids"]
    assert a.shape != b.shape or not torch.equal(a, b)


def test_non_rgb_images_are_converted(captioner: HFCaptioner) -> None:
    gray = images(1)[0].convert("L")
    rgba = images(1)[0].convert("RGBA")
    caps = captioner.caption([gray, rgba], max_new_tokens=4)
    assert all(isinstance(c, str) for c in caps)


def test_blip_captioner_through_the_same_class(tmp_path: Path) -> None:
    path = tiny_text.build_tiny_blip(tmp_path / "blip")
    blip = HFCaptioner(str(path), device="cpu", batch_size=2)
    assert blip.unprompted
    imgs = images(3)
    caps = blip.caption(imgs, prompt="ignored by blip", max_new_tokens=6)
    assert len(caps) == 3
    assert all(isinstance(c, str) and c for c in caps)
    assert caps == [blip.caption([im], max_new_tokens=6)[0] for im in imgs]
    assert caps == blip.caption(imgs, prompt="a different prompt", max_new_tokens=6)


# ---------------------------------------------------------------------------------------------
# SentenceTransformerEmbedder


def test_embeddings_shape_dtype_and_normalisation(embedder: SentenceTransformerEmbedder) -> None:
    assert isinstance(embedder, TextEmbedder)
    texts = ["a bed", "a red bed with white sheets", "a lamp on a desk", "a bed", "night", "a window"]
    emb = embedder.embed(texts)
    assert emb.shape == (len(texts), embedder.dimension)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[3], atol=1e-6)  # same text, same vector
    assert not np.allclose(emb[0], emb[1])
    # order and batch size do not matter
    np.testing.assert_allclose(embedder.embed(texts[::-1])[::-1], emb, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([embedder.embed([t]) for t in texts]), emb, atol=1e-5)
    empty = embedder.embed([])
    assert empty.shape == (0, embedder.dimension)
    assert empty.dtype == np.float32


def test_embeddings_without_normalisation(st_path: Path, embedder: SentenceTransformerEmbedder) -> None:
    raw = SentenceTransformerEmbedder(str(st_path), device="cpu", normalize=False)
    texts = ["a bed", "a lamp on a desk"]
    unnormalised = raw.embed(texts)
    assert unnormalised.dtype == np.float32
    assert not np.allclose(np.linalg.norm(unnormalised, axis=1), 1.0)
    norms = np.linalg.norm(unnormalised, axis=1, keepdims=True)
    np.testing.assert_allclose(unnormalised / norms, embedder.embed(texts), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Missing models


BACKENDS = [HFTextGenerator, HFCaptioner, SentenceTransformerEmbedder]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda c: c.__name__)
def test_unknown_hub_id_offline_gives_a_clear_error(backend: type, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(ModelNotFoundError, match="spti-tests/no-such-model") as info:
        backend("spti-tests/no-such-model", device="cpu")
    assert "save_pretrained" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda c: c.__name__)
def test_missing_local_path_gives_a_clear_error(backend: type, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        backend(str(missing), device="cpu")


# ---------------------------------------------------------------------------------------------
# GPU (deselected by default: -m gpu)


@pytest.mark.gpu
def test_cuda_half_precision(lm_path: Path, vlm_path: Path, st_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gen = HFTextGenerator(str(lm_path), batch_size=4)  # device and dtype auto
    assert gen.device == "cuda"
    assert gen.model.dtype == torch.float16
    convs = conversations(5)
    cuda_state = torch.cuda.get_rng_state()
    first = gen.generate(convs, temperature=1.0, max_new_tokens=6, seed=5)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert first == gen.generate(convs, temperature=1.0, max_new_tokens=6, seed=5)
    assert all(isinstance(t, str) for t in gen.generate(convs, temperature=0.0, max_new_tokens=6))

    cap = HFCaptioner(str(vlm_path), batch_size=2)
    assert cap.model.dtype == torch.float16
    caps = cap.caption(images(3), max_new_tokens=6)
    assert len(caps) == 3
    assert all(isinstance(c, str) for c in caps)

    emb = SentenceTransformerEmbedder(str(st_path)).embed(["a bed", "a lamp"])
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
