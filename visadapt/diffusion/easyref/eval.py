"""EasyRef evaluation (``visadapt easyref eval``): the MRBench protocol on a folder of image groups.

For every group with two images or more, the last image (by name) is held back as the target; the group's other
images are the references and the target's first caption is the prompt. The pipeline generates
``images_per_group`` images, and each is scored against the target and the prompt:

- **CLIP-I**: cosine similarity of the open_clip image embeddings of the generated image and the target;
- **CLIP-T**: cosine similarity of the generated image's open_clip embedding and the prompt's text embedding (the
  raw cosine, not CLIPScore's 2.5·max(cos, 0));
- **DINO-I**: cosine similarity of the timm DINOv2 class-token features of the generated image and the target.

The metric functions take the models (and their transforms) as arguments; :func:`load_clip` / :func:`load_dino`
build the defaults (open_clip ``ViT-L-14`` / ``openai``, timm ``vit_base_patch14_dinov2.lvd142m``: downloads, or the
Hugging Face cache offline), local ones (``--clip-pretrained FILE``, ``--clip-model local-dir:FOLDER``,
``--dino-model local-dir:FOLDER``) or the demo models shipped with visadapt (``--clip-model visadapt-demo-clip
--dino-model visadapt-demo-vit``: offline, tiny, trained on synthetic shapes; their scores only compare runs scored
the same way, never MRBench numbers). The run writes
``results.json`` (per group and the means) and ``grid.png`` (per row: up to four references, the target, the
generated images).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from visadapt.utils import atomic_path, save_json_atomic
from visadapt.utils.cli import check_ranges

from .config import EasyRefEvalConfig
from .data import holdout_split, open_image, scan_groups

__all__ = ["clip_image_scores", "clip_text_scores", "dino_scores", "load_clip", "load_dino", "evaluate_easyref",
           "result_grid", "MetricWeightsError", "DEMO_CLIP", "DEMO_DINO"]

Images = Sequence[Any]  # PIL images


def _batch(transform: Callable, images: Images, device: torch.device) -> torch.Tensor:
    return torch.stack([transform(image.convert("RGB")) for image in images]).to(device)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def clip_image_scores(model, preprocess: Callable, generated: Images, targets: Images) -> torch.Tensor:
    """(N,) cosine similarities of open_clip image embeddings, generated[i] vs targets[i]."""
    if len(generated) != len(targets):
        raise ValueError(f"{len(generated)} generated images for {len(targets)} targets; pass one target per image.")
    device = _device(model)
    a = model.encode_image(_batch(preprocess, generated, device)).float()
    b = model.encode_image(_batch(preprocess, targets, device)).float()
    return F.cosine_similarity(a, b, dim=-1).cpu()


@torch.no_grad()
def clip_text_scores(model, preprocess: Callable, tokenizer: Callable, images: Images,
                     prompts: Sequence[str]) -> torch.Tensor:
    """(N,) cosine similarities of the open_clip embeddings of images[i] and prompts[i]."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts; pass one prompt per image.")
    device = _device(model)
    a = model.encode_image(_batch(preprocess, images, device)).float()
    b = model.encode_text(tokenizer(list(prompts)).to(device)).float()
    return F.cosine_similarity(a, b, dim=-1).cpu()


@torch.no_grad()
def dino_scores(model, transform: Callable, generated: Images, targets: Images) -> torch.Tensor:
    """(N,) cosine similarities of DINO features (a timm model built with ``num_classes=0``: its output is the
    pooled class token), generated[i] vs targets[i]."""
    if len(generated) != len(targets):
        raise ValueError(f"{len(generated)} generated images for {len(targets)} targets; pass one target per image.")
    device = _device(model)
    a = model(_batch(transform, generated, device)).float()
    b = model(_batch(transform, targets, device)).float()
    return F.cosine_similarity(a, b, dim=-1).cpu()


DEMO_CLIP = "visadapt-demo-clip"  # visadapt/utils/worlds/demo_clip: a tiny CLIP trained on the shapes world
DEMO_DINO = "visadapt-demo-vit"  # visadapt/utils/worlds/demo_vit: a tiny DINOv2-layout ViT (the tracking backbone)
OFFLINE_METRICS = f"--clip-model {DEMO_CLIP} --dino-model {DEMO_DINO}"


class MetricWeightsError(ValueError):
    """A metric model's weights could not be loaded (offline and not cached, or a wrong name); the message says which
    weights, how to pass local ones and the offline choice."""


def _weights_error(what: str, weights: str, local: str, err: BaseException) -> MetricWeightsError:
    first = (str(err).splitlines()[0] if str(err) else type(err).__name__).split(". ")[0]
    return MetricWeightsError(f"{what} need {weights}, which could not be loaded ({first}); download them once "
                              f"with a network (HF_HUB_OFFLINE unset), pass local ones ({local}), or score offline "
                              f"with the shipped demo models: {OFFLINE_METRICS} (not comparable with MRBench).")


