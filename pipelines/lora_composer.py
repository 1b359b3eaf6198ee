"""LoRA-Composer (Yang et al., arXiv 2403.11627) as diffusers pipelines for SD-1.x/2.x and SDXL.

```python
pipe = LoRAComposerPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")   # or .from_pipe(sd)
image = pipe(prompt="two people in a park", concepts=[
    Concept(lora="alice.safetensors", prompt="a photo of alice", box=[0.0, 0.1, 0.5, 1.0]),
    Concept(lora="bob.safetensors", prompt="a photo of bob", box=[0.5, 0.1, 1.0, 1.0]),
], num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images[0]
```

The pipelines are the diffusers pipelines with three additions to the call: ``concepts=`` (a list of
:class:`~visadapt.diffusion.Concept`), ``composer=`` (a :class:`~visadapt.diffusion.ComposerConfig` switching the
method's parts) and ``decor=``. Every other argument is the base pipeline's. With no concepts the call *is* the base
pipeline's call. With concepts, the denoising loop stays diffusers' own; the method enters through

* attention processors (:class:`~visadapt.diffusion.composer.attention.ComposerAttnProcessor`) installed for the
  call, fed by ``cross_attention_kwargs["composition"]``;
* ``encode_prompt`` (the global prompt, encoded with the concept LoRAs off) and one extra encoding per concept with
  only its LoRA on in the text encoder(s);
* ``prepare_latents`` (latent re-initialisation and the step-0 refinement) and ``callback_on_step_end`` (the
  refinement of the latent for the next step).

Concept LoRAs are loaded once as named peft adapters and never run in the UNet's normal forward: the attention
processors read their K/V/O matrices. The UNet runs once per step for all concepts, plus one conditional pass with
a backward while the latent is refined.
"""

from __future__ import annotations

import inspect
import os
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from visadapt.diffusion.composer.attention import ComposerAttnProcessor, Composition
from visadapt.diffusion.composer.concepts import Concept, check_prompt_length, check_unique_names, token_positions
from visadapt.diffusion.composer.decor import Decor
from visadapt.diffusion.composer.edlora import (
    bind,
    concept_tokens,
    cross_attention_layers,
    layer_wise,
    load_edlora_concept,
)
from visadapt.diffusion.composer.lora_files import (
    TEXT_ENCODERS,
    LoraFileError,
    active_adapters,
    keep_active_adapters,
    load_concept_lora,
    lora_file,
    set_active_adapters,
)
from visadapt.diffusion.composer.refinement import (
    ComposerConfig,
    composer_loss,
    exit_modules,
    loss_downsample_for,
    loss_layers,
    reinit_latents,
    until_loss_layers,
)

from .decor import DecorMixin
from .easyref import EasyRefMixin


@dataclass
class _Run:
    """What one composed call needs between the pipeline's hooks."""

    composition: Composition
    config: ComposerConfig
    positions: list[list[int]]
    call: dict[str, Any]
    prompt_embeds: Optional[torch.Tensor] = None  # conditional global embeddings, as the UNet gets them
    pooled_embeds: Optional[torch.Tensor] = None  # SDXL
    losses: list[float] = field(default_factory=list)  # composition loss at each refined step
    grad_norms: list[float] = field(default_factory=list)  # ‖∇_z L‖ at each refined step
    refining: bool = True
    exits: list[torch.nn.Module] = field(default_factory=list)  # a pass for the losses may stop after these
    cache: dict = field(default_factory=dict)  # the losses' per-call constants (ComposerConfig.reuse_constants)
    prepared: bool = False  # UNet frozen and checkpointing set for the whole call (reuse_constants)


