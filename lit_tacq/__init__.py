"""TaCQ (task-circuit quantization).

The pure pieces know nothing about Lightning: saliency, (masked) GPTQ, packing, QuantLinear, the
packed directory (io, with ``manifest`` checking it before a load allocates anything) and the whole-model
pass (pipeline, resumable per block through ``workdir``). ``calibration`` (data module) and ``module``
(LightningModule) are the Lightning side of the calibration epoch; ``callbacks/tacq.py`` accumulates the
gradients during it and runs the pipeline when the fit ends.

Paper: Xiao, Sung, Stengel-Eskin, Bansal, *Task-Circuit Quantization: Leveraging Knowledge Localization and
Interpretability for Compression*, https://arxiv.org/abs/2504.07389 (reference code:
https://github.com/The-Inscrutable-X/TACQ). ``docs/tacq.md`` states the method as this project implements it;
"docs/tacq.md §N" in docstrings points to its sections.
"""

import lit_tacq.hf_quantizer  # noqa: E402,F401  registers the packed format with transformers (from_pretrained)
