"""TaCQ (task-circuit quantization).

The pure pieces know nothing about Lightning: saliency, (masked) GPTQ, packing, QuantLinear, the
packed directory (io, with ``manifest`` checking it before a load allocates anything) and the whole-model
pass (pipeline, resumable per block through ``workdir``). ``calibration`` (data module) and ``module``
(LightningModule) are the Lightning side of the calibration epoch; ``callbacks/tacq.py`` accumulates the
gradients during it and runs the pipeline when the fit ends.
"""