class LoRAComposerMixin(DecorMixin):
    """The composition machinery; mix it in before a diffusers SD or SDXL pipeline class."""

    _run: Optional[_Run] = None
    # After a composed call: the refinement's loss and latent-gradient norm per refined step (diagnostics).
    composition_log: dict[str, list[float]] = {}

    @torch.no_grad()
    def __call__(self, *args, concepts: Optional[Sequence[Concept]] = None,
                 composer: Optional[ComposerConfig] = None, decor: Optional[Decor] = None, **kwargs):
        concepts = list(concepts or [])
        if not concepts:
            return super().__call__(*args, decor=decor, **kwargs)
        check_unique_names(concepts)
        call = self._call_arguments(args, kwargs)
        with ExitStack() as stack:
            stack.enter_context(self.decor_active(decor))
            run = stack.enter_context(self._composing(concepts, composer or ComposerConfig(), call))
            kwargs["cross_attention_kwargs"] = {**(kwargs.get("cross_attention_kwargs") or {}),
                                                "composition": run.composition}
            kwargs["callback_on_step_end"], kwargs["callback_on_step_end_tensor_inputs"] = self._step_callback(
                kwargs.get("callback_on_step_end"), kwargs.get("callback_on_step_end_tensor_inputs"))
            return super(DecorMixin, self).__call__(*args, **kwargs)

    # -- loading -----------------------------------------------------------------------------------------------

    def load_concepts(self, concepts: Sequence[Concept]) -> list[str]:
        """Load each concept's LoRA file as a named adapter (once per file version); return the adapter names."""
        loaded = self.__dict__.setdefault("_concept_files", {})  # adapter name → (path, mtime, size)
        known = {name for names in self.get_list_adapters().values() for name in names}
        names = []
        for concept in concepts:
            name = concept.adapter_name
            if concept.is_file:
                path = Path(concept.lora).resolve()
                stamp = (str(path), *_file_stamp(path))
                if loaded.get(name) != stamp:
                    if name in known and name not in loaded:
                        raise ValueError(f"Concept {concept.label}: the adapter name {name!r} is taken by an adapter "
                                         "loaded earlier; pass another `name=`.")
                    if name in known:  # our own adapter, from a file that changed since
                        self.delete_adapters(name)
                    file = lora_file(path)
                    if file.suffix == ".pth":  # a Mix-of-Show ED-LoRA, read with weights_only=True
                        load_edlora_concept(self, file, name)
                    else:
                        load_concept_lora(self, file, name)
                    loaded[name] = stamp
            elif name not in known:
                raise ValueError(f"Concept {concept.label}: {str(concept.lora)!r} is neither a LoRA file nor an "
                                 f"adapter loaded in this pipeline (loaded: {sorted(known) or 'none'}).")
            names.append(name)
        return names

    # -- one composed call ---------------------------------------------------------------------------------------

    def _call_arguments(self, args, kwargs) -> dict[str, Any]:
        """The diffusers pipeline's call arguments (mixins' own arguments, such as ``reference_images``, left out)."""
        base = next(c for c in type(self).__mro__ if c.__module__.startswith("diffusers."))
        signature = inspect.signature(base.__call__)
        known = {k: v for k, v in kwargs.items() if k in signature.parameters}
        bound = signature.bind_partial(self, *args, **known)
        bound.apply_defaults()
        return {k: v for k, v in bound.arguments.items() if k != "self"}

    @contextmanager
    def _composing(self, concepts: list[Concept], config: ComposerConfig, call: dict) -> Iterator[_Run]:
        names = self.load_concepts(concepts)
        tokenizer = self.tokenizer or getattr(self, "tokenizer_2", None)
        bound = [bind(c.prompt, concept_tokens(self, n), 0) for c, n in zip(concepts, names)]
        for concept, prompt in zip(concepts, bound):
            check_prompt_length(tokenizer, prompt, concept.label)
        positions = [token_positions(tokenizer, prompt, _loss_words(c, concept_tokens(self, n)))
                     for c, n, prompt in zip(concepts, names, bound)]
        with keep_active_adapters(self) as saved:
            user = {part: [n for n in active if n not in names] for part, active in saved.items()}
            for part, active in user.items():
                set_active_adapters(getattr(self, part, None), active)
            in_concepts = user if config.user_adapters_in_concepts else {part: [] for part in user}
            cond, uncond = self._encode_regions(concepts, names, call, in_concepts)
            layers = cross_attention_layers(self.unet)
            composition = Composition(
                adapter_names=names, weights=[c.weight for c in concepts], boxes=[c.box for c in concepts],
                text_cond=cond, text_uncond=uncond, inject=config.region_injection,
                isolate=config.concept_isolation, isolation_bias=config.isolation_bias,
                user_adapters_in_concepts=config.user_adapters_in_concepts,
                cross_layers={name: i for i, name in enumerate(layers)} if cond.ndim == 4 else None,
                loss_downsample=loss_downsample_for(self.unet, config.loss_downsample),
                cache_text_kv=config.reuse_constants)
            run = _Run(composition, config, positions, call, refining=config.latent_optimization,
                       exits=exit_modules(self.unet, loss_layers(self.unet, composition.loss_downsample)))
            saved_processors = self.unet.attn_processors
            self.unet.set_attn_processor({name: ComposerAttnProcessor(name, processor)
                                          for name, processor in saved_processors.items()})
            self._run = run
            try:
                with ExitStack() as stack:
                    if config.latent_optimization and config.reuse_constants:  # once per call, not per step
                        stack.enter_context(_frozen(self.unet))
                        stack.enter_context(_checkpointing(self.unet, config.gradient_checkpointing))
                        run.prepared = True
                    yield run
            finally:
                self._run = None
                self.composition_log = {"losses": run.losses, "grad_norms": run.grad_norms}
                self.unet.set_attn_processor(saved_processors)

    def _encode_regions(self, concepts, names, call, user) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(n, L, D) conditional and negative regional encodings, each with only its concept's LoRA on.

        When a prompt uses ED-LoRA layer-wise tokens: (n, X, L, D), one encoding per cross-attention layer (the
        prompt with its tokens bound to that layer's embeddings); other concepts repeat theirs X times.
        """
        negative = call.get("negative_prompt")
        negative = negative[0] if isinstance(negative, (list, tuple)) else negative
        do_cfg = call["guidance_scale"] > 1 and self.unet.config.time_cond_proj_dim is None
        n_layers = len(cross_attention_layers(self.unet))
        conds, unconds = [], []
        for concept, name in zip(concepts, names):
            tokens = concept_tokens(self, name)
            per_layer = layer_wise(tokens, concept.prompt)
            prompts = [bind(concept.prompt, tokens, i) for i in range(n_layers if per_layer else 1)]
            region_negative = concept.negative_prompt if concept.negative_prompt is not None else negative
            with _only_adapter(self, name, concept.weight, user):
                out = super(LoRAComposerMixin, self).encode_prompt(
                    prompt=prompts, device=self._execution_device, num_images_per_prompt=1,
                    do_classifier_free_guidance=do_cfg, clip_skip=call.get("clip_skip"),
                    negative_prompt=None if region_negative is None else [region_negative] * len(prompts))
            conds.append(out[0] if per_layer else out[0][0])
            if do_cfg:
                unconds.append(out[1] if per_layer else out[1][0])
        return _stack_regions(conds, n_layers), (_stack_regions(unconds, n_layers) if do_cfg else None)

    # -- pipeline hooks ----------------------------------------------------------------------------------------

    def encode_prompt(self, *args, **kwargs):
        out = super().encode_prompt(*args, **kwargs)
        if self._run is not None:
            self._run.prompt_embeds = out[0]
            self._run.pooled_embeds = out[2] if len(out) > 2 else None
        return out

    def prepare_latents(self, *args, **kwargs):
        latents = super().prepare_latents(*args, **kwargs)
        run = self._run
        if run is None:
            return latents
        run.composition.latent_size = tuple(latents.shape[-2:])
        run.composition.prompt_batch = latents.shape[0]
        if run.config.latent_reinit:
            latents = self._reinit(latents)
        return self._refine(latents, 0)

    def _step_callback(self, user_callback: Optional[Callable], user_inputs: Optional[list[str]]):
        """Our callback (refine the latent for the next step), then the user's, as diffusers calls one."""
        inputs = list(getattr(user_callback, "tensor_inputs", None) or user_inputs or ["latents"])
        if "latents" not in inputs:
            inputs.append("latents")

        def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            if step + 1 < len(pipe.scheduler.timesteps):
                callback_kwargs["latents"] = pipe._refine(callback_kwargs["latents"], step + 1)
            if user_callback is not None:
                callback_kwargs = user_callback(pipe, step, timestep, callback_kwargs)
            return callback_kwargs

        return on_step_end, inputs

    # -- the method ---------------------------------------------------------------------------------------------

    def _conditional_pass(self, latents: torch.Tensor, step: int) -> None:
        """One conditional UNet pass; inside :meth:`_capturing` it stores the maps the losses and re-init read."""
        t = self.scheduler.timesteps[step]
        self.unet(self.scheduler.scale_model_input(latents, t), t, encoder_hidden_states=self._run.prompt_embeds,
                  cross_attention_kwargs={"composition": self._run.composition}, return_dict=False,
                  **self._extra_unet_inputs(latents.shape[0]))

    @contextmanager
    def _capturing(self) -> Iterator[Composition]:
        """Capture maps for the duration (the backward pass included: checkpointing re-runs the forward)."""
        composition = self._run.composition
        composition.capture = True
        try:
            yield composition
        finally:
            composition.capture = False
            composition.cross_maps.clear()
            composition.self_maps.clear()

    def _reinit(self, latents: torch.Tensor) -> torch.Tensor:
        run = self._run
        with self._capturing() as composition:
            with until_loss_layers(run.exits, run.config.refine_early_exit):
                self._conditional_pass(latents, 0)
            return reinit_latents(latents, composition, run.positions)

    def _refine(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """One gradient step on the latent against the composition losses, while refinement is on."""
        run, config = self._run, self._run.config
        if not run.refining or step > config.max_refine_step:
            return latents
        n_steps = len(self.scheduler.timesteps)
        z = latents.detach().requires_grad_(True)
        precision = (torch.autocast(z.device.type, dtype=torch.bfloat16) if config.refine_autocast == "bf16"
                     else nullcontext())
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            if not run.prepared:
                stack.enter_context(_frozen(self.unet))
                stack.enter_context(_checkpointing(self.unet, config.gradient_checkpointing))
            composition = stack.enter_context(self._capturing())
            with precision, until_loss_layers(run.exits, config.refine_early_exit):
                self._conditional_pass(z, step)
            if config.refine_autocast is not None:  # the losses in float32 from the lower-precision maps
                for maps in (composition.cross_maps, composition.self_maps):
                    maps.update({name: m.float() for name, m in maps.items()})
            loss = composer_loss(composition, run.positions, config, run.cache if config.reuse_constants else None)
            (grad,) = torch.autograd.grad(loss, z)
        value = float(loss)
        if step >= config.early_stop_from and run.losses and value > run.losses[-1]:
            run.refining = False  # this step's update still applies, as in the official code
        run.losses.append(value)
        run.grad_norms.append(float(grad.norm()))
        return (latents - config.step_sizes(n_steps)[step] * grad).to(latents.dtype)

    def _extra_unet_inputs(self, batch: int) -> dict:
        return {}


class LoRAComposerPipeline(LoRAComposerMixin, StableDiffusionPipeline):
    """LoRA-Composer on a Stable Diffusion 1.x/2.x pipeline (``from_pretrained`` / ``from_pipe`` as diffusers)."""


class LoRAComposerXLPipeline(LoRAComposerMixin, EasyRefMixin, StableDiffusionXLPipeline):
    """LoRA-Composer on a Stable Diffusion XL pipeline. Regional prompts go through both text encoders.

    With EasyRef loaded (``pipe.load_easyref(...)``), ``reference_images=`` and ``scale=`` work as in
    :class:`~visadapt.pipelines.EasyRefPipeline`: the references condition the global path, the concept LoRAs
    their boxes.
    """

    def __call__(self, *args, **kwargs):
        """LoRA-Composer's call. With EasyRef loaded its sampling defaults are filled in first (30 steps, the
        released negative prompt), so the concepts' regional negatives read the same negative prompt as the rest."""
        if self.easyref_encoder is not None:
            kwargs = self.with_easyref_defaults(args, kwargs)
        return super().__call__(*args, **kwargs)

    def _extra_unet_inputs(self, batch: int) -> dict:
        """SDXL's added conditions for the conditional refinement pass, built as the pipeline builds them."""
        call, run = self._run.call, self._run
        height, width = (s * self.vae_scale_factor for s in run.composition.latent_size)
        projection = (int(run.pooled_embeds.shape[-1]) if self.text_encoder_2 is None
                      else self.text_encoder_2.config.projection_dim)
        time_ids = self._get_add_time_ids(call.get("original_size") or (height, width),
                                          call.get("crops_coords_top_left") or (0, 0),
                                          call.get("target_size") or (height, width),
                                          dtype=run.prompt_embeds.dtype, text_encoder_projection_dim=projection)
        return {"added_cond_kwargs": {"text_embeds": run.pooled_embeds,
                                      "time_ids": time_ids.to(run.pooled_embeds.device).repeat(batch, 1),
                                      **self.easyref_unet_inputs(batch)}}


def _loss_words(concept: Concept, tokens: dict[str, list[str]]) -> Optional[list[str]]:
    """The words whose attention the losses pull into the box, in the layer-0 bound prompt: ``concept.tokens``,
    else an ED-LoRA concept's new tokens in its prompt (the official choice), else None (the content words)."""
    if concept.tokens is not None:
        return [bind(word, tokens, 0) for word in concept.tokens]
    present = sorted((t for t in tokens if t in concept.prompt), key=concept.prompt.index)
    return [bind(t, tokens, 0) for t in present] or None


def _stack_regions(encodings: list[torch.Tensor], n_layers: int) -> torch.Tensor:
    """(n, L, D), or (n, X, L, D) when some encoding is layer-wise (X, L, D)."""
    if all(e.ndim == 2 for e in encodings):
        return torch.stack(encodings)
    return torch.stack([e if e.ndim == 3 else e.expand(n_layers, -1, -1) for e in encodings])


def _file_stamp(path: Path) -> tuple[float, int]:
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}.")
    stat = os.stat(path)
    return stat.st_mtime, stat.st_size


@contextmanager
def _only_adapter(pipe, name: str, weight: float, user: dict[str, list[str]]) -> Iterator[None]:
    """Text encoder(s) run ``user`` (the adapters kept in concepts) plus ``name`` at ``weight`` × its loaded scale;
    on exit they run what they ran before."""
    from peft.tuners.lora import LoraLayer

    encoders = {part: getattr(pipe, part) for part in TEXT_ENCODERS if getattr(pipe, part, None) is not None}
    before = {part: active_adapters(encoder) for part, encoder in encoders.items()}
    restore = []
    for part, encoder in encoders.items():
        layers = [m for m in encoder.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
        for layer in layers:
            restore.append((layer, layer.scaling[name]))
            layer.scaling[name] *= weight
        set_active_adapters(encoder, user[part] + ([name] if layers else []))
    try:
        yield
    finally:
        for layer, scaling in restore:
            layer.scaling[name] = scaling
        for part, encoder in encoders.items():
            set_active_adapters(encoder, before[part])


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients during the latent's backward pass (they would only cost memory)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _checkpointing(unet, enabled: bool) -> Iterator[None]:
    switch = enabled and not unet.is_gradient_checkpointing
    if switch:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if switch:
            unet.disable_gradient_checkpointing()
