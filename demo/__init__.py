"""The mmdiff Gradio demo (``mmdiff demo``); see :mod:`demo.app`."""