def load_clip(name: str = "ViT-L-14", pretrained: str = "openai", device: Union[str, torch.device] = "cpu"):
    """(model, preprocess, tokenizer) of an open_clip model, in eval mode: an architecture with a weights tag
    (``ViT-L-14`` / ``openai``) or a local checkpoint file as ``pretrained``, ``local-dir:FOLDER`` / ``hf-hub:ORG/REPO``
    (the model carries its weights), or :data:`DEMO_CLIP` (shipped, offline). OpenAI's weights get the QuickGELU they
    were trained with. Weights that cannot be loaded raise :class:`MetricWeightsError` naming the fix."""
    import open_clip

    if name == DEMO_CLIP:
        from visadapt.utils.worlds.models import DEMO_CLIP_DIR

        name = f"local-dir:{DEMO_CLIP_DIR}"
    own = name.startswith(("local-dir:", "hf-hub:"))  # such a model carries its own weights
    tag = None if own else pretrained or None
    quick_gelu = bool(tag and not Path(tag).suffix
                      and open_clip.pretrained.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    try:
        with _quiet_root_logger():  # open_clip logs a failed download on the root logger before raising it
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device=device,
                                                                         weights_only=True,
                                                                         force_quick_gelu=quick_gelu)
    except (RuntimeError, OSError) as err:  # hub downloads, cache misses, missing files
        raise _weights_error("CLIP-I and CLIP-T", f"open_clip {name} weights {tag!r}" if tag else f"open_clip {name}",
                             "--clip-pretrained FILE, or --clip-model local-dir:FOLDER", err) from err
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def load_dino(name: str = "vit_base_patch14_dinov2.lvd142m", device: Union[str, torch.device] = "cpu"):
    """(model, transform) of a timm DINO(v2) model that outputs its class token: a pretrained timm name,
    ``local-dir:FOLDER`` / ``hf-hub:ORG/REPO`` (timm's layout: config.json and model.safetensors), or
    :data:`DEMO_DINO` (shipped, offline). Weights that cannot be loaded raise :class:`MetricWeightsError`."""
    import timm

    if name == DEMO_DINO:
        from visadapt.utils.worlds.models import demo_vit_config, load_demo_vit

        model = load_demo_vit().to(device).eval()
        size = demo_vit_config()["vit_kwargs"]["img_size"]
        config = {**timm.data.resolve_model_data_config(model), "input_size": (3, size, size)}
    else:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0).to(device).eval()
        except (RuntimeError, OSError) as err:
            raise _weights_error("DINO-I", f"timm {name} weights", "--dino-model local-dir:FOLDER", err) from err
        config = timm.data.resolve_model_data_config(model)
    return model, timm.data.create_transform(**config, is_training=False)


@contextmanager
def _quiet_root_logger():
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


