"""Tiny randomly-initialised text models, built from configs and saved with ``save_pretrained``.

They let the test-suite, the benchmarks and the offline ``smoke`` preset exercise the real loading and
generation code paths (``from_pretrained``, chat templates, processors, batching) without any download:
each builder runs in about a second on a CPU and needs no network. Their outputs are noise.

The weights are drawn from a fixed seed inside :func:`torch.random.fork_rng`, so building twice gives the
same model and the caller's global random state is left untouched. Nothing global is set here (no
environment variables, no logging levels); the caller decides about ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "<|end|>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
IMAGE_TOKEN = "<image>"

# Words of the built-in vocabulary: the words of the default prompts (caption, random API, variation) and
# common words of image descriptions, so that prompts tokenise without ``<unk>`` and outputs read as words.
_WORD_TEXT = """
a an the this that these those it its is are was were be been being has have had do does did of in on at to
from by with without for as and or but not no so than then there here into onto over under above below near
behind between beside next out up down off about around through while who what which where when why how
describe image images photo photos picture pictures photograph photographs description descriptions short
shorter extremely very quite one two three four five six seven eight nine ten many few some all each every
other another same different more most less least only also just again still answer answers write rewrite
rephrase fill filled blank blanks words word sentence sentences keep kept given result edit edited wording
exactly about least at tone tones plain factual concrete visual style styles modern rustic minimalist classic
real estate listing would could should will can may might must shows show showing shown looks look looking
captioning model models you your i me my we our they them their he him his she her person people man men
woman women child children boy girl face faces portrait portraits smiling smile smiles eyes eye hair nose
mouth lips ears beard glasses hat young old older middle aged adult expression neutral happy serious calm
bedroom bedrooms room rooms interior hotel bed beds double single bunk sheets pillow pillows blanket bedding
nightstand nightstands lamp lamps bedside furniture wooden wood desk chair chairs table sofa wardrobe closet
window windows curtains curtain wall walls floor ceiling carpet rug door mirror painting shelf shelves plant
light lights lit lighting sunlight sun natural soft bright dark dim warm cool night day morning evening
white black grey gray beige brown red orange yellow green blue purple pink gold golden silver colour colours
color colors colourful colorful pale deep tones large small big little tall long wide narrow round square
clean cozy cosy spacious simple elegant luxury cheap new old ordinary everyday scene view background
foreground center centre left right top bottom side front back corner garden street city house home building
outside inside indoor outdoor sky tree trees grass water sea beach mountain road car cars dog cat animal
animals food plate cup glass bottle book books computer phone sign text logo flowers flower field park
overlooking standing sitting lying holding wearing walking looking facing covered made placed hanging open
closed empty full brass metal stone fabric leather cotton shirt jacket dress suit tie background blurred
"""
WORDS = tuple(_WORD_TEXT.split())
PUNCTUATION = [".", ",", "_", ":", ";", "!", "?", "'", '"', "-", "(", ")", "{", "}", "/", "0", "1", "2", "3"]

# A chat template in the usual Hugging Face shape: a list of role/content messages, ``content`` either a
# string or a list of typed blocks (``{"type": "text"}`` / ``{"type": "image"}``). One template serves the
# text-only LM and the VLM.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'image' %}<image> "
    "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    " <|end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def vocabulary(extra_words: Iterable[str] = ()) -> list[str]:
    """The tiny models' word list (lower case, no duplicates, stable order)."""
    seen: dict[str, None] = {}
    for word in (*WORDS, *PUNCTUATION, *(w.lower() for w in extra_words)):
        seen.setdefault(word, None)
    return list(seen)


