"""Gradio apps, installed as ``visadapt.apps``.

* :mod:`visadapt.apps.composer`: compose several concept LoRAs (boxes, weights, DECOR) in the browser;
  ``visadapt app`` or ``python -m visadapt.apps.composer``. Its :func:`~visadapt.apps.composer.build_app` and
  :func:`~visadapt.apps.composer.generate` are the programmatic entry points.
"""
