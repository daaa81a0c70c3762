"""The editing run the fault tests kill and rerun: CoRSA on a small CounterFact file, checkpoints every 4 steps,
the kill switch armed (``tests/faults/kill_switch.py``); format with out, model, data and num_updates."""

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {out}, name: run}}
  callbacks:
    - class_path: callbacks.edit_report.EditReport
      init_args: {{plot: false}}
    - class_path: callbacks.run_checkpoint.RunCheckpoint
      init_args: {{every_n_train_steps: 4}}
    - class_path: tests.faults.kill_switch.KillSwitch
model:
  model_name_or_path: {model}
  method: corsa
  optimizer: {{learning_rate: 1.0e-2, warmup_steps: 1}}
  lora: {{r: 4, alpha: 8}}
  evaluation: {{max_new_tokens: 4}}
data:
  class_path: data.counterfact.CounterFactDataModule
  init_args:
    source: {data}
    num_updates: {num_updates}
    edits_per_update: 6
    epochs_per_update: 2
    batch_size: 2
"""
