"""EasyRef's UNet side: the decoupled cross-attention (diffusers' IP-Adapter path) and the UNet LoRA.

:func:`install_easyref` ``(unet, num_tokens=64, scale=1.0, r=128)``: diffusers' IP-Adapter machinery on
every cross-attention layer (``IPAdapterAttnProcessor2_0`` with ``to_k_ip``/``to_v_ip`` initialised from the layer's
``to_k``/``to_v``; an identity ``unet.encoder_hid_proj``), and the UNet LoRA as the peft adapter ``"easyref"`` on
q/k/v/out of every attention layer. The UNet then takes the tokens as ``added_cond_kwargs["image_embeds"] =
[c[:, None]]`` (c: (B, Q, D)), exactly as diffusers feeds IP-Adapter tokens; see :func:`unet_image_embeds`.
:func:`set_easyref_scale` sets λ; :func:`remove_easyref` undoes the install.
"""

from __future__ import annotations

import torch
import torch.nn as nn

ADAPTER_NAME = "easyref"
LORA_TARGETS = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"  # peft regex: q/k/v/out of self- and cross-attention


def _attention(unet, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name.rsplit(".processor", 1)[0])


def _base(linear: nn.Module) -> nn.Module:
    return getattr(linear, "base_layer", linear)


def _decoupled_processors(unet) -> list:
    """The UNet's IP-Adapter processors, also when a wrapping processor holds one as ``.base`` (the composer's)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    found = []
    for processor in unet.attn_processors.values():
        processor = processor if isinstance(processor, IPAdapterAttnProcessor2_0) else getattr(processor, "base", None)
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            found.append(processor)
    return found


def is_easyref_installed(unet) -> bool:
    return bool(_decoupled_processors(unet))


def install_easyref(unet, num_tokens: int = 64, scale: float = 1.0, r: int = 128) -> None:
    """Give ``unet`` EasyRef's decoupled cross-attention and (rank ``r`` > 0) its LoRA, in place.

    Every cross-attention layer gets diffusers' ``IPAdapterAttnProcessor2_0`` (one IP-Adapter of ``num_tokens``
    tokens): out = softmax(Q K_txtᵀ/√d) V_txt + λ·softmax(Q (W'_K c)ᵀ/√d) (W'_V c), W'_K/W'_V (``to_k_ip[0]`` /
    ``to_v_ip[0]``) initialised from the layer's W_K/W_V; self-attention processors stay as they are.
    ``unet.encoder_hid_proj`` becomes an identity IP-Adapter projection, so the UNet takes c (B, Q, D) as
    ``added_cond_kwargs["image_embeds"] = [c[:, None]]`` (:func:`unet_image_embeds`). The LoRA (rank r, alpha r →
    scale 1, B = 0 at init) is the peft adapter ``"easyref"`` on to_q/to_k/to_v/to_out.0 of every attention layer.
    """
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    if is_easyref_installed(unet):
        raise ValueError("This UNet already has IP-Adapter/EasyRef layers; call remove_easyref(unet) first.")
    if unet.encoder_hid_proj is not None:
        raise ValueError("This UNet already projects its encoder states (encoder_hid_proj is set); EasyRef needs an "
                         "SDXL-style UNet without one.")
    processors = {}
    for name, processor in unet.attn_processors.items():
        attn = _attention(unet, name)
        if not attn.is_cross_attention:
            processors[name] = processor
            continue
        to_k, to_v = _base(attn.to_k), _base(attn.to_v)
        new = IPAdapterAttnProcessor2_0(hidden_size=to_k.out_features, cross_attention_dim=to_k.in_features,
                                        num_tokens=(num_tokens,), scale=scale)
        with torch.no_grad():
            new.to_k_ip[0].weight.copy_(to_k.weight)
            new.to_v_ip[0].weight.copy_(to_v.weight)
        processors[name] = new.to(device=to_k.weight.device, dtype=to_k.weight.dtype)
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([nn.Identity()])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    if r > 0:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=LORA_TARGETS,
                                    init_lora_weights=True), adapter_name=ADAPTER_NAME)


def remove_easyref(unet) -> None:
    """Undo :func:`install_easyref`: default attention processors, no ``encoder_hid_proj``, no "easyref" adapter."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    processors = {name: AttnProcessor2_0() if isinstance(p, IPAdapterAttnProcessor2_0) else p
                  for name, p in unet.attn_processors.items()}
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = None
    unet.register_to_config(encoder_hid_dim_type=None)
    adapters = getattr(unet, "peft_config", None) or {}
    if ADAPTER_NAME in adapters:
        if len(adapters) == 1:
            unet.unload_lora()  # the last adapter: unwrap the layers too, so the UNet saves as plain SDXL again
        else:
            unet.delete_adapters(ADAPTER_NAME)


def set_easyref_scale(unet, scale: float) -> None:
    """λ of every decoupled cross-attention layer (0 skips the reference branch; the LoRA is not touched)."""
    found = _decoupled_processors(unet)
    if not found:
        raise ValueError("This UNet has no EasyRef layers; call install_easyref(unet) first.")
    for processor in found:
        processor.scale = [float(scale)] * len(processor.to_k_ip)


def unet_image_embeds(tokens: torch.Tensor) -> list[torch.Tensor]:
    """(B, Q, D) EasyRef tokens → the ``added_cond_kwargs["image_embeds"]`` value of an installed UNet."""
    return [tokens[:, None]]
