"""EasyRef (Zong et al., arXiv 2412.09618) as a diffusers SDXL pipeline: several reference images + a prompt.

```python
pipe = EasyRefPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", easyref="easyref.safetensors",
                                       mllm="Qwen/Qwen2-VL-2B-Instruct", torch_dtype=torch.float16)
image = pipe("a portrait in a garden", reference_images=[face1, face2, face3], scale=1.0).images[0]
```

The pipeline is diffusers' ``StableDiffusionXLPipeline`` with two call arguments more, ``reference_images=`` and
``scale=`` (λ), from :class:`EasyRefMixin`. The reference tokens enter the UNet as diffusers enters IP-Adapter
tokens (``ip_adapter_image_embeds`` → ``added_cond_kwargs["image_embeds"]`` → each cross-attention layer's
decoupled branch), with the conditional encoding (references + instruction + prompt) beside the prompt and the
unconditional one (a black 512² image + instruction + empty text, the training's dropped condition) beside the
negative prompt. A diffusers ControlNet therefore sees the text tokens only: its pipelines pass it the prompt
embeddings and the text/time conditions, never ``image_embeds``, and its own attention processors are untouched;
``EasyRefControlNetPipeline`` is the SDXL ControlNet pipeline with the same two arguments.

Sampling defaults are the released ``generate()``'s, not diffusers': :data:`EASYREF_STEPS` (30) steps and the negative
prompt :data:`EASYREF_NEGATIVE_PROMPT` when the call gives none (``negative_prompt=None`` and no
``negative_prompt_embeds``). Any value the caller passes wins, an explicit ``negative_prompt=""`` included (the released
code encodes that empty text too; diffusers' zeroed negative embeddings come only from ``negative_prompt_embeds``).

``scale=0`` is the base model: the reference branch is skipped, the "easyref" LoRA is switched off for the call and no
references are needed. The call then equals the plain SDXL pipeline's bit for bit when that one is given the same
steps and negative prompt (the defaults above included). With the LoRA on, a user's LoRAs combine with it through
``set_adapters`` as usual.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

from visadapt.diffusion.composer.lora_files import active_adapters, set_active_adapters
from visadapt.diffusion.easyref.encoder import (
    NULL_REFERENCE_SIZE,
    EasyRefEncoder,
    EasyRefInputError,
    check_references,
    load_processor,
    mllm_dtype,
)
from visadapt.diffusion.easyref.files import (
    checkpoint_sizes,
    easyref_state_dict,
    load_easyref_state,
    read_easyref_file,
    save_easyref_file,
)
from visadapt.diffusion.easyref.unet import ADAPTER_NAME, install_easyref, is_easyref_installed, set_easyref_scale

PathLike = Union[str, os.PathLike]

# The released EasyRef.generate()'s defaults (its samples are made with them): steps, and the negative prompt it uses
# when given none. diffusers' SDXL defaults are 50 steps and a zeroed negative.
EASYREF_STEPS = 30
EASYREF_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"


class EasyRefMixin:
    """Adds ``reference_images=`` and ``scale=`` to an SDXL pipeline call (put it before the diffusers class)."""

    easyref_encoder: Optional[EasyRefEncoder] = None
    _easyref_tokens: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (uncond, cond), (B, Q, D) each, in a call

    # -- loading -----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, easyref: Optional[PathLike] = None,
                        mllm: Any = None, encoder: Optional[EasyRefEncoder] = None, **kwargs):
        """diffusers' ``from_pretrained`` for the SDXL parts, then :meth:`load_easyref` when ``easyref``, ``mllm``
        or ``encoder`` is given (``torch_dtype`` is the SDXL parts' only: the MLLM runs in bf16 or fp32)."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if easyref is not None or mllm is not None or encoder is not None:
            pipe.load_easyref(easyref, mllm=mllm, encoder=encoder)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, easyref: Optional[PathLike] = None, mllm: Any = None,
                  encoder: Optional[EasyRefEncoder] = None, **kwargs):
        """diffusers' ``from_pipe`` (components shared); the source's EasyRef encoder comes along, or
        :meth:`load_easyref` runs when ``easyref``, ``mllm`` or ``encoder`` is given."""
        pipe = super().from_pipe(pipeline, **kwargs)
        if easyref is not None or mllm is not None or encoder is not None:
            pipe.load_easyref(easyref, mllm=mllm, encoder=encoder)
        elif getattr(pipeline, "easyref_encoder", None) is not None:
            pipe.easyref_encoder = pipeline.easyref_encoder
        return pipe

    def load_easyref(self, easyref: Optional[PathLike] = None, *, mllm: Any = None,
                     encoder: Optional[EasyRefEncoder] = None, num_tokens: int = 64, r: int = 128,
                     faithful: bool = True, image_size: int = 336,
                     weight_name: Optional[str] = None) -> EasyRefEncoder:
        """Install EasyRef in the UNet, attach the encoder, and load ``easyref`` weights when given.

        ``easyref``: a checkpoint file (ours or the official layout; ``.safetensors`` or a weights-only ``.bin``), a
        folder holding one, or a Hub repo id (``weight_name`` picks the file when there are several). Without it the
        adapter is fresh (``num_tokens``, LoRA rank ``r``; for training). ``mllm``: a Qwen2-VL Hub id or folder, or a
        ``(model, processor)`` pair; or pass a ready ``encoder``. The encoder runs in bf16 where the device computes
        it natively and in fp32 elsewhere, whatever the UNet's dtype (:func:`~visadapt.diffusion.easyref.encoder.
        mllm_dtype`; the released code ran it in bf16, and Qwen2-VL breaks in fp16); ``pipe.to(device)`` re-applies
        that rule there.
        """
        state = _read_checkpoint(easyref, weight_name) if easyref is not None else None
        sizes = checkpoint_sizes(state) if state is not None else {"num_tokens": num_tokens, "r": r}
        if encoder is None:
            if mllm is None:
                raise ValueError("EasyRef needs its multimodal LLM: pass mllm='Qwen/Qwen2-VL-2B-Instruct' (or a "
                                 "folder, or a (model, processor) pair), or encoder=EasyRefEncoder(...).")
            model, processor = _load_mllm(mllm, mllm_dtype(self.unet.device))
            encoder = EasyRefEncoder(model, processor, self.unet.config.cross_attention_dim, sizes["num_tokens"],
                                     faithful=faithful, image_size=image_size)
        if encoder.num_queries != sizes["num_tokens"]:
            raise ValueError(f"The encoder has {encoder.num_queries} reference tokens, the checkpoint "
                             f"{sizes['num_tokens']}; build the encoder with num_queries={sizes['num_tokens']}.")
        if is_easyref_installed(self.unet):
            raise ValueError("EasyRef is already loaded in this pipeline's UNet; call unload_easyref() first.")
        install_easyref(self.unet, num_tokens=sizes["num_tokens"], r=sizes["r"])
        if state is not None:
            load_easyref_state(self.unet, encoder, state)
        encoder.place(self.unet.device)
        self.easyref_encoder = encoder
        return encoder

    def unload_easyref(self) -> None:
        """Remove EasyRef from the UNet and detach the encoder."""
        from visadapt.diffusion.easyref.unet import remove_easyref

        remove_easyref(self.unet)
        self.easyref_encoder = None

    def save_easyref(self, path: PathLike, include_mllm: bool = False, official: bool = False) -> Path:
        """Write the adapter (decoupled K/V, UNet LoRA, final layer, reference tokens, projector; the MLLM too with
        ``include_mllm``) to one ``.safetensors`` file, atomically: in our layout, or with ``official`` in the
        released code's layout (its ``load_ip_adapter`` reads it)."""
        state = easyref_state_dict(self.unet, self.easyref_encoder, include_mllm=include_mllm)
        return save_easyref_file(state, path, official=official)

    def save_pretrained(self, save_directory: PathLike, *args, **kwargs):
        """diffusers' ``save_pretrained``, refused while EasyRef is installed: the UNet would be written with the
        reference layers in its config and weights, which a plain SDXL loader cannot read."""
        if is_easyref_installed(self.unet):
            raise ValueError("This pipeline's UNet carries EasyRef: save the adapter with pipe.save_easyref(path), "
                             "and the SDXL pipeline before load_easyref() or after pipe.unload_easyref().")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def to(self, *args, **kwargs):
        pipe = super().to(*args, **kwargs)
        if self.easyref_encoder is not None:
            self.easyref_encoder.place(self.unet.device)  # its own dtype rule: a UNet's fp16 does not apply
        return pipe

    # -- the call ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_references(self, reference_images: Any, prompts: Sequence[str],
                          do_classifier_free_guidance: bool = True) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(uncond, cond) reference tokens, (B, Q, D) each (uncond None without guidance), on the UNet's device and
        dtype (the encoder's bf16/fp32 output is cast here, where it enters the UNet). ``reference_images``: one list
        per prompt, or one flat list for all."""
        encoder = self._require_encoder()
        groups = check_references(reference_images, len(prompts))
        cond = encoder.encode(groups, list(prompts))
        uncond = None
        if do_classifier_free_guidance:
            from PIL import Image

            black = Image.new("RGB", (NULL_REFERENCE_SIZE, NULL_REFERENCE_SIZE))
            uncond = encoder.encode([[black]], [""]).expand(len(prompts), -1, -1)
        like = self.unet.dtype, self.unet.device
        return (None if uncond is None else uncond.to(like[1], like[0])), cond.to(like[1], like[0])

    def __call__(self, *args, reference_images: Any = None, scale: float = 1.0,
                 reference_prompt: Optional[Union[str, list[str]]] = None, **kwargs):
        """The base pipeline's call plus ``reference_images`` (PIL images / paths: one flat list shared by every
        prompt, or one list per prompt), ``scale`` (λ, 0 = the base model) and ``reference_prompt`` (the text the
        MLLM reads after its instruction; defaults to ``prompt``).

        With EasyRef loaded, ``num_inference_steps`` defaults to 30 and the negative prompt to
        :data:`EASYREF_NEGATIVE_PROMPT`, as in the released code (see :meth:`with_easyref_defaults`)."""
        if self.easyref_encoder is None:
            if reference_images is not None:
                raise EasyRefInputError("reference_images needs EasyRef: load it first with "
                                        "pipe.load_easyref(easyref=..., mllm=...).")
            return super().__call__(*args, **kwargs)
        kwargs = self.with_easyref_defaults(args, kwargs)
        prompts = _prompts(args, kwargs, reference_prompt)
        cfg = kwargs.get("guidance_scale", 5.0) > 1 and self.unet.config.time_cond_proj_dim is None
        if scale == 0:
            tokens = self._null_tokens(len(prompts), cfg)
        else:
            tokens = self.encode_references(reference_images, prompts, cfg)
        embeds = tokens[1] if tokens[0] is None else torch.cat(tokens)
        kwargs["ip_adapter_image_embeds"] = [embeds[:, None]]
        with self._easyref_call(tokens, scale):
            return super().__call__(*args, **kwargs)

    def with_easyref_defaults(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` plus the released sampling defaults for what the call leaves unset (positional arguments
        count as set): ``num_inference_steps`` = 30, and the negative prompt when neither ``negative_prompt`` (a
        keyword None counts as unset, "" does not) nor ``negative_prompt_embeds`` is given."""
        names = list(inspect.signature(super(EasyRefMixin, self).__call__).parameters)[:len(args)]
        given = {**dict(zip(names, args)), **kwargs}
        out = dict(kwargs)
        if "num_inference_steps" not in given:
            out["num_inference_steps"] = EASYREF_STEPS
        unset = "negative_prompt" not in names and given.get("negative_prompt") is None
        if unset and given.get("negative_prompt_embeds") is None:
            out["negative_prompt"] = EASYREF_NEGATIVE_PROMPT
        return out

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device,
                                        num_images_per_prompt, do_classifier_free_guidance):
        """Our tokens per prompt, each repeated for its images (prompt-major, as diffusers orders the prompt
        embeddings); anything else goes to diffusers."""
        if self._easyref_tokens is None:
            return super().prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device,
                                                           num_images_per_prompt, do_classifier_free_guidance)
        uncond, cond = (t.repeat_interleave(num_images_per_prompt, 0) if t is not None else None
                        for t in self._easyref_tokens)
        both = torch.cat([uncond, cond]) if do_classifier_free_guidance else cond
        return [both[:, None].to(device)]

    def easyref_unet_inputs(self, batch: int) -> dict[str, Any]:
        """``added_cond_kwargs`` entries for an extra conditional UNet pass of ``batch`` images inside a call."""
        if self._easyref_tokens is None:
            return {}
        cond = self._easyref_tokens[1]
        return {"image_embeds": [cond.repeat_interleave(batch // cond.shape[0], 0)[:, None]]}

    @contextmanager
    def _easyref_call(self, tokens, scale: float) -> Iterator[None]:
        active = active_adapters(self.unet)
        previous = self._easyref_tokens
        set_easyref_scale(self.unet, scale)
        if scale == 0 and ADAPTER_NAME in active:
            set_active_adapters(self.unet, [n for n in active if n != ADAPTER_NAME])
        self._easyref_tokens = tokens
        try:
            yield
        finally:
            self._easyref_tokens = previous
            set_active_adapters(self.unet, active)

    def _null_tokens(self, batch: int, cfg: bool):
        encoder = self._require_encoder()
        zeros = torch.zeros(batch, encoder.num_queries, encoder.cross_attention_dim, dtype=self.unet.dtype,
                            device=self.unet.device)
        return (zeros if cfg else None), zeros

    def _require_encoder(self) -> EasyRefEncoder:
        if self.easyref_encoder is None:
            raise EasyRefInputError("EasyRef is not loaded: call pipe.load_easyref(easyref=..., mllm=...) first.")
        return self.easyref_encoder


def _prompts(args, kwargs, reference_prompt) -> list[str]:
    """The texts the MLLM reads, one per prompt."""
    text = reference_prompt if reference_prompt is not None else (args[0] if args else kwargs.get("prompt"))
    if text is None:
        if kwargs.get("prompt_embeds") is None:
            raise EasyRefInputError("Pass a prompt (or prompt_embeds with reference_prompt=...).")
        return [""] * kwargs["prompt_embeds"].shape[0]
    return [text] if isinstance(text, str) else list(text)


def _read_checkpoint(source: PathLike, weight_name: Optional[str]) -> dict[str, torch.Tensor]:
    path = Path(source)
    if path.is_dir():
        files = [path / weight_name] if weight_name else sorted(
            p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        if len(files) != 1:
            raise ValueError(f"{len(files)} checkpoint files in {str(path)!r}; pass weight_name=... to pick one.")
        path = files[0]
    elif not path.exists():
        path = Path(_hub_file(str(source), weight_name))
    return read_easyref_file(path)


def _hub_file(repo: str, weight_name: Optional[str]) -> str:
    from huggingface_hub import hf_hub_download, list_repo_files

    if weight_name is None:
        files = [f for f in list_repo_files(repo) if f.endswith((".safetensors", ".bin"))]
        if len(files) != 1:
            raise ValueError(f"{repo!r} has {len(files)} checkpoint files ({files[:5]}); pass weight_name=....")
        weight_name = files[0]
    return hf_hub_download(repo, weight_name)


def _load_mllm(mllm: Any, torch_dtype: torch.dtype):
    """(model, processor): a given pair as it is, else Qwen2-VL from a hub id or folder in ``torch_dtype``."""
    if isinstance(mllm, (tuple, list)) and len(mllm) == 2:
        return mllm
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(mllm, dtype=torch_dtype, attn_implementation="sdpa")
    return model.eval(), load_processor(mllm)


class EasyRefPipeline(EasyRefMixin, StableDiffusionXLPipeline):
    """SDXL with EasyRef: ``pipe(prompt, reference_images=[...], scale=1.0)``."""


class EasyRefControlNetPipeline(EasyRefMixin, StableDiffusionXLControlNetPipeline):
    """SDXL + ControlNet with EasyRef; the ControlNet sees the text tokens only."""
