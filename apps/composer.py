"""Compose several concept LoRAs in the browser: a Gradio app over :class:`~visadapt.pipelines.LoRAComposerPipeline`.

```bash
visadapt app                                     # embedded world model: offline, draws the shapes world
visadapt app --model stable-diffusion-v1-5/stable-diffusion-v1-5   # or an SDXL id, or a local diffusers folder
python -m visadapt.apps.composer --port 7861
```

Each concept is a LoRA file (``.safetensors``, or a Mix-of-Show ED-LoRA ``.pth``), a name, a regional prompt, focus
words (:attr:`~visadapt.diffusion.Concept.tokens`; empty: the prompt's content words), a box ``[xmin, ymin, xmax,
ymax]`` in [0, 1] and a weight. The numeric box fields are the source of truth; clicking two corners on the box
preview fills them. One plain function, :func:`generate`, does the work; the page's Generate button and the Gradio
API (``api_name="generate"``, named parameters such as ``lora_1``, ``prompt_1``, ``tokens_1``, ``xmin_1``) both call
it:

```python
from gradio_client import Client, handle_file
client = Client("http://127.0.0.1:7860/")
gallery, png, settings = client.predict(prompt="a cat and a dog", n_concepts=2,
    lora_1=handle_file("cat.safetensors"), prompt_1="a photo of a cat", xmin_1=0, ymin_1=0, xmax_1=0.5, ymax_1=1,
    lora_2=handle_file("dog.safetensors"), prompt_2="a photo of a dog", xmin_2=0.5, ymin_2=0, xmax_2=1, ymax_2=1,
    api_name="/generate")
```

Gradio is imported only when an app is built, so ``visadapt --version`` does not pay for it.
"""

import argparse
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence

from visadapt.utils.cli import POSITIVE, ArgumentParser, Range, ranged

if TYPE_CHECKING:
    import gradio as gr

MAX_CONCEPTS = 4
DEFAULT_MAX_LORA_MB = 1024.0
PORT = Range(1, 65535)  #: a TCP port (leave --port out for the first free one)
LORA_SUFFIXES = (".safetensors", ".pth")  # .pth: Mix-of-Show ED-LoRA, loaded with torch.load(weights_only=True)
PREVIEW_SIDE = 256  # the box preview's longer side in pixels
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231"]
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Every per-concept field, as the API names it with the slot number appended (lora_1, prompt_1, …).
SLOT_FIELDS = ("lora", "name", "prompt", "tokens", "xmin", "ymin", "xmax", "ymax", "weight")
# A newcomer's first composition: two concepts side by side (focus words empty: the prompt's content words, "cat").
DEMO_CONCEPTS = [
    dict(name="cat", prompt="a photo of a cat", tokens="", box=(0.0, 0.0, 0.5, 1.0), weight=1.0),
    dict(name="dog", prompt="a photo of a dog", tokens="", box=(0.5, 0.0, 1.0, 1.0), weight=1.0)]
DEMO_PROMPT = "a cat and a dog in a park"
# On the embedded world model the demo concepts are two held-out shapes, trained for real (side by side squares).
WORLD_DEMO_BOXES = [(0.0, 0.25, 0.5, 0.75), (0.5, 0.25, 1.0, 0.75)]

log = logging.getLogger(__name__)


# -- the pipeline ----------------------------------------------------------------------------------------------

def load_pipeline(model: Optional[str] = None, device: Optional[str] = None):
    """A LoRA-Composer pipeline: ``model`` is a hub id or a local diffusers folder (SD or SDXL); None → the
    embedded world model (:mod:`visadapt.utils.worlds.models`).

    The class follows the checkpoint's ``model_index.json`` (``StableDiffusionXLPipeline`` → the XL composer).
    A folder is loaded with ``local_files_only``. float16 on CUDA, float32 on the CPU.
    """
    import torch

    from visadapt.pipelines import LoRAComposerPipeline, LoRAComposerXLPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        from visadapt.utils.worlds.models import load_world_model

        return load_world_model(pipeline_class=LoRAComposerPipeline, device=device)
    from diffusers import DiffusionPipeline

    local = Path(model).is_dir()
    if not local and (Path(model).exists() or model.startswith((".", "/", "~"))):
        raise ValueError(f"--model {model}: not a folder; give a diffusers model folder or a hub id.")
    config = DiffusionPipeline.load_config(model, local_files_only=True) if local else _hub_config(model)
    cls = LoRAComposerXLPipeline if "XL" in config.get("_class_name", "") else LoRAComposerPipeline
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    kwargs = dict(safety_checker=None, requires_safety_checker=False) if cls is LoRAComposerPipeline else {}
    pipe = cls.from_pretrained(model, dtype=dtype, local_files_only=local, **kwargs)
    return pipe.to(device)


def _hub_config(model: str) -> dict:
    """``model_index.json`` of a hub model: from the local cache, else downloaded; a clear error when neither works."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    try:
        return DiffusionPipeline.load_config(model, local_files_only=True)
    except OSError:
        pass
    reason = "the hub is switched off (HF_HUB_OFFLINE)"
    if not constants.HF_HUB_OFFLINE:
        try:
            return DiffusionPipeline.load_config(model)
        except OSError as err:
            reason = f"downloading failed: {str(err).splitlines()[0]}"
    raise ValueError(f"--model {model}: this hub model is not in the local Hugging Face cache "
                     f"({constants.HF_HUB_CACHE}) and {reason}. Without internet, pass a local diffusers folder "
                     "instead: --model /path/to/folder (the folder holding model_index.json, e.g. made on a connected "
                     f"machine with `hf download {model} --local-dir folder`).")


def size_multiple(pipe) -> int:
    """Image sizes must be multiples of this: the VAE factor times the UNet's downsampling (at least 16)."""
    return max(16, pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1))


