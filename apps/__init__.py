"""Gradio apps, installed as ``visadapt.apps``."""
