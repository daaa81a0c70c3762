"""TaCQ (task-circuit quantization), the pure pieces: saliency, masked GPTQ, packed storage.

Nothing here knows about Lightning; the callback in ``callbacks/tacq.py`` orchestrates these.
"""