def default_size(pipe) -> int:
    return max(64, pipe.unet.config.sample_size * pipe.vae_scale_factor)


# -- checks and the one generate function ---------------------------------------------------------------------

def _number(label: str, value: Any) -> float:
    """``value`` as a finite float; NaN, infinity or a non-number (the API takes any JSON) raise a ValueError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{label} must be a finite number, got {value!r}.")
    return number


def check_lora_file(path: Optional[str], slot: int, max_bytes: int) -> Path:
    """An uploaded LoRA must exist, be ``.safetensors`` (or an ED-LoRA ``.pth``, read with ``weights_only=True``) and
    fit the size limit (its content is checked on load)."""
    from visadapt.diffusion import LoraFileError

    if not path:
        raise LoraFileError(f"Concept {slot}: no LoRA file; upload a .safetensors LoRA or remove the concept.")
    path = Path(path)
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise LoraFileError(f"Concept {slot}: {path.name} is not a .safetensors file or an ED-LoRA .pth; only those "
                            "are loaded (other pickled files, .ckpt/.pt/.bin, can run code when opened).")
    if not path.is_file():
        raise LoraFileError(f"Concept {slot}: LoRA file not found: {path}.")
    size = path.stat().st_size
    if size > max_bytes:
        raise LoraFileError(f"Concept {slot}: {path.name} is {size / 2**20:.1f} MiB; this app takes LoRA files up to "
                            f"{max_bytes / 2**20:.1f} MiB (start it with a larger --max-lora-mb).")
    return path


def make_concepts(slots: Sequence[dict], max_bytes: int) -> list:
    """:class:`Concept` objects from the UI's slot values (dicts with the :data:`SLOT_FIELDS` keys)."""
    from visadapt.diffusion import Concept

    concepts = []
    for slot, values in enumerate(slots, start=1):
        path = check_lora_file(values.get("lora"), slot, max_bytes)
        name = (values.get("name") or "").strip() or None
        if name is not None and not _NAME.match(name):
            raise ValueError(f"Concept {slot}: name {name!r} may only hold letters, digits, '_' and '-' (it becomes "
                             "the adapter name).")
        box = [values.get(k) for k in ("xmin", "ymin", "xmax", "ymax")]
        if any(v is None for v in box):
            raise ValueError(f"Concept {slot}: the box needs all four numbers xmin, ymin, xmax, ymax in [0, 1].")
        box = [_number(f"Concept {slot}: {k}", v) for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box)]
        weight = _number(f"Concept {slot}: weight", values.get("weight", 1.0))
        concepts.append(Concept(lora=path, prompt=values.get("prompt") or "", box=box, weight=weight,
                                name=name or f"concept{slot}", tokens=focus_words(values.get("tokens"))))
    return concepts


def focus_words(text: Optional[str]) -> Optional[list[str]]:
    """The focus words field ("sks hexagon" or "sks, hexagon") as :attr:`Concept.tokens`; None when empty (the
    regional prompt's content words)."""
    words = re.split(r"[,\s]+", (text or "").strip())
    return [w for w in words if w] or None


