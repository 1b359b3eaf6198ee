"""export_lora's three file formats where users take them: stock diffusers (load_lora_weights + set_adapters, the
kohya path) in a process that never imports visadapt, and LoRA-Composer concepts (Python and the app); plus the
scale that is exported, the default concept names of generic file names, and files with NaN weights.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_python
from peft import inject_adapter_in_model
from safetensors.torch import load_file, save_file

import visadapt
from visadapt.diffusion import ComposerConfig, Concept, LoraFileError
from visadapt.diffusion.composer.concepts import adapter_name_for
from visadapt.diffusion.tiny import save_random_lora, tiny_pipeline
from visadapt.pipelines import LoRAComposerPipeline

# peft warns when a model gets a second adapter; these tests do that on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

TINY = Path(visadapt.diffusion.tiny.__file__)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PLAIN = ComposerConfig(latent_optimization=False, latent_reinit=False)
# guidance 1 (no CFG): guidance 7.5 would amplify float rounding between LoRA implementations 7.5-fold.
CALL = "num_inference_steps=2, height=32, width=32, output_type='latent', guidance_scale=1.0"


def adapted_pipeline(kind: str, name: str = "style", text: bool = True, text_targets=TEXT_TARGETS):
    """A tiny pipeline whose UNet carries a Block-LoRA and whose text encoder(s) a Comp-LoRA, both non-zero."""
    pipe = tiny_pipeline(kind)
    torch.manual_seed(1)  # after building, so the factors are random but the same every run
    pipe.unet.add_adapter(visadapt.BlockLoraConfig(n_blocks=4, r=4, lora_alpha=8, init_weights=False,
                                                   target_modules=UNET_TARGETS), adapter_name=name)
    encoders = ("text_encoder", "text_encoder_2") if text else ()
    for encoder in (getattr(pipe, e, None) for e in encoders):
        if encoder is not None:  # transformers' add_adapter wants peft >= 0.22; peft's own injection works
            inject_adapter_in_model(visadapt.CompLoraConfig(k=4, r=2, lora_alpha=4, init_weights=False,
                                                            target_modules=text_targets), encoder, name)
    return pipe


def latents(pipe, prompt: str = "a photo of a cat", **kwargs) -> torch.Tensor:
    return pipe(prompt=prompt, num_inference_steps=2, height=32, width=32, output_type="latent", guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), **kwargs).images


def load_in_stock_diffusers(kind: str, folder: Path, tmp_path: Path, weight: float) -> dict[str, torch.Tensor]:
    """Latents of a fresh tiny pipeline with ``folder`` loaded by ``load_lora_weights``: at weight 1 and, through
    ``set_adapters``, at ``weight``; in a process that never imports visadapt (tiny.py is loaded as a plain file)."""
    run_python(textwrap.dedent(f"""
        import importlib.util, logging, sys
        import torch
        from safetensors.torch import save_file
        spec = importlib.util.spec_from_file_location("tiny_models", r"{TINY}")
        tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
        records = []
        handler = logging.Handler(); handler.emit = records.append
        logging.getLogger("diffusers").addHandler(handler)
        pipe = tiny.tiny_pipeline("{kind}")
        def run():
            return pipe(prompt="a photo of a cat", {CALL}, generator=torch.Generator().manual_seed(0)).images
        base = run()
        pipe.load_lora_weights(r"{folder}", adapter_name="exported")
        assert not [r for r in records if "No LoRA keys" in r.getMessage()], [r.getMessage() for r in records]
        full = run()
        pipe.set_adapters(["exported"], [{weight}])
        partial = run()
        assert not any(m.startswith("visadapt") for m in sys.modules), "visadapt was imported"
        save_file({{"base": base, "full": full, "partial": partial}}, r"{tmp_path}/out.safetensors")
    """), tmp_path)
    return load_file(tmp_path / "out.safetensors")


@pytest.mark.parametrize("kind, fmt, text_targets", [
    ("sd", "diffusers", TEXT_TARGETS), ("sdxl", "diffusers", TEXT_TARGETS), ("sd", "kohya", TEXT_TARGETS),
    ("sdxl", "kohya", TEXT_TARGETS),
    ("sd", "kohya", ["q_proj", "v_proj"]),  # diffusers' kohya loader cannot infer a text LoRA without out_proj
], ids=["sd-diffusers", "sdxl-diffusers", "sd-kohya", "sdxl-kohya", "sd-kohya-qv"])
def test_pipeline_export_loads_in_stock_diffusers_and_blends(kind, fmt, text_targets, tmp_path):
    pipe = adapted_pipeline(kind, text_targets=text_targets)
    pipe.set_adapters(["style"], [0.6])
    partial = latents(pipe)
    pipe.set_adapters(["style"], [0.7])  # the live weight at export time must not end up in the file
    folder = visadapt.export_lora(pipe, tmp_path / "style", adapter_name="style", format=fmt)
    pipe.set_adapters(["style"], [1.0])
    full = latents(pipe)
    got = load_in_stock_diffusers(kind, folder, tmp_path, weight=0.6)
    assert (got["full"] - got["base"]).abs().max() > 1e-3, "the LoRA must act"
    torch.testing.assert_close(got["full"], full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["partial"], partial, atol=1e-4, rtol=1e-4)


def test_diffusers_format_is_the_default_for_a_unet_and_holds_each_component(tmp_path):
    pipe = adapted_pipeline("sdxl")
    folder = visadapt.export_lora(pipe.unet, tmp_path / "unet_only", adapter_name="style")
    assert [p.name for p in folder.iterdir()] == ["pytorch_lora_weights.safetensors"]
    assert {k.split(".")[0] for k in load_file(folder / "pytorch_lora_weights.safetensors")} == {"unet"}
    whole = visadapt.export_lora(pipe, tmp_path / "whole", adapter_name="style")
    keys = load_file(whole / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in keys


def test_kohya_keys_follow_the_a1111_convention(tmp_path):
    folder = visadapt.export_lora(adapted_pipeline("sd"), tmp_path / "my_style", adapter_name="style",
                                  format="kohya")
    tensors = load_file(folder / "my_style.safetensors")  # A1111 and ComfyUI name a LoRA by its file
    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    text = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    for name in (unet, text):
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= tensors.keys()
        assert tensors[f"{name}.alpha"].item() == tensors[f"{name}.lora_down.weight"].shape[0]  # scale 1


def test_exported_scale_is_the_adapters_own_not_the_live_weight(tmp_path):
    unet = adapted_pipeline("sd", text=False).unet
    unet.set_adapters(["style"], [1.0])
    one = load_file(next(visadapt.export_lora(unet, tmp_path / "one", "style").glob("*.safetensors")))
    unet.set_adapters(["style"], [0.7])  # a blend weight of the session, not part of the adapter
    live = load_file(next(visadapt.export_lora(unet, tmp_path / "live", "style").glob("*.safetensors")))
    assert one.keys() == live.keys()
    for key in one:
        torch.testing.assert_close(live[key], one[key], atol=0, rtol=0)


def test_rslora_exports_alpha_over_sqrt_r(tmp_path):
    from visadapt.adapters import LowRankLayer

    unet = tiny_pipeline("sd").unet
    torch.manual_seed(1)
    unet.add_adapter(visadapt.CompLoraConfig(k=4, r=4, lora_alpha=8, use_rslora=True, init_weights=False,
                                             target_modules=["to_q"]), adapter_name="rs")
    unet.set_adapters(["rs"], [0.5])
    tensors = load_file(visadapt.export_lora(unet, tmp_path, "rs") / "pytorch_lora_weights.safetensors")
    unet.set_adapters(["rs"], [1.0])
    name, layer = next((n, m) for n, m in unet.named_modules() if isinstance(m, LowRankLayer))
    exported = tensors[f"unet.{name}.lora_B.weight"] @ tensors[f"unet.{name}.lora_A.weight"]
    torch.testing.assert_close(exported, layer.get_delta_weight("rs"), atol=1e-6, rtol=1e-5)  # s = 8 / √4


# -- LoRA-Composer concepts ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The same UNet + text-encoder adapter in every format, plus a UNet-only peft and diffusers export."""
    root = tmp_path_factory.mktemp("exports")
    pipe = adapted_pipeline("sd")
    out = {fmt: visadapt.export_lora(pipe, root / fmt, "style", format=fmt) for fmt in ("diffusers", "kohya")}
    out["unet_peft"] = visadapt.export_lora(pipe.unet, root / "unet_peft", "style", format="peft")
    out["unet_diffusers"] = visadapt.export_lora(pipe.unet, root / "unet_diffusers", "style")
    return out


