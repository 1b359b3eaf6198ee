"""The embedded worlds: procedural data that needs no download, and the small models shipped pretrained on them.

Each task's ``--demo`` takes one of these worlds and runs the task on it. The worlds are a layer below the tasks:
they may use :mod:`visadapt.utils` (and numpy, PIL, torch, open_clip, timm, diffusers), never an adapter or a task.

============================  ===================================================  ====================================
world                         what it ships                                        how it was pretrained
============================  ===================================================  ====================================
:mod:`.shapes`: one flat      ``demo_clip/``: the demo CLIP (open_clip             ``python pretrain/demo_clip.py``,
shape an image (15 shapes,    ``local-dir:``, ``visadapt-demo-clip``; 1.8 M        seen shapes only (about 13 minutes
8 colours, 4 textures) with   parameters), the few-shot and incremental demos'     on one CPU core)
varied captions; canvases of  model
one or two shapes             ``world_model/``: the world model, a tiny Stable     ``OMP_NUM_THREADS=1 python
                              Diffusion pipeline (7.9 MB of fp16 safetensors)      pretrain/world_model.py``, canvases
                              that draws canvases from prompts; the composer       of seen shapes (32.6 min from
                              app's default, judged by :mod:`.judge`               scratch, then 94.5 min continued
                                                                                   with ``--init``; shape recognition
                                                                                   81.9 %)
:mod:`.video`: textured       ``demo_vit/``: the demo ViT (timm, DINOv2 layout,    ``python pretrain/demo_vit.py``,
shapes moving among           0.2 M parameters), the tracking demo's backbone      as a whole tracker on the
distractors, occlusion,                                                            ``pretrain`` kind (16 minutes,
scale change, out of view;                                                         1,683 steps; held-out AO 53.7; its
GOT-10k layout                                                                     ``config.json`` records the run)
:mod:`.spectra`: synthetic    nothing: the hyperspectral demo trains its tiny      —
hyperspectral scenes          model from scratch
(~100 bands, 8 classes)
============================  ===================================================  ====================================

:mod:`.models` holds the shipped folders' paths and loaders (:func:`~.models.load_demo_vit`,
:func:`~.models.load_world_model`). The pretraining scripts live in the repository's ``pretrain/`` folder, not in
the package: they train with task code (the tracking demo ViT is pretrained as a LoRAT tracker, the world model's
tokenizer comes from the diffusion task), which a world may not import. Each script's docstring gives its command
and settings.
"""