def generate(pipe, *, prompt: str, concepts: Sequence[dict] = (), negative_prompt: str = "", seed: int = 0,
             steps: int = 20, guidance: float = 7.5, width: int = 512, height: int = 512,
             decor_words: str = "", decor_strength: float = 0.0, region_injection: bool = True,
             concept_isolation: bool = True, latent_optimization: bool = True, latent_reinit: bool = True,
             loss_downsample: Optional[int] = None, max_lora_bytes: int = int(DEFAULT_MAX_LORA_MB * 2**20),
             progress: Optional[Callable[[int, int], None]] = None, reference_images: Sequence = (),
             reference_scale: float = 1.0) -> tuple[Any, dict]:
    """One composed image and the settings that made it. Bad input raises ValueError (LoraFileError included).

    ``concepts``: dicts with the :data:`SLOT_FIELDS` keys (``lora`` a file path). ``decor_words``: comma-separated
    undesired words; DECOR is off when empty or ``decor_strength`` is 0. ``progress(step, total)`` is called after
    every sampling step. ``reference_images``: image paths for EasyRef (SDXL with EasyRef loaded), used at
    ``reference_scale``. With EasyRef loaded an empty ``negative_prompt`` is EasyRef's default one (the settings
    record the text used). ``loss_downsample``: passed as ``ComposerConfig.loss_downsample``, one of
    :func:`loss_downsamplings` (None: :func:`default_loss_downsample`).
    """
    import torch

    from visadapt.diffusion import ComposerConfig, Decor
    from visadapt.version import __version__

    multiple = size_multiple(pipe)
    width, height, steps, seed = (int(_number(label, v)) for label, v in (("Width", width), ("Height", height),
                                                                          ("Steps", steps), ("Seed", seed)))
    guidance, decor_strength = _number("Guidance", guidance), _number("DECOR strength", decor_strength or 0.0)
    reference_scale = _number("Reference scale", reference_scale)
    for label, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            raise ValueError(f"Image {label} {value} must be a positive multiple of {multiple} for this model.")
    if steps < 1:
        raise ValueError(f"Steps must be at least 1, got {steps}.")
    loss_downsample = _loss_downsample(pipe, loss_downsample)
    built = make_concepts(concepts, max_lora_bytes)
    words = [w.strip() for w in (decor_words or "").split(",") if w.strip()]
    decor = Decor(words=words, strength=float(decor_strength)) if words and float(decor_strength) > 0 else None
    config = ComposerConfig(region_injection=bool(region_injection), concept_isolation=bool(concept_isolation),
                            latent_optimization=bool(latent_optimization), latent_reinit=bool(latent_reinit),
                            loss_downsample=loss_downsample)
    _drop_stale_adapters(pipe, {c.adapter_name for c in built})

    def on_step_end(_pipe, step, _timestep, callback_kwargs):
        if progress is not None:
            progress(step + 1, steps)
        return callback_kwargs

    references = _references(pipe, reference_images, reference_scale)
    image = pipe(prompt=prompt or "", negative_prompt=negative_prompt or None, concepts=built, composer=config,
                 decor=decor, num_inference_steps=steps, guidance_scale=float(guidance), height=height, width=width,
                 generator=torch.Generator().manual_seed(seed), callback_on_step_end=on_step_end,
                 **references).images[0]
    settings = {
        "prompt": prompt or "", "negative_prompt": _negative_used(pipe, negative_prompt), "seed": seed, "steps": steps,
        "guidance": float(guidance), "width": width, "height": height,
        "concepts": [{"name": c.adapter_name, "lora": Path(c.lora).name, "prompt": c.prompt,
                      "tokens": list(c.tokens) if c.tokens else None, "box": [round(v, 4) for v in c.box],
                      "weight": c.weight} for c in built],
        "decor": {"words": words, "strength": float(decor_strength)} if decor else None,
        "references": ({"images": [Path(str(p)).name for p in references["reference_images"]],
                        "scale": references["scale"]} if "reference_images" in references else None),
        "composer": {k: getattr(config, k) for k in ("region_injection", "concept_isolation", "latent_optimization",
                                                     "latent_reinit", "loss_downsample")},
        "model": getattr(pipe, "name_or_path", None) or "tiny (random)",
        "pipeline": type(pipe).__name__, "visadapt": __version__,
    }
    return image, settings


def loss_downsamplings(pipe) -> list[int]:
    """The loss-map downsampling factors the app offers: those at which ``pipe``'s UNet has cross-attention (any
    other one would silently run at the coarsest of them)."""
    from visadapt.diffusion.composer.refinement import attention_factors

    return sorted(attention_factors(pipe.unet.config))


def default_loss_downsample(pipe) -> int:
    """1 on the world model, else the official 4 (where the UNet has no attention at 4: its coarsest level, as the
    pipeline falls back).

    The official 4 gives SD-1.5 at 512 px (64×64 latent) 16×16 loss maps; the world model's 16×16 latent gets the same
    grid at 1, where the composer placed the hexagon concept in its box in 36 % of images against 6.5 % at the
    official setting (which runs at 2 there: no attention at 4; docs/benchmarks.md).
    """
    from visadapt.diffusion.composer.refinement import loss_downsample_for

    return 1 if is_world_model(pipe) else loss_downsample_for(pipe.unet, 4)


def _loss_downsample(pipe, value: Optional[float]) -> int:
    """The factor to run: ``value`` if the UNet has attention there, the default when None; else a ValueError."""
    if value is None:
        return default_loss_downsample(pipe)
    factors = loss_downsamplings(pipe)
    value = _number("Loss-map downsampling", value)
    if value not in factors:
        raise ValueError(f"Loss-map downsampling must be one of {', '.join(map(str, factors))} for this model (the "
                         f"levels with cross-attention), got {value:g}.")
    return int(value)


def _references(pipe, images: Optional[Sequence], scale: float) -> dict:
    """The pipeline's EasyRef arguments for uploaded reference images (none: EasyRef off for the call, if loaded)."""
    images = [str(getattr(i, "name", i)) for i in (images or []) if i]
    if not images:
        return {"scale": 0.0} if getattr(pipe, "easyref_encoder", None) is not None else {}
    if getattr(pipe, "easyref_encoder", None) is None:
        raise ValueError("Reference images need EasyRef on an SDXL model: start the app with --model <SDXL> "
                         "--easyref <checkpoint> --mllm Qwen/Qwen2-VL-2B-Instruct, or clear the reference images.")
    return {"reference_images": images, "scale": float(scale)}


def _negative_used(pipe, negative_prompt: Optional[str]) -> str:
    """The negative prompt the pipeline used: the given one, else EasyRef's default when EasyRef is loaded."""
    if negative_prompt or getattr(pipe, "easyref_encoder", None) is None:
        return negative_prompt or ""
    from visadapt.pipelines.easyref import EASYREF_NEGATIVE_PROMPT

    return EASYREF_NEGATIVE_PROMPT


def _drop_stale_adapters(pipe, keep: set[str]) -> None:
    """Unload concept LoRAs of earlier calls that this call does not use, so a long session does not pile them up."""
    loaded = pipe.__dict__.get("_concept_files", {})
    adapters = {name for names in pipe.get_list_adapters().values() for name in names}
    for name in [n for n in loaded if n not in keep]:
        if name in adapters:  # an ED-LoRA file of token embeddings only has no adapter
            pipe.delete_adapters(name)
        del loaded[name]


