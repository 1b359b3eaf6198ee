"""A tiny random Qwen2-VL and its processor, built from configs: the offline multimodal LLM of EasyRef's tests.

Nothing here downloads. The tokenizer is byte-level BPE without merges (every UTF-8 byte is a token) plus
Qwen2-VL's special tokens, and the chat template renders the Qwen2-VL chat format (system turn, user turn with
``<|vision_start|><|image_pad|><|vision_end|>`` per image, assistant generation prompt), so the processor expands
image placeholders, pads and masks exactly as the real one does. Outputs are noise: the model exists to run the
EasyRef machinery end to end.
"""

from __future__ import annotations

import functools

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's chat layout: a default system turn, one user turn whose images are vision-wrapped pads, then the
# assistant prompt when asked for. (Written for this stack; a real checkpoint ships its own template.)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Tiny images: 56 px references give 4x4 patches of 14 px, merged 2x2 → 4 visual tokens each.
TINY_IMAGE_SIZE = 56


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok.to_str()


def tiny_qwen2vl_processor(image_size: int = TINY_IMAGE_SIZE):
    """A ``Qwen2VLProcessor`` (tokenizer, image processor, chat template) built without downloads.

    Images are resized to about ``image_size`` px a side, as EasyRef sizes its references (see
    :func:`visadapt.diffusion.easyref.encoder.reference_pixels`), by the PIL image processor (the released pixels).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from visadapt.diffusion.easyref.encoder import reference_pixels

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right")
    tokenizer.chat_template = CHAT_TEMPLATE
    min_pixels, max_pixels = reference_pixels(image_size)
    # The PIL image processor, as :func:`~visadapt.diffusion.easyref.encoder.load_processor` loads for real models
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def tiny_qwen2vl_config(tokenizer, hidden_size: int = 32, layers: int = 2):
    """A Qwen2-VL config: ``layers`` decoder layers of width ``hidden_size``, one vision block of width 16."""
    from transformers import Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    heads = 2
    half = hidden_size // heads // 2  # M-RoPE splits the rotary half-dimension into (t, h, w) sections
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=1, embed_dim=16, hidden_size=hidden_size, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def tiny_qwen2vl(seed: int = 0, hidden_size: int = 32, layers: int = 2, image_size: int = TINY_IMAGE_SIZE):
    """(model, processor): a random ``Qwen2VLForConditionalGeneration`` and its :func:`tiny_qwen2vl_processor`.

    The model runs in float32 with SDPA attention; ``layers`` ≥ 2 (EasyRef takes the last one off).
    """
    from transformers import Qwen2VLForConditionalGeneration

    processor = tiny_qwen2vl_processor(image_size)
    config = tiny_qwen2vl_config(processor.tokenizer, hidden_size, layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    return model, processor
