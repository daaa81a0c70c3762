"""CoRSA knowledge editing: losses, PCGrad merge, SAM perturbation, metrics, code sandbox, and the
LightningModule that runs the CoRSA step (see ``module.py``).

Paper: Nguyen, Xiao, Prasad, Stengel-Eskin, Lee, Bansal, *Conflict-Resolving and Sharpness-Aware
Minimization for Generalized Knowledge Editing with Multiple Updates*, https://arxiv.org/abs/2602.03696
(reference code: https://github.com/duykhuongnguyen/CoRSA). ``docs/corsa.md`` states the method as this
project implements it; "docs/corsa.md §N" in docstrings points to its sections.
"""