def caption(settings: dict) -> str:
    """One line under a gallery image: what made it."""
    parts = [f"seed {settings['seed']}", f"{settings['width']}×{settings['height']}", f"{settings['steps']} steps",
             f"cfg {settings['guidance']:g}"]
    parts += [f"{c['name']}@{c['weight']:g} [{', '.join(f'{v:g}' for v in c['box'])}]" for c in settings["concepts"]]
    if settings["decor"]:
        parts.append(f"DECOR {settings['decor']['strength']:g}: {', '.join(settings['decor']['words'])}")
    return " · ".join(parts)


def save_png(image, settings: dict, folder: Path) -> Path:
    """The image as PNG with the settings as JSON in its ``parameters`` text chunk (read back with PIL's .text)."""
    from PIL.PngImagePlugin import PngInfo

    folder.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", json.dumps(settings))
    path = folder / f"composed-seed{settings['seed']}-{uuid.uuid4().hex[:8]}.png"
    image.save(path, format="PNG", pnginfo=info)
    return path


def draw_boxes(width: int, height: int, boxes: Sequence[tuple[str, Sequence[Optional[float]]]]):
    """The canvas (longer side :data:`PREVIEW_SIDE` px) with each named box drawn in its concept's colour."""
    from PIL import Image, ImageDraw

    width, height = max(int(width or 1), 1), max(int(height or 1), 1)
    scale = PREVIEW_SIDE / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    image = Image.new("RGB", (w, h), "#f4f4f4")
    draw = ImageDraw.Draw(image)
    for i in range(1, 4):  # a light grid in quarters helps to read the fractions
        draw.line([(w * i // 4, 0), (w * i // 4, h)], fill="#dddddd")
        draw.line([(0, h * i // 4), (w, h * i // 4)], fill="#dddddd")
    for i, (label, box) in enumerate(boxes):
        if box is None or any(v is None for v in box):
            continue
        x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
        if x1 <= x0 or y1 <= y0:
            continue
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], outline=colour, width=3)
        draw.text((x0 * w + 5, y0 * h + 4), label, fill=colour)
    return image


def is_world_model(pipe) -> bool:
    from visadapt.utils.worlds.models import WORLD_MODEL_DIR

    name = getattr(pipe, "name_or_path", None)
    return bool(name) and Path(name).resolve() == WORLD_MODEL_DIR.resolve()


def demo_concepts(pipe) -> tuple[list[dict], str]:
    """The demo's concepts (name, regional prompt, focus words, box, weight) and global prompt for ``pipe``.

    On the world model every regional prompt is the whole scene ("a sks hexagon and a zwx heart") and the focus words
    are the concept's own: the world model reads "a zwx heart" as a canvas holding one shape, so one-phrase regional
    prompts drew a single object in most images, and both concepts in their boxes far less often
    (docs/benchmarks.md, "scene prompts").
    """
    if not is_world_model(pipe):
        return DEMO_CONCEPTS, DEMO_PROMPT
    from visadapt.diffusion.concept.demo import DEMO_CONCEPTS as WORLD
    from visadapt.diffusion.concept.demo import SCENE_PROMPT

    concepts = [dict(name=c.name, prompt=SCENE_PROMPT, tokens=f"{c.trigger} {c.shape}", box=box, weight=1.0)
                for c, box in zip(WORLD, WORLD_DEMO_BOXES)]
    return concepts, SCENE_PROMPT


def make_demo_loras(pipe, folder: Path, steps: Optional[int] = None, train: bool = False,
                    progress: Optional[Callable[[int, int, int, int], None]] = None) -> list[Path]:
    """Two LoRA files that fit ``pipe``, one per :func:`demo_concepts` entry, in ``folder``.

    On the embedded world model: the demo concepts (two held-out shapes), the files shipped with the world model
    copied into ``folder`` (seconds), or with ``train`` trained there with the concept trainer on canvases rendered
    on the fly (``steps`` each, default :data:`~visadapt.diffusion.concept.demo.DEMO_STEPS`; cached in ``folder``, so a
    second call is instant; ``progress(concept, concepts, step, steps)`` after every step). On any other model: two
    random LoRAs, enough to try the app.
    """
    if is_world_model(pipe):
        from visadapt.diffusion.concept.demo import DEMO_STEPS, demo_lora_files

        if train or steps is not None:
            return demo_lora_files(folder, steps=steps or DEMO_STEPS, progress=progress)
        return [_copy_into(path, folder) for path in demo_lora_files()]
    from visadapt.diffusion.tiny import save_random_lora

    return [save_random_lora(pipe, folder / f"demo_{c['name']}.safetensors", seed=i + 1)
            for i, c in enumerate(DEMO_CONCEPTS)]


def _copy_into(path: Path, folder: Path) -> Path:
    """``path`` copied (atomically) into ``folder``: the page serves files from its output folder only."""
    from visadapt.utils import atomic_path

    target = _ensure(folder) / path.name
    with atomic_path(target) as tmp:
        shutil.copyfile(path, tmp)
    return target


# -- the page --------------------------------------------------------------------------------------------------
# build_app lays the page out by what it shows: on the left the prompts, the concept rows, the settings and Generate;
# on the right the box preview and the results. Then it wires the events, one function per behaviour.

INTRO = ("## Compose concept LoRAs\nUpload one LoRA per concept, give it a regional prompt and a box "
         "(fractions of the image; or click two corners on the preview), then Generate. "
         "No LoRA at hand? **Make two demo LoRAs** fills two concepts.")
BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class ConceptRows:
    """The concept count with its buttons, and one group of fields per concept slot (:data:`MAX_CONCEPTS` of them)."""

    count: "gr.Number"
    add: "gr.Button"
    remove: "gr.Button"
    demo: "gr.Button"
    slots: list[dict[str, Any]]  # each slot's components by :data:`SLOT_FIELDS` key
    groups: list["gr.Group"]
    status: "gr.Markdown"  # what the demo button did; its progress bar shows here

    @property
    def box_fields(self) -> list["gr.Number"]:
        return [slot[k] for slot in self.slots for k in BOX_KEYS]

    @property
    def names(self) -> list["gr.Textbox"]:
        return [slot["name"] for slot in self.slots]

    def api_fields(self) -> dict[str, Any]:
        """Every slot's components by their API names: lora_1, name_1, prompt_1, tokens_1, xmin_1, …, weight_4."""
        return {f"{k}_{i}": slot[k] for i, slot in enumerate(self.slots, start=1) for k in SLOT_FIELDS}


@dataclass
class BoxPreview:
    """The canvas with the concepts' boxes, and which concept's box two clicks on it set."""

    image: "gr.Image"
    target: "gr.Radio"


class Results(NamedTuple):
    """What a generation shows: the gallery of this session's images, the last PNG and its settings."""

    gallery: "gr.Gallery"
    download: "gr.File"
    last_settings: "gr.JSON"


def build_app(pipe, *, max_lora_mb: float = DEFAULT_MAX_LORA_MB, output_dir: Optional[os.PathLike] = None,
              n_visible: int = 2, train_demo_loras: bool = False) -> "gr.Blocks":
    """The Gradio Blocks app for ``pipe`` (a LoRA-Composer pipeline). Launch it with :func:`launch`.
    ``train_demo_loras``: the demo button trains the world model's demo concepts instead of loading the shipped ones.
    """
    import gradio as gr

    output_dir = Path(output_dir) if output_dir else Path(tempfile.gettempdir()) / "visadapt-composer"
    with gr.Blocks(title="visadapt · compose concept LoRAs") as app:
        gr.Markdown(INTRO)
        history = gr.State([])
        corner = gr.State(None)  # first clicked corner on the preview, waiting for the second
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(value="", label="Prompt", placeholder="the whole scene, e.g. " + DEMO_PROMPT)
                negative = gr.Textbox(value="", label="Negative prompt")
                rows = concept_rows(n_visible)
                settings = settings_fields(pipe)
                run = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                preview = box_preview()
                results = results_view()
        redraw_preview_on_change(app, preview, rows, settings)
        set_box_on_two_clicks(preview, corner, rows, settings)
        change_concept_count_on_click(rows)
        fill_demo_concepts_on_click(pipe, rows, prompt, output_dir, train=train_demo_loras)
        # Every input of generate() by its API name: prompt, …, lora_1, name_1, prompt_1, xmin_1, …, weight_4.
        inputs = dict(prompt=prompt, negative_prompt=negative, n_concepts=rows.count, **settings, **rows.api_fields())
        generate_on_click(pipe, run, history, inputs, results, max_bytes=int(max_lora_mb * 2**20),
                          output_dir=output_dir)
    app.queue(max_size=16, default_concurrency_limit=1)
    refuse_bad_requests_in_one_line(app)
    return app


def refuse_bad_requests_in_one_line(app: "gr.Blocks") -> None:
    """Requests Gradio refuses before a handler runs (a server-side path sent as a LoRA "upload", a value a
    component cannot read) reach the caller as a ``gr.Error`` with their message and leave one warning line in the
    log. Gradio prints a traceback for every exception but a ``gr.Error(print_exception=False)``, and those refusals
    are raised in its input preprocessing, outside the handlers' own ``try``."""
    import gradio as gr

    preprocess = app.preprocess_data  # the Blocks' bound method; Gradio calls it as self.preprocess_data

    async def preprocess_data(block_fn, *args, **kwargs):
        try:
            return await preprocess(block_fn, *args, **kwargs)
        except gr.Error:
            raise
        except ValueError as err:  # gradio's InvalidPathError, a component's refusal of a value
            log.warning("%s refused: %s", getattr(block_fn, "api_name", None) or "request", err)
            raise gr.Error(str(err), print_exception=False) from None

    app.preprocess_data = preprocess_data


# -- the page's parts, top to bottom ---------------------------------------------------------------------------

def concept_rows(n_visible: int) -> ConceptRows:
    """The concept count with Add, Remove and demo buttons, then one group per slot; the first ``n_visible`` show."""
    import gradio as gr

    with gr.Row():
        count = gr.Number(value=n_visible, precision=0, label="Concepts in use", interactive=False, minimum=0,
                          maximum=MAX_CONCEPTS)
        add = gr.Button("Add concept")
        remove = gr.Button("Remove last concept")
        demo = gr.Button("Make two demo LoRAs")
    # room for the demo button's progress bar (an empty Markdown has no height to show it in)
    status = gr.Markdown("No demo concepts loaded yet.", elem_id="demo-status", min_height=48)
    slots, groups = [], []
    for i in range(1, MAX_CONCEPTS + 1):
        with gr.Group(visible=i <= n_visible) as group:
            slots.append(concept_slot(i))
        groups.append(group)
    return ConceptRows(count, add, remove, demo, slots, groups, status)


def concept_slot(i: int) -> dict[str, Any]:
    """Concept ``i``'s fields by :data:`SLOT_FIELDS` key: LoRA file, name, weight, regional prompt, focus words and
    box."""
    import gradio as gr

    gr.Markdown(f"**Concept {i}** <span style='color:{COLOURS[i - 1]}'>■</span>")
    slot = {"lora": gr.File(label=f"LoRA {i} (.safetensors or ED-LoRA .pth)", file_types=list(LORA_SUFFIXES),
                            type="filepath")}
    with gr.Row():
        slot["name"] = gr.Textbox(value="", label=f"Name {i}", placeholder=f"concept{i}")
        slot["weight"] = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label=f"Weight {i}")
    slot["prompt"] = gr.Textbox(value="", label=f"Regional prompt {i}")
    slot["tokens"] = gr.Textbox(value="", label=f"Focus words {i}",
                                placeholder="words of the regional prompt the composer pulls into the box, e.g. the "
                                            "trigger (default: its content words)")
    with gr.Row():
        for k, v in zip(BOX_KEYS, _default_box(i)):
            slot[k] = gr.Number(value=v, minimum=0, maximum=1, step=0.05, label=f"{k} {i}")
    return slot


def settings_fields(pipe) -> dict[str, Any]:
    """Sampling, DECOR, EasyRef references (SDXL only) and the advanced switches, by generate()'s API names."""
    sampling = sampling_fields(pipe)
    decor = decor_fields()
    references = reference_fields(pipe)
    advanced = advanced_fields(loss_downsamplings(pipe), default_loss_downsample(pipe))
    return {**sampling, **decor, **advanced, **references}  # the API lists the references last


def sampling_fields(pipe) -> dict[str, Any]:
    """Seed, steps, guidance and the image size (in steps of what ``pipe`` accepts)."""
    import gradio as gr

    multiple, size = size_multiple(pipe), default_size(pipe)
    tiny = pipe.unet.config.sample_size <= 32 and not is_world_model(pipe)
    with gr.Row():
        seed = gr.Number(value=0, label="Seed")  # no precision: Gradio's int() of NaN fails without a message
        steps = gr.Slider(1, 100, value=3 if tiny else 30, step=1, label="Steps")
        guidance = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="Guidance")
    with gr.Row():
        width = gr.Slider(multiple, max(2048, size), value=size, step=multiple, label="Width")
        height = gr.Slider(multiple, max(2048, size), value=size, step=multiple, label="Height")
    return dict(seed=seed, steps=steps, guidance=guidance, width=width, height=height)


def decor_fields() -> dict[str, Any]:
    """DECOR's switch, undesired words and strength, folded away."""
    import gradio as gr

    with gr.Accordion("DECOR: suppress undesired content", open=False):
        use_decor = gr.Checkbox(value=False, label="DECOR on")
        decor_words = gr.Textbox(value="", label="Undesired words (comma-separated)")
        decor_strength = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="DECOR strength")
    return dict(use_decor=use_decor, decor_words=decor_words, decor_strength=decor_strength)


def reference_fields(pipe) -> dict[str, Any]:
    """EasyRef's reference images and scale, folded away; none unless ``pipe`` is an SDXL model."""
    import gradio as gr

    if not hasattr(pipe, "easyref_encoder"):
        return {}
    with gr.Accordion("Reference images (EasyRef)", open=False):  # references condition the whole image
        images = gr.File(label="Reference images", file_count="multiple", file_types=["image"], type="filepath")
        scale = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Reference scale")
    return dict(reference_images=images, reference_scale=scale)


def advanced_fields(factors: Sequence[int], loss_downsample: int) -> dict[str, Any]:
    """LoRA-Composer's four switches, all on, and the loss maps' downsampling (one of ``factors``), folded away."""
    import gradio as gr

    with gr.Accordion("Advanced", open=False):
        region_injection = gr.Checkbox(value=True, label="Region injection (concept K/V/O in boxes)")
        concept_isolation = gr.Checkbox(value=True, label="Concept isolation (boxes don't attend to each other)")
        latent_optimization = gr.Checkbox(value=True, label="Latent optimisation")
        latent_reinit = gr.Checkbox(value=True, label="Latent re-initialisation")
        loss_downsample = gr.Radio(list(factors), value=loss_downsample,
                                   label="Loss maps: latent downsampled by (official: 4 on SD-1.5; world model: 1)")
    return dict(region_injection=region_injection, concept_isolation=concept_isolation,
                latent_optimization=latent_optimization, latent_reinit=latent_reinit, loss_downsample=loss_downsample)


def box_preview() -> BoxPreview:
    """The box preview and the choice of concept whose box two clicks on it set."""
    import gradio as gr

    # No label or buttons over the image: they would cover its top rows, where boxes at ymin 0 start and where a
    # person clicks corners.
    gr.Markdown("**Boxes** (pick a concept below, then click two corners)")
    image = gr.Image(show_label=False, buttons=[], interactive=False, format="png", type="pil", elem_id="box-preview")
    target = gr.Radio(list(range(1, MAX_CONCEPTS + 1)), value=1, label="Draw the box of concept")
    return BoxPreview(image, target)


def results_view() -> Results:
    """The gallery of generated images, the last one's PNG to download and its settings."""
    import gradio as gr

    gallery = gr.Gallery(label="Results", columns=2, format="png", height="auto")
    download = gr.File(label="Download (PNG, settings in its 'parameters' text)")
    last_settings = gr.JSON(label="Settings of the last image")
    return Results(gallery, download, last_settings)


# -- the page's events -----------------------------------------------------------------------------------------

def redraw_preview_on_change(app: "gr.Blocks", preview: BoxPreview, rows: ConceptRows, settings: dict) -> None:
    """Draw the boxes in use when the page loads and whenever a box, a name, the count or the image size changes."""
    import gradio as gr

    box_fields, names, width, height = rows.box_fields, rows.names, settings["width"], settings["height"]

    def show_boxes(n, w, h, *values):
        n = int(n or 0)
        boxes = [((values[4 * MAX_CONCEPTS + i] or "").strip() or f"concept{i + 1}", values[4 * i:4 * i + 4])
                 for i in range(n)]
        return draw_boxes(w, h, boxes)

    gr.on([app.load, rows.count.change, width.change, height.change, *(c.change for c in box_fields),
           *(c.change for c in names)], show_boxes, [rows.count, width, height, *box_fields, *names], preview.image,
          api_visibility="private", show_progress="hidden")


def set_box_on_two_clicks(preview: BoxPreview, corner: "gr.State", rows: ConceptRows, settings: dict) -> None:
    """Two clicks on the preview are opposite corners of the target concept's box: they fill its four fields."""
    import gradio as gr

    box_fields = rows.box_fields

    def click_corner(slot, first, w, h, evt: gr.SelectData):
        x, y = evt.index
        pw, ph = draw_boxes(w, h, []).size
        point = (min(max(x / pw, 0.0), 1.0), min(max(y / ph, 0.0), 1.0))
        if first is None:
            return [gr.skip()] * len(box_fields) + [point]
        box = [min(first[0], point[0]), min(first[1], point[1]), max(first[0], point[0]), max(first[1], point[1])]
        out: list[Any] = [gr.skip()] * len(box_fields)
        start = 4 * (int(slot) - 1)
        out[start:start + 4] = [round(v, 3) for v in box]
        return out + [None]

    preview.image.select(click_corner, [preview.target, corner, settings["width"], settings["height"]],
                         [*box_fields, corner], api_visibility="private")


def concept_count_updates(n: Optional[float]) -> list:
    """The count clamped to [0, :data:`MAX_CONCEPTS`], then the visibility of each slot's group."""
    import gradio as gr

    n = min(max(int(n or 0), 0), MAX_CONCEPTS)
    return [n] + [gr.update(visible=i < n) for i in range(MAX_CONCEPTS)]


def change_concept_count_on_click(rows: ConceptRows) -> None:
    """Add concept shows the next slot; Remove last concept hides the last one shown."""
    outputs = [rows.count, *rows.groups]
    rows.add.click(lambda n: concept_count_updates(int(n or 0) + 1), rows.count, outputs, api_visibility="private")
    rows.remove.click(lambda n: concept_count_updates(int(n or 0) - 1), rows.count, outputs,
                      api_visibility="private")


def fill_demo_concepts_on_click(pipe, rows: ConceptRows, prompt: "gr.Textbox", output_dir: Path,
                                train: bool = False) -> None:
    """Make two demo LoRAs: load (or with ``train``, train) them, fill the first concept slots with them, and the
    prompt if empty. A progress bar under the button says what is happening; the fields wait without spinners."""
    import gradio as gr

    demo_fields = [slot[k] for slot in rows.slots[:len(DEMO_CONCEPTS)] for k in SLOT_FIELDS]

    def fill_demo(n, current_prompt, progress=gr.Progress()):
        world = is_world_model(pipe)  # real concepts, cached in one folder; else random LoRAs, a new folder
        folder = (_ensure(output_dir) / ("trained-demo-loras" if train else "demo-loras") if world
                  else Path(tempfile.mkdtemp(prefix="demo-loras-", dir=_ensure(output_dir))))

        def tell(i: int, total: int, step: int, steps: int) -> None:
            progress((step, steps), desc=training_progress_text(i, total, step, steps))

        progress(0, desc=("training the demo concepts" if train else "loading the demo concepts") if world
                 else "writing two random LoRAs")
        files = make_demo_loras(pipe, folder, train=train, progress=tell)
        concepts, demo_prompt = demo_concepts(pipe)
        values: list[Any] = []
        for path, c in zip(files, concepts):
            values += [str(path), c["name"], c["prompt"], c["tokens"], *c["box"], c["weight"]]
        count = concept_count_updates(max(int(n or 0), len(concepts)))
        done = (f"Trained {len(files)} concept LoRAs in {folder}." if world and train else
                f"Loaded the {len(files)} shipped demo concept LoRAs." if world else
                f"Wrote {len(files)} random LoRA files to {folder}.")
        gr.Info(done)
        return count + values + [current_prompt or demo_prompt, done]

    rows.demo.click(fill_demo, [rows.count, prompt], [rows.count, *rows.groups, *demo_fields, prompt, rows.status],
                    api_visibility="private", show_progress="full", show_progress_on=[rows.status])


def training_progress_text(concept: int, concepts: int, step: int, steps: int) -> str:
    """What the demo button's progress bar says while it trains: "training concept 1/2: step 120/400"."""
    return f"training concept {concept + 1}/{concepts}: step {step}/{steps}"


def generate_on_click(pipe, run: "gr.Button", history: "gr.State", inputs: dict[str, Any], results: Results, *,
                      max_bytes: int, output_dir: Path) -> None:
    """Generate (also the API's ``/generate``, with ``inputs`` as named parameters): run :func:`generate` on the
    concepts in use, save the PNG, and show it first in the gallery; bad input ends in an error on the page."""
    import gradio as gr

    def on_generate(past, progress=gr.Progress(), **values):
        n = min(max(int(values.pop("n_concepts") or 0), 0), MAX_CONCEPTS)
        concepts = [{k: values.pop(f"{k}_{i}") for k in SLOT_FIELDS} for i in range(1, MAX_CONCEPTS + 1)][:n]
        if not values.pop("use_decor"):
            values["decor_words"] = ""
        try:
            image, settings = generate(pipe, concepts=concepts, max_lora_bytes=max_bytes,
                                       progress=lambda s, t: progress((s, t), desc=f"step {s}/{t}"), **values)
        except ValueError as err:  # LoraFileError is one: the message says what to fix
            log.warning("generate refused: %s", err)  # one line per refused request, no traceback
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # anything else still ends in the page, not in a dead app
            log.exception("generate failed")
            raise gr.Error(f"{type(err).__name__}: {err}") from None
        path = save_png(image, settings, _ensure(output_dir))
        past = [(str(path), caption(settings))] + list(past or [])
        return past, str(path), settings, past

    on_generate.__signature__ = api_signature(inputs)
    run.click(on_generate, inputs=[history], inputs_kwargs=inputs, outputs=[*results, history], api_name="generate",
              concurrency_limit=1)


def api_signature(names: Sequence[str]) -> inspect.Signature:
    """``(past, *, <each name>=None, progress=gr.Progress())``: the Generate handler's signature as Gradio reads it.

    The API lists a parameter as optional when the component has a value or the function's parameter defaults to
    None; the empty LoRA slots have neither, so the keyword parameters are spelled out for Gradio.
    """
    import gradio as gr

    keyword = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in names]
    return inspect.Signature([inspect.Parameter("past", inspect.Parameter.POSITIONAL_OR_KEYWORD), *keyword,
                              inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress())])


