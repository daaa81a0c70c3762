"""CoRSA knowledge editing: losses, PCGrad merge, SAM perturbation, metrics, code sandbox, and the
LightningModule that runs the CoRSA step (see ``module.py``)."""
