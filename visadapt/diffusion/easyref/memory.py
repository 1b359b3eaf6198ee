"""The memory one EasyRef training step needs besides the loaded weights, estimated from the configuration before
training starts (:func:`estimate_step_memory`), and the refusal of a run whose estimate exceeds what is free
(:func:`check_step_memory`).

What is counted, per device and micro-batch of B examples with n references each (n = ``--max-refs`` in stage 3, 1 in
stages 1-2), every reference at most T = (s/28)² + 1 visual tokens, i.e. 4T patches of 14 px, at the encoder's
reference size s (336 px as released; :func:`~visadapt.diffusion.easyref.encoder.reference_pixels`):

- host: the references' pixels, 4T patches × (3·2·14·14 = 1176) values × 4 bytes each, held :data:`PIXEL_COPIES`
  times at the peak (the processor's patches and the collated tensor; measured on the tiny models in fp32, 8 → 32
  references: the step's peak grows by 4.0 MiB per 336-px reference, 1.8 times its 2.2 MiB of pixels);
- device: the vision tower's activations over 4T·n·B patch tokens and the language model's over its L tokens
  (``--max-seq-len`` when set, else n·(T+2) plus the prompt's tokens, per example), each token keeping
  :func:`kept_per_token` values in every layer that trains (one layer's worth while frozen), the final layer's over
  L + Q tokens (it always trains); 2 bytes a value under bf16/fp16, 4 in fp32; and the trainable parameters'
  gradients and AdamW moments, 12 bytes each (fp32; split over the processes under DeepSpeed ZeRO-2). Under
  gradient checkpointing a trained layer keeps only its input, and the backward pass recomputes one layer at a
  time, whose full set comes on top.

Attention costs no L² term for unpadded sequences (stage 3's one example per device): they go to SDPA's fused
kernels (:func:`~visadapt.diffusion.easyref.encoder._run_layers`). Padded batches get a (B, 1, L, L) mask, which
stages 1-2 cap with ``--max-seq-len`` 256.

Not counted: the UNet's and VAE's activations for the target (they do not grow with the references), that mask when
a batch is padded dynamically, and the allocator's slack; the references are counted at their largest token count
(square ones take 121 of 145 at 336 px; on the tiny models the measured peak grows by 74 % of the estimate per
reference). The estimate is the part of the step's need that the references drive: it refuses runs whose
references cannot fit, while one that passes can still run out of memory at a large ``--resolution``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from visadapt.utils import NotEnoughMemoryError
from visadapt.utils.memory import available_bytes, gib, host_available_bytes

MiB = 2 ** 20
PIXEL_COPIES = 2  # copies of a reference's pixels alive at the step's peak (module docstring)
OPTIMIZER_BYTES = 12  # per trainable parameter: fp32 gradient + AdamW's two fp32 moments


def kept_per_token(width: int, mlp_width: int, checkpointing: bool) -> float:
    """Activation values one token keeps per trained transformer layer until the backward pass: its input (``width``)
    under gradient checkpointing, else 9·width + 2·mlp_width (Korthikanti et al. 2022, "Reducing activation
    recomputation in large transformer models", without the attention scores, which SDPA's fused kernels do not
    keep)."""
    return width if checkpointing else 9 * width + 2 * mlp_width


@dataclass(frozen=True)
class StepMemory:
    """Estimated bytes of one training step beyond the loaded weights (module docstring): ``host`` (the references'
    pixels), ``device`` (activations, gradients, AdamW state), and what one more reference per example adds to each."""

    host: int
    device: int
    host_per_reference: int
    device_per_reference: int
    optimizer: int


def estimate_step_memory(mllm_config, *, image_size: int, references: int, batch: int, prompt_tokens: int,
                         max_seq_len: int, num_queries: int, train_mllm: bool, checkpointing: bool, act_bytes: int,
                         trainable_params: int, optimizer_shards: int = 1) -> StepMemory:
    """:class:`StepMemory` of a micro-batch of ``batch`` examples with ``references`` references each (the module
    docstring derives every term). ``mllm_config``: the Qwen2-VL config (``vision_config``, ``text_config``);
    ``prompt_tokens``: the chat template's tokens without images (instruction and caption); ``max_seq_len`` 0 for
    dynamic padding; ``act_bytes`` 2 under bf16/fp16, 4 in fp32; ``optimizer_shards``: the processes DeepSpeed ZeRO
    splits the gradients and AdamW state over (1 without it)."""
    from .encoder import reference_pixels

    vision, text = mllm_config.vision_config, mllm_config.text_config

    def parts(n: int) -> tuple[int, int]:
        merge = vision.spatial_merge_size ** 2
        tokens = reference_pixels(image_size)[1] // (28 * 28)  # merged visual tokens of one reference, at most
        patches = batch * n * tokens * merge
        patch_values = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        host = patches * patch_values * 4 * PIXEL_COPIES
        embed = vision.embed_dim
        vision_layers = vision.depth if train_mllm else 1
        kept_vision = kept_per_token(embed, int(embed * vision.mlp_ratio), checkpointing and train_mllm)
        length = max_seq_len or n * (tokens + 2) + prompt_tokens
        hidden = text.hidden_size
        kept_text = kept_per_token(hidden, text.intermediate_size, checkpointing and train_mllm)
        language_layers = (text.num_hidden_layers - 1) if train_mllm else 1  # the last one is EasyRef's final layer
        full_vision, full_text = kept_per_token(embed, int(embed * vision.mlp_ratio), False), kept_per_token(
            hidden, text.intermediate_size, False)
        values = (patches * kept_vision * vision_layers + batch * length * kept_text * language_layers
                  + batch * (length + num_queries) * full_text)  # the final layer
        if checkpointing and train_mllm:  # the backward recomputes one layer at a time: its full set on top
            values += patches * full_vision + batch * length * full_text
        return host, int(values * act_bytes)

    host, device = parts(references)
    host_next, device_next = parts(references + 1)
    optimizer = trainable_params * OPTIMIZER_BYTES // max(1, optimizer_shards)
    return StepMemory(host=host, device=device + optimizer, host_per_reference=host_next - host,
                      device_per_reference=device_next - device, optimizer=optimizer)


def check_step_memory(need: StepMemory, device: Union[str, "torch.device"], *, stage: int,  # noqa: F821
                      references: int) -> None:
    """Raise :class:`~visadapt.utils.NotEnoughMemoryError` (one line: the estimate, what is free, the fix) when
    ``need`` exceeds the free memory: on the host for the pixels, on ``device`` for the rest (one pool on a CPU)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        pools = [("host RAM", need.host, need.host_per_reference, host_available_bytes()),
                 (str(device), need.device, need.device_per_reference, available_bytes(device))]
    else:
        pools = [("RAM", need.host + need.device, need.host_per_reference + need.device_per_reference,
                  host_available_bytes())]
    for where, bytes_needed, per_reference, free in pools:
        if bytes_needed <= free:
            continue
        fixed = bytes_needed - references * per_reference
        fits = int((free - fixed) // per_reference) if per_reference and free > fixed else 0
        if stage == 3 and fits >= 1:
            fix = (f"lower --max-refs to {fits} or less (each reference takes about "
                   f"{per_reference / MiB:.0f} MiB)")
        else:
            fix = "lower --batch-size or --max-seq-len, keep --gradient-checkpointing on, or free memory"
        raise NotEnoughMemoryError(
            f"one training step needs about {gib(bytes_needed)} of {where} besides the loaded weights "
            f"({references} reference(s) per example: {gib(references * per_reference)}; gradients and AdamW state: "
            f"{gib(need.optimizer if where != 'host RAM' else 0)}), but {gib(free)} is free; {fix}. "
            f"(Estimate: visadapt.diffusion.easyref.memory.)")


__all__ = ["StepMemory", "estimate_step_memory", "check_step_memory", "kept_per_token"]