def _default_box(i: int) -> tuple[float, float, float, float]:
    """Side-by-side columns for the first two concepts, quarters below for the others."""
    return [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)][i - 1]


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def launch(app, *, host: str = "127.0.0.1", port: Optional[int] = None, share: bool = False,
           max_lora_mb: float = DEFAULT_MAX_LORA_MB, output_dir: Optional[os.PathLike] = None,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve ``app``; uploads over ``max_lora_mb`` are refused by the server before they reach the disk."""
    allowed = [str(output_dir)] if output_dir else None
    # show_error: errors Gradio raises before the handler (a server-side path sent as a LoRA "upload") reach the
    # caller with their message instead of a null one; the handler's own errors are gr.Error already
    return app.launch(server_name=host, server_port=port, share=share, max_file_size=int(max_lora_mb * 2**20),
                      allowed_paths=allowed, prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=True)


# -- command line ----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model: a hub id or a local diffusers folder, SD 1.x/2.x or SDXL "
                                        "(default: the embedded world model that draws the shapes world, offline)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    parser.add_argument("--port", type=ranged(int, PORT), default=None,
                        help="port (default: 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--max-lora-mb", type=ranged(float, POSITIVE), default=DEFAULT_MAX_LORA_MB,
                        help="largest LoRA upload in MiB (default: %(default)s)")
    parser.add_argument("--outputs", help="folder for the generated PNGs (default: a temporary folder)")
    parser.add_argument("--train-demo-loras", action="store_true",
                        help="world model only: 'Make two demo LoRAs' retrains the two demo concepts (a few minutes "
                             "on a CPU) instead of loading the shipped files")
    parser.add_argument("--easyref", help="SDXL only: an EasyRef checkpoint (file, folder or hub id), for "
                                          "reference images")
    parser.add_argument("--mllm", default="Qwen/Qwen2-VL-2B-Instruct",
                        help="EasyRef's Qwen2-VL, a hub id or folder (default: %(default)s)")
    parser.set_defaults(func=run_app)


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``visadapt app`` on the ``visadapt`` command's sub-parsers."""
    parser = commands.add_parser("app", help="the Gradio app that composes concept LoRAs in the browser",
                                 description="Compose several concept LoRAs (regions, weights, DECOR) in a "
                                             "Gradio app.")
    add_arguments(parser)


def run_app(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.model is None:
        print("No --model: serving the embedded world model (64×64 shapes; use --model for real images).")
    pipe = load_pipeline(args.model, args.device)
    if getattr(args, "easyref", None):
        if not hasattr(pipe, "load_easyref"):
            raise SystemExit("--easyref needs an SDXL --model (EasyRef conditions SDXL).")
        pipe.load_easyref(args.easyref, mllm=args.mllm)  # the MLLM picks its own dtype
    app = build_app(pipe, max_lora_mb=args.max_lora_mb, output_dir=args.outputs,
                    train_demo_loras=getattr(args, "train_demo_loras", False))
    # Gradio's own start-up lines would tell a command-line user to "set `share=True` in `launch()`".
    _, url, share_url = launch(app, host=args.host, port=args.port, share=args.share, max_lora_mb=args.max_lora_mb,
                               output_dir=args.outputs, prevent_thread_lock=True, quiet=True)
    print(f"* Running on local URL:  {url}")
    print(f"* Public URL: {share_url}" if share_url else "* To create a public link, start the app with --share.")
    app.block_thread()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m visadapt.apps.composer", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