def compose(folder_or_file, prompt="a photo of a cat", pipe=None, **concept):
    pipe = pipe or tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline)
    concepts = [Concept(lora=folder_or_file, prompt=prompt, box=[0, 0, 1, 1], **concept)]
    return latents(pipe, prompt=prompt, concepts=concepts, composer=PLAIN)


def test_every_export_format_loads_as_a_concept(exports):
    base = latents(tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline))
    whole = compose(exports["diffusers"] / "pytorch_lora_weights.safetensors")
    assert (whole - base).abs().max() > 1e-3
    torch.testing.assert_close(compose(exports["diffusers"]), whole)  # the folder works as well as its file
    torch.testing.assert_close(compose(exports["kohya"] / "kohya.safetensors"), whole, atol=1e-5, rtol=1e-4)
    unet_only = compose(exports["unet_diffusers"] / "pytorch_lora_weights.safetensors")
    assert (unet_only - base).abs().max() > 1e-3
    torch.testing.assert_close(compose(exports["unet_peft"] / "adapter_model.safetensors"), unet_only,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(compose(exports["unet_peft"]), unet_only, atol=1e-5, rtol=1e-4)


def test_an_export_loads_as_a_concept_in_the_app(exports):
    from visadapt.apps import composer

    pipe = composer.load_pipeline(device="cpu")
    slot = dict(lora=str(exports["kohya"] / "kohya.safetensors"), name="", prompt="a photo of a cat", xmin=0, ymin=0,
                xmax=1, ymax=1, weight=1.0)
    peft_slot = {**slot, "lora": str(exports["unet_peft"] / "adapter_model.safetensors")}
    fast = dict(prompt="a photo of a cat", seed=1, steps=2, width=64, height=64, latent_optimization=False,
                latent_reinit=False)
    image, settings = composer.generate(pipe, concepts=[slot, peft_slot], **fast)
    plain, _ = composer.generate(pipe, **fast)
    assert [c["lora"] for c in settings["concepts"]] == ["kohya.safetensors", "adapter_model.safetensors"]
    assert image.tobytes() != plain.tobytes()


def test_a_stock_peft_unet_adapter_keeps_its_alpha_as_a_concept(tmp_path):
    from peft import LoraConfig, get_peft_model

    from visadapt.diffusion.composer.lora_files import read_lora_state_dict

    pipe = tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline)
    torch.manual_seed(1)
    lora = get_peft_model(tiny_pipeline("sd").unet, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                target_modules=UNET_TARGETS))
    lora.save_pretrained(tmp_path / "stock")
    raw = load_file(tmp_path / "stock" / "adapter_model.safetensors")
    read = read_lora_state_dict(pipe, tmp_path / "stock")
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"
    torch.testing.assert_close(read[f"unet.{key}"], 2 * raw[f"base_model.model.{key}"])  # alpha / r = 2
    assert torch.isfinite(compose(tmp_path / "stock", pipe=pipe)).all()