def build_word_tokenizer(
    *,
    extra_words: Iterable[str] = (),
    special_tokens: Iterable[str] = (),
    with_pad_token: bool = True,
    bert_style: bool = False,
    decoder_start: str | None = None,
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over :func:`vocabulary`, wrapped for ``transformers``.

    ``bert_style`` gives ``[CLS] … [SEP]`` framing (for the sentence encoder and BLIP); otherwise the chat
    special tokens and :data:`CHAT_TEMPLATE`. ``decoder_start`` adds a BOS token to the BERT-style vocabulary
    (BLIP's ``[DEC]``). ``with_pad_token=False`` leaves the pad token unset, as in many released causal LMs
    (Llama 3), so the generator's fallback can be tested.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if bert_style:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *([decoder_start] if decoder_start else [])]
        unk = "[UNK]"
    else:
        specials = [PAD, UNK, BOS, EOS, *ROLE_TOKENS, *special_tokens]
        unk = UNK
    vocab = {tok: i for i, tok in enumerate([*specials, *vocabulary(extra_words)])}
    backend = Tokenizer(WordLevel(vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    if bert_style:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            **({"bos_token": decoder_start} if decoder_start else {}),
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=128,
        )
    kwargs: dict[str, Any] = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    if with_pad_token:
        kwargs["pad_token"] = PAD
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=[*ROLE_TOKENS, *special_tokens],
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
        **kwargs,
    )


def _llama_config(tokenizer: PreTrainedTokenizerFast, *, hidden: int = 48) -> Any:
    from transformers import LlamaConfig

    pad_id = tokenizer.pad_token_id  # None for a tokenizer built without a pad token, as in Llama 3
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> Any:
    """Defaults that keep a random model's outputs readable: never emit padding, role or image tokens."""
    from transformers import GenerationConfig

    banned = [PAD, UNK, BOS, *ROLE_TOKENS, *[t for t in (IMAGE_TOKEN,) if t in tokenizer.get_vocab()]]
    return GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[tokenizer.convert_tokens_to_ids(t) for t in banned],
        min_new_tokens=1,
    )


def _image_processor(name: str, **kwargs: Any) -> Any:
    """The PIL variant of an image processor where transformers has one (v5 without torchvision), so
    loading the saved model never depends on torchvision; the classic class otherwise."""
    import transformers

    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    return cls(**kwargs)


def _seeded_init(build: Any, seed: int) -> Any:
    """Run ``build()`` with a fixed torch seed, leaving the caller's global random state as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_chat_lm(
    path: str | os.PathLike[str], *, seed: int = 0, with_pad_token: bool = True, hidden_size: int = 48
) -> Path:
    """A 2-layer Llama with a word-level tokenizer and a chat template, for ``AutoModelForCausalLM``."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    tokenizer = build_word_tokenizer(with_pad_token=with_pad_token)
    config = _llama_config(tokenizer, hidden=hidden_size)
    model = _seeded_init(lambda: LlamaForCausalLM(config), seed).eval()
    model.generation_config = _generation_config(tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_vlm(path: str | os.PathLike[str], *, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """A Llava-style VLM (2-layer CLIP vision tower + 2-layer Llama) for ``AutoModelForImageTextToText``.

    Saved with a ``LlavaProcessor`` (``CLIPImageProcessor`` + word-level tokenizer with an image-aware chat
    template), so ``AutoProcessor`` and the processor's ``apply_chat_template`` work as for released VLMs.
    """
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    tokenizer = build_word_tokenizer(special_tokens=[IMAGE_TOKEN])
    text_config = _llama_config(tokenizer, hidden=48)
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    model = _seeded_init(lambda: LlavaForConditionalGeneration(config), seed).eval()
    model.generation_config = _generation_config(tokenizer)
    image_processor = _image_processor(
        "CLIPImageProcessor",
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_sentence_transformer(path: str | os.PathLike[str], *, seed: int = 0, hidden_size: int = 32) -> Path:
    """A 2-layer BERT with mean pooling, saved as a sentence-transformers model directory."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    from transformers import BertConfig, BertModel

    path = Path(path)
    tokenizer = build_word_tokenizer(bert_style=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _seeded_init(lambda: BertModel(config), seed).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # Load the bare encoder as a sentence-transformers module, add pooling, and save the full layout
    # (modules.json, sentence_bert_config.json, pooling config) over the same directory.
    encoder = Transformer(str(path), max_seq_length=128)
    pooling = Pooling(hidden_size, pooling_mode="mean")
    SentenceTransformer(modules=[encoder, pooling], device="cpu").save(str(path))
    return path


def build_tiny_blip(path: str | os.PathLike[str], *, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """A BLIP captioner (2-layer ViT + 2-layer BERT decoder), for ``AutoModelForImageTextToText``."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    path = Path(path)
    tokenizer = build_word_tokenizer(bert_style=True, decoder_start="[DEC]")
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "encoder_hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 128,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
    }
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    config = BlipConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)
    model = _seeded_init(lambda: BlipForConditionalGeneration(config), seed).eval()
    image_processor = _image_processor("BlipImageProcessor", size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
