"""EditReport: what a user looks at after a sequential editing run.

After every round's evaluation it records the scores (per edit round and over all edits so far), and
rewrites ``metrics.json`` and ``metrics.png`` in the run directory, so a crash loses nothing already
measured; at fit end it saves the adapter in peft format (loadable with ``PeftModel.from_pretrained`` and
by vLLM) and, if asked, a merged full model. The history is callback state, so it survives a resume.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lit_common.files import write_atomically
from lit_corsa.evaluation import PROTOCOLS, RoundScores
from lit_corsa.metrics import forgetting
from lit_corsa.module import EditModule

PROTOCOL_NOTES = {
    "schedule": "after training round k, every edit of rounds 0..k is scored (sequential editing)",
    "immediate": "mean over rounds r of the score of round r's edits right after round r",
    "final": "mean over rounds r of the score of round r's edits after the last round",
    "forgetting": "mean over r < last of (immediate score of round r - its score after the last round); "
                  "positive = forgotten",
    "sparse metrics": "a metric whose probes only some rounds' edits have (e.g. one portability sub-kind) is "
                      "summarised over those rounds only; 'edit_rounds' in the summary lists them per metric",
}


def summarise(history: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Immediate / final scores and forgetting for every metric, each over the edit rounds whose edits have
    its probes (``summary["edit_rounds"][name]``): all of them for most metrics, some for a benchmark
    sub-kind that not every record carries. Forgetting needs one of them before the last round."""
    rounds = sorted(history)
    last = rounds[-1]
    names = sorted(set().union(*(history[r]["by_edit_round"][r] for r in rounds)))
    summary: dict[str, Any] = {"after_last_round": history[last]["all"], "immediate": {}, "final": {},
                               "forgetting": {}, "edit_rounds": {}}
    for name in names:
        measured = [r for r in rounds if name in history[r]["by_edit_round"][r]]
        table = {k: {r: history[k]["by_edit_round"][r][name] for r in measured if r <= k} for k in {*measured, last}}
        summary["edit_rounds"][name] = measured
        summary["immediate"][name] = sum(table[r][r] for r in measured) / len(measured)
        summary["final"][name] = sum(table[last][r] for r in measured) / len(measured)
        if any(r < last for r in measured):
            summary["forgetting"][name] = forgetting(table)
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as aligned text (metric, immediate, final, forgetting) for the end-of-run printout."""
    names = sorted(summary["final"])
    width = max(len("metric"), *(len(n) for n in names))
    lines = [f"{'metric':<{width}}  immediate   final  forgetting"]
    for name in names:
        forgot = summary["forgetting"].get(name)
        lines.append(f"{name:<{width}}  {summary['immediate'][name]:>9.3f}  {summary['final'][name]:>6.3f}  "
                     + (f"{forgot:>10.3f}" if forgot is not None else f"{'-':>10}"))
    return "\n".join(lines)


def plot_history(history: dict[int, dict[str, Any]], path: Path, title: str = "") -> None:
    """One panel per metric: the score over all edits so far, and each round's edits over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted(history)
    names = sorted(history[rounds[-1]]["all"])
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.plot(rounds, [history[k]["all"].get(name, float("nan")) for k in rounds], "k-o", lw=2, label="all edits so far")
        for r in rounds:
            later = [k for k in rounds if k >= r]
            ax.plot(later, [history[k]["by_edit_round"][r].get(name, float("nan")) for k in later], "--", marker=".", alpha=0.6,
                    label=f"round {r} edits" if len(rounds) <= 6 else None)
        ax.set_title(name)
        ax.set_xlabel("after round")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(rounds)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)




class EditReport(L.Callback):
    """Writes ``metrics.json``, ``metrics.png`` and the adapter (``adapter/``, optionally ``merged/``)."""

    def __init__(self, output_dir: str | None = None, merge_adapter: bool = False, plot: bool = True) -> None:
        self.output_dir, self.merge_adapter, self.plot = output_dir, merge_adapter, plot
        self.history: dict[int, dict[str, Any]] = {}
        self.test_scores: dict[str, Any] | None = None
        self._run_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # on every rank: trainer.log_dir is a collective (a broadcast from rank 0) under DDP and FSDP, so
        # asking for it inside a rank-zero-only write would leave rank 0 waiting for the others forever
        self._run_dir = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)

    def run_dir(self) -> Path:
        assert self._run_dir is not None, "Lightning calls setup() before any hook that writes"
        self._run_dir.mkdir(parents=True, exist_ok=True)
        return self._run_dir

    @staticmethod
    def _scores(pl_module: L.LightningModule) -> RoundScores:
        if not isinstance(pl_module, EditModule) or pl_module.scores is None:
            raise TypeError("EditReport records the scores an EditModule publishes after each evaluation")
        return pl_module.scores

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        scores = self._scores(pl_module)
        self.history[scores.eval_round] = {"all": scores.all, "by_edit_round": scores.by_edit_round}
        self._write(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test_scores = asdict(self._scores(pl_module))
        self._write(trainer, pl_module)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = self.run_dir()
        payload: dict[str, Any] = {
            "method": pl_module.hparams.get("method"),
            "objective": asdict(pl_module.objective) if hasattr(pl_module, "objective") else None,
            "model": pl_module.hparams.get("model_name_or_path"),
            "data": getattr(trainer.datamodule, "source", None),
            "protocol": {**PROTOCOL_NOTES, "metrics": PROTOCOLS},
            "rounds": [{"eval_round": k, **self.history[k]} for k in sorted(self.history)],
        }
        if self.history:
            payload["summary"] = summarise(self.history)
        if self.test_scores is not None:
            payload["test"] = self.test_scores
        write_atomically(run_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))
        if self.plot and self.history:
            plot_history(self.history, run_dir / "metrics.png", f"{payload['method']} on {payload['data']}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        run_dir = self.run_dir()
        self.save_adapter(pl_module, run_dir)
        if self.history:
            rank_zero_info(f"\n{pl_module.hparams.get('method')} after {len(self.history)} round(s) (forgetting as "
                           f"docs/corsa.md §6, positive = forgotten; protocols in metrics.json):\n"
                           f"{summary_table(summarise(self.history))}\nresults in {run_dir}")

    def save_adapter(self, pl_module: L.LightningModule, run_dir: Path) -> None:
        adapter_dir = run_dir / "adapter"
        pl_module.model.save_pretrained(adapter_dir)
        pl_module.tokenizer.save_pretrained(adapter_dir)
        if self.merge_adapter:
            from peft import PeftModel

            from lit_common.sources import load_causal_lm

            hp = pl_module.hparams
            base = load_causal_lm(hp.model_name_or_path, hp.dtype)
            merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
            merged.save_pretrained(run_dir / "merged")
            pl_module.tokenizer.save_pretrained(run_dir / "merged")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(k): v for k, v in state_dict["history"].items()}
