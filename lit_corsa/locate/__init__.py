"""Locate-then-edit methods (ROME, MEMIT, AlphaEdit): pure updates, edit sites found by module type, the key
covariance, target values, the editor, and the LightningModule that runs them in the editing harness."""
