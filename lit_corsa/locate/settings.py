"""The settings of ROME, MEMIT and AlphaEdit (``model.locate``), checked whole when the config is read.

``None`` means "the paper's value": layers by model family (:data:`lit_corsa.locate.sites.PAPER_LAYERS`),
the rest from the released Llama-3-8B settings of the AlphaEdit repository (which runs all three):

============  =====  =========  ===========  ====  =========
method        v_lr   v_steps    weight decay clamp  kl_factor
============  =====  =========  ===========  ====  =========
rome          0.5    25         1e-3         4     0.0625
memit         0.1    25         0.5          0.75  0.0625
alphaedit     0.1    25         0.5          0.75  0.0625
============  =====  =========  ===========  ====  =========

MEMIT weighs the preserved keys by ``mom2_weight`` = 15000; AlphaEdit keeps eigen-directions of the key
covariance below ``nullspace_threshold`` = 2e-2 and regularises with ``l2`` = 10.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lit_corsa.settings import _check

PAPER_DEFAULTS: dict[str, dict[str, float]] = {
    "rome": {"v_lr": 0.5, "v_steps": 25, "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0},
    "memit": {"v_lr": 0.1, "v_steps": 25, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75},
    "alphaedit": {"v_lr": 0.1, "v_steps": 25, "v_weight_decay": 0.5, "clamp_norm_factor": 0.75},
}
WIKITEXT = "pypi:exllamav2==0.3.2/exllamav2/conversion/standard_cal_data/wiki.utf8"


@dataclass(frozen=True)
class LocateSettings:
    """What a locate-then-edit method writes where (module docstring for the defaults).

    layers: decoder blocks whose MLP down projection is edited (None: the paper's). v_lr / v_steps /
    v_weight_decay / clamp_norm_factor / kl_factor / kl_prompt: the target-value optimisation
    (:mod:`lit_corsa.locate.targets`). context_prefixes / prefix_tokens: prefixes sampled from the unedited
    model that keys and targets are averaged over. covariance_source / covariance_tokens /
    covariance_window / covariance_cache: the general text the key covariance is estimated on, and where it
    is cached (None: ``~/.cache/lit-editq/key_covariance``). mom2_weight: MEMIT's λ. nullspace_threshold /
    l2: AlphaEdit's.
    """

    layers: list[int] | None = None
    v_lr: float | None = None
    v_steps: int | None = None
    v_weight_decay: float | None = None
    clamp_norm_factor: float | None = None
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    context_prefixes: int = 5
    prefix_tokens: int = 10
    covariance_source: str = WIKITEXT
    covariance_tokens: int = 100_000
    covariance_window: int = 256
    covariance_cache: str | None = None
    mom2_weight: float = 15000.0
    nullspace_threshold: float = 2e-2
    l2: float = 10.0

    def __post_init__(self) -> None:
        positive = lambda v: v is None or v > 0
        _check("locate", {
            "layers": (self.layers is None or (len(self.layers) > 0 and len(set(self.layers)) == len(self.layers)
                                               and list(self.layers) == sorted(self.layers)),
                       "null or distinct block indices in increasing order"),
            "v_lr": (positive(self.v_lr), "> 0 or null"),
            "v_steps": (self.v_steps is None or self.v_steps >= 1, ">= 1 or null"),
            "v_weight_decay": (self.v_weight_decay is None or self.v_weight_decay >= 0, ">= 0 or null"),
            "clamp_norm_factor": (positive(self.clamp_norm_factor), "> 0 or null"),
            "kl_factor": (self.kl_factor >= 0, ">= 0"),
            "kl_prompt": (self.kl_prompt.count("{}") == 1, "a prompt with exactly one '{}' for the subject"),
            "context_prefixes": (self.context_prefixes >= 0, ">= 0"),
            "prefix_tokens": (self.prefix_tokens >= 1, ">= 1"),
            "covariance_tokens": (self.covariance_tokens >= 1, ">= 1"),
            "covariance_window": (self.covariance_window >= 2, ">= 2"),
            "mom2_weight": (self.mom2_weight > 0, "> 0"),
            "nullspace_threshold": (self.nullspace_threshold > 0, "> 0"),
            "l2": (self.l2 > 0, "> 0"),
        }, self)

    def for_method(self, method: str) -> LocateSettings:
        """These settings with every ``None`` hyper-parameter replaced by ``method``'s paper value."""
        chosen: dict[str, Any] = {k: v for k, v in PAPER_DEFAULTS[method].items() if getattr(self, k) is None}
        return replace(self, **chosen)
