"""TaCQ (task-circuit quantization).

The pure pieces know nothing about Lightning: saliency, (masked) GPTQ, packing, QuantLinear, the
packed directory (io) and the whole-model pass (pipeline). ``calibration`` (data module) and ``module``
(LightningModule) are the Lightning side of the calibration epoch; ``callbacks/tacq.py`` accumulates the
gradients during it and runs the pipeline at its end.
"""