def test_generic_file_names_default_to_the_folder_name(tmp_path):
    pipe = tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline)
    cat, dog = (save_random_lora(pipe, tmp_path / n / "pytorch_lora_weights.safetensors", seed=i)
                for i, n in enumerate(("cat", "dog")))
    assert adapter_name_for(tmp_path / "style" / "adapter_model.safetensors") == "style"
    assert adapter_name_for(tmp_path / "cat.v2.safetensors") == "cat_v2"
    concepts = [Concept(lora=cat, prompt="a cat", box=[0, 0, 0.5, 1]),
                Concept(lora=dog, prompt="a dog", box=[0.5, 0, 1, 1])]
    assert [c.adapter_name for c in concepts] == ["cat", "dog"]
    out = latents(pipe, prompt="a cat and a dog", concepts=concepts, composer=PLAIN)
    assert torch.isfinite(out).all() and {"cat", "dog"} <= set(pipe.get_list_adapters()["unet"])


# -- NaN / inf weights ---------------------------------------------------------------------------------------------

def test_a_concept_file_with_nan_weights_is_refused_by_name(tmp_path):
    tensors = load_file(save_random_lora(tiny_pipeline("sd"), tmp_path / "good.safetensors"))
    broken = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"
    tensors[broken][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "broken.safetensors"))
    with pytest.raises(LoraFileError, match=rf"NaN or inf weights in 1 tensor\(s\): {broken}"):
        compose(tmp_path / "broken.safetensors")


def test_a_fewshot_adapter_with_inf_weights_is_refused_by_name(tmp_path):
    from peft import get_peft_model

    from visadapt.fewshot.model import load_clip
    from visadapt.pipelines import FewShotCLIPPipeline

    bundle = load_clip("visadapt-demo-clip")
    clip = get_peft_model(bundle.model, visadapt.BlockLoraConfig(n_blocks=2, r=2,
                                                                 target_modules=r".*resblocks\.0\.attn"))
    FewShotCLIPPipeline(clip, bundle.tokenizer, bundle.preprocess_val, ["cat", "dog"], "visadapt-demo-clip",
                        None).save_pretrained(tmp_path)
    adapter = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(adapter)
    broken = sorted(tensors)[0]
    tensors[broken] = torch.full_like(tensors[broken], float("inf"))
    save_file(tensors, str(adapter))
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors holds NaN or inf weights.*{broken}"):
        FewShotCLIPPipeline.from_pretrained(tmp_path)


# -- bad arguments -------------------------------------------------------------------------------------------------

def test_format_errors_name_the_fix(tmp_path):
    pipe = adapted_pipeline("sd", text=False)
    with pytest.raises(ValueError, match="format='peft' exports one model.*format='diffusers'"):
        visadapt.export_lora(pipe, tmp_path / "x", "style", format="peft")
    with pytest.raises(ValueError, match="format must be one of"):
        visadapt.export_lora(pipe, tmp_path / "x", "style", format="a1111")
    with pytest.raises(ValueError, match="No component of the pipeline has an adapter named 'nope'"):
        visadapt.export_lora(pipe, tmp_path / "x", "nope")
    with pytest.raises(ValueError, match="not a Linear.*format='peft'"):
        visadapt.export_lora(torch.nn.Linear(2, 2), tmp_path / "x", format="kohya")