# ----------------------------------------------------------------------------------------------- the command
def result_grid(rows: Sequence[tuple[Images, Any, Images]], cell: int = 128, max_refs: int = 4):
    """One PIL image: per row, up to ``max_refs`` references, a gap, the target, a gap, the generated images."""
    from PIL import Image

    width = max(min(len(r), max_refs) + 1 + len(g) for r, _, g in rows) + 2
    grid = Image.new("RGB", (width * cell, len(rows) * cell), "white")
    for y, (refs, target, generated) in enumerate(rows):
        cells = [*list(refs)[:max_refs], None, target, None, *generated]
        for x, image in enumerate(cells):
            if image is not None:
                thumb = image.convert("RGB").copy()
                thumb.thumbnail((cell, cell))
                grid.paste(thumb, (x * cell + (cell - thumb.width) // 2, y * cell + (cell - thumb.height) // 2))
    return grid


def _mean(values: Sequence[float]) -> Optional[float]:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def evaluate_easyref(config: EasyRefEvalConfig, out_dir: Union[str, Path], pipe=None, clip=None,
                     dino=None) -> dict:
    """Generate for every held-back target of ``config.data`` and score it; writes ``results.json`` and
    ``grid.png`` into ``out_dir``. ``pipe`` (an EasyRef pipeline, called with ``reference_images=`` and ``scale=``),
    ``clip`` ((model, preprocess, tokenizer)) and ``dino`` ((model, transform)) replace the ones the config names."""
    from tqdm.auto import tqdm

    c = config
    check_ranges(c)  # sampling numbers that would score noise or black images (steps 0, scale nan), before loading
    if not c.data:
        raise ValueError("Pass --data: the folder of image groups to evaluate on.")
    _, targets = holdout_split(scan_groups(c.data))
    if not targets:
        raise ValueError(f"--data {c.data}: no group holds two images; evaluation needs references and a target.")
    targets = targets[:c.max_groups] if c.max_groups else targets
    # the metric models first: weights missing offline stop the command before the pipeline loads
    loaded = []
    if clip is None:
        clip = load_clip(c.clip_model, c.clip_pretrained, "cpu")
        loaded.append(clip[0])
    if dino is None:
        dino = load_dino(c.dino_model, "cpu")
        loaded.append(dino[0])
    sampler = EasyRefSampler.from_config(c) if pipe is None else pipe
    device = getattr(sampler, "device", torch.device("cpu"))
    for model in loaded:
        model.to(device)
    per_group, rows = [], []
    for group, index in tqdm(targets, desc="eval", unit="group"):
        refs = [open_image(p) for i, p in enumerate(group.images) if i != index]
        target, prompt = open_image(group.images[index]), group.captions[index][0]
        generated = [generate(sampler, c, refs, prompt, c.seed + k) for k in range(c.images_per_group)]
        n = len(generated)
        scores = {"clip_i": clip_image_scores(clip[0], clip[1], generated, [target] * n).mean().item(),
                  "clip_t": clip_text_scores(*clip, generated, [prompt] * n).mean().item(),
                  "dino_i": dino_scores(dino[0], dino[1], generated, [target] * n).mean().item()}
        per_group.append({"group": group.name, "target": group.images[index].name, "prompt": prompt,
                          "references": len(refs), **scores})
        rows.append((refs, target, generated))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"metrics": {k: _mean([g[k] for g in per_group]) for k in ("clip_i", "clip_t", "dino_i")},
               "groups": per_group, "config": c.to_json(), "grid": "grid.png"}
    with atomic_path(out / "grid.png") as tmp:
        result_grid(rows).save(tmp, format="PNG")
    save_json_atomic(results, out / "results.json")
    return results


class EasyRefSampler:
    """Diffusers' stock SDXL pipeline with EasyRef installed in its UNet and the encoder beside it: the tokens enter
    as IP-Adapter embeddings, the conditional ones (references + caption) beside the prompt and the unconditional
    ones (one black 512² image, empty text) beside the negative prompt, as EasyRef samples. Called like an EasyRef
    pipeline: ``sampler(prompt=..., reference_images=[...], scale=..., **sdxl_kwargs)``."""

    def __init__(self, pipe, encoder: torch.nn.Module) -> None:
        self.pipe, self.encoder = pipe, encoder

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @classmethod
    def from_config(cls, c: EasyRefEvalConfig) -> "EasyRefSampler":
        from visadapt.training import mixed_precision

        from ..train_common import HALF_DTYPES
        from .encoder import EasyRefEncoder
        from .files import checkpoint_sizes, load_easyref_state, read_easyref_file
        from .train import adapter_file, load_mllm, load_sdxl
        from .unet import install_easyref

        if not c.adapter:
            raise ValueError("Pass --adapter: the training run folder (or adapter file) to evaluate.")
        state = read_easyref_file(adapter_file(c.adapter))
        sizes = checkpoint_sizes(state)
        pipe = load_sdxl(c.model)
        model, processor = load_mllm(c.mllm)
        encoder = EasyRefEncoder(model, processor, pipe.unet.config.cross_attention_dim, sizes["num_tokens"])
        install_easyref(pipe.unet, num_tokens=sizes["num_tokens"], r=sizes["r"])
        load_easyref_state(pipe.unet, encoder, state)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = HALF_DTYPES.get(mixed_precision(c.precision), torch.float32)
        pipe.to(device)
        encoder.place(device).eval()  # bf16 or fp32 whatever the precision: Qwen2-VL breaks in fp16
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        return cls(pipe, encoder)

    @torch.no_grad()
    def __call__(self, prompt: str, reference_images: Images, scale: float = 1.0, **kwargs):
        from .data import black_image
        from .unet import set_easyref_scale

        cond = self.encoder.encode([list(reference_images)], [prompt])
        uncond = self.encoder.encode([[black_image()]], [""])
        embeds = torch.cat([uncond, cond]).to(self.pipe.unet.device, self.pipe.unet.dtype)
        set_easyref_scale(self.pipe.unet, scale)
        return self.pipe(prompt=prompt, ip_adapter_image_embeds=[embeds[:, None]], **kwargs)


def generate(pipe, config: EasyRefEvalConfig, references: Images, prompt: str, seed: int):
    """One image of ``prompt`` conditioned on ``references`` (seeded), from an EasyRef pipeline or sampler."""
    kwargs: dict[str, Any] = {}
    if config.size:
        kwargs.update(height=config.size, width=config.size)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt=prompt, reference_images=list(references), negative_prompt=config.negative_prompt,
                num_inference_steps=config.steps, guidance_scale=config.guidance_scale, scale=config.scale,
                generator=generator, **kwargs).images[0]


def format_results(results: dict) -> str:
    m = results["metrics"]
    return json.dumps({k: (round(v, 4) if v is not None else None) for k, v in m.items()})
