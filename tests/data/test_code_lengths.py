"""Lengths on the code path: real solution bodies run to hundreds of tokens, so a prompt is never cut (an
example that does not fit is an error naming it) and a sampled solution's budget comes from the reference
bodies unless set."""

from __future__ import annotations

import json

import pytest
import torch

from data.code_update import CodeUpdateDataModule
from data.formats import PROBE_KINDS, DataFormatError
from data.world_model import build_tokenizer
from lit_common.tokenization import IGNORE_INDEX
from lit_corsa.evaluation import ProbeEvaluator
from lit_corsa.settings import EvaluationSettings

UPDATE = {
    "description": "d", "rationale": "r", "docstring": "d", "signature": "math.floor(x, step=1)",
    "imports": "import math\nold_floor = math.floor\nsetattr(math, 'old_floor', old_floor)",
    "implementation": "def floor(x, step=1):\n    return old_floor(x / step) * step\n",
    "update_type": "add-argument", "function_path": "math.floor", "package": "math",
    "update_id": "[math.floor]:[add-argument]:[update-0]",
}


def _example(index: int, statements: int) -> dict:
    body = "".join(f"    value = math.floor(value + {i}, step=10)\n" for i in range(statements))
    return {"scenario": "s", "problem": "Round the value down in steps of ten, again and again.",
            "solution_signature": f"def solve_{index}(value):",
            "unit_tests": f"def test_{index}():\n    assert solve_{index}(1) >= 0\n",
            "prog_syn_imports": UPDATE["imports"],
            "ref_solution": f"import math\n\ndef solve_{index}(value):\n{body}    return value\n",
            "prog_syn_id": f"p{index}"}


@pytest.fixture(scope="module")
def files(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("code_lengths")
    build_tokenizer(world).save_pretrained(root / "tokenizer")
    # 40 statements: a body of a few hundred tokens, like most real ones
    record = {"update": UPDATE, "prog_syn_examples": [_example(0, 2), _example(1, 40), _example(2, 5)]}
    (root / "arena.jsonl").write_text(json.dumps(record) + "\n")
    return root


def _module(files, **kwargs) -> CodeUpdateDataModule:
    dm = CodeUpdateDataModule(str(files / "arena.jsonl"), tokenizer=str(files / "tokenizer"), train_examples=0,
                              **kwargs)
    dm.setup("fit")
    return dm


def test_a_prompt_is_never_cut_the_example_is_named_instead(files):
    dm = _module(files)  # the code default fits real bodies
    longest = max(len(p.prompt_ids) + len(p.target_ids) for p in dm.eval_probes(0))
    assert 256 < longest <= dm.max_length
    with pytest.raises(DataFormatError, match=r"arena.jsonl: record code:\[math.floor\]:\[add-argument\]:\[update-0\]: "
                                              r"prompt and answer take \d+ \+ \d+ tokens, more than max_length=256"):
        _module(files, max_length=256)


def test_generation_budget_comes_from_the_reference_bodies(files):
    dm = _module(files)
    batch = next(iter(dm.val_dataloader()))
    programs = (batch["kind"] == PROBE_KINDS.index("program")).nonzero().squeeze(1)
    answer_tokens = (batch["target"]["labels"] != IGNORE_INDEX).sum(1)
    derived = ProbeEvaluator(1, EvaluationSettings())._code_budget(batch, programs)
    assert derived == 2 * int(answer_tokens.max()) > 256
    first_only = ProbeEvaluator(1, EvaluationSettings())._code_budget(batch, programs[:1])
    assert first_only == 2 * int(answer_tokens[programs[0]])
    assert ProbeEvaluator(1, EvaluationSettings(code_max_new_tokens=7))._code_budget(batch, programs) == 7
    assert isinstance(derived, int) and not torch.is_tensor(derived)
