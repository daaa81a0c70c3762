"""How the CodeUpdateArena reader cuts a reference solution into prompt and target, and what it refuses.

The cases are the real files' shapes: imports before the function (kept, in the prompt and the program),
signatures that are not the solution's own header (``function f(...)``, no colon, another annotation, an
extra default), decorators, one-line bodies; a solution without the signature's function is an error
naming file, record and field, never a whole-program target.
"""

from __future__ import annotations

import json

import pytest

from data.code_update import (
    CodeUpdateDataModule,
    join_solution,
    parse_code_update_rows,
    split_solution,
)
from data.formats import RecordError

UPDATE = {
    "description": "math.sin takes degrees.", "rationale": "r", "docstring": "d",
    "signature": "math.sin(x, unit='radians')",
    "imports": "import math\nold_sin = math.sin\nsetattr(math, 'old_sin', old_sin)",
    "implementation": "def sin(x, unit='radians'):\n"
                      "    return old_sin(x * 3.141592653589793 / 180 if unit == 'degrees' else x)\n",
    "update_type": "modify-output-semantics", "function_path": "math.sin", "package": "math",
    "update_id": "[math.sin]:[modify-output-semantics]:[update-0]",
}
SOLUTION = ("from typing import List, Tuple\nimport numpy as np\n\n"
            "def sines(xs: List[int]) -> List[Tuple[int, float]]:\n"
            "    # one pair per angle\n    return [(x, math.sin(x, unit='degrees')) for x in xs]\n")
TESTS = "def test_one():\n    assert sines([0]) == [(0, 0.0)]\n\ndef test_two():\n    assert sines([]) == []\n"


def _row(**example_fields) -> dict:
    example = {"scenario": "s", "problem": "Return the sines.", "solution_signature": "def sines(xs: List[int]) -> "
               "List[Tuple[int, float]]:", "unit_tests": TESTS, "prog_syn_imports": UPDATE["imports"],
               "ref_solution": SOLUTION, "prog_syn_id": "p0"}
    example.update(example_fields)
    return {"update": UPDATE, "prog_syn_examples": [example]}


@pytest.mark.parametrize("signature", [
    "def sines(xs: List[int]) -> List[Tuple[int, float]]:",  # as written
    "function sines(xs: List[int]) -> List[Tuple[int, float]]",  # another language's keyword, no colon
    "def sines(xs: list) -> list:",  # other annotations
    "sines(xs, /)",  # a bare call shape
])
def test_split_keeps_the_prelude_and_takes_the_solutions_own_header(signature):
    parts = split_solution(SOLUTION, signature)
    assert parts.prelude == "from typing import List, Tuple\nimport numpy as np\n\n"
    assert parts.header == "def sines(xs: List[int]) -> List[Tuple[int, float]]:"
    assert parts.body == "\n    # one pair per angle\n    return [(x, math.sin(x, unit='degrees')) for x in xs]"
    assert parts.prelude + join_solution(parts.header, parts.body) == SOLUTION.rstrip()


def test_split_headers_with_colons_inside_decorators_and_one_line_bodies():
    source = ("import functools\n\n@functools.lru_cache(maxsize=None)\n"
              "def pick(table: dict[str, int] = {'a': 1}, key=lambda k: k[1:]) -> int: return table['a']\n\n"
              "def helper():\n    return 2\n")
    parts = split_solution(source, "def pick(table, key) -> int:")
    assert parts.prelude == "import functools\n\n"
    assert parts.header.startswith("@functools.lru_cache(maxsize=None)\ndef pick(")
    assert parts.header.endswith("k[1:]) -> int:")
    assert parts.body == "return table['a']\n\ndef helper():\n    return 2"  # helpers after it stay in the body


def test_prompt_target_and_program_of_a_real_shaped_example():
    [record] = parse_code_update_rows([_row()], "arena.jsonl", train_examples=0)
    [probe] = record.probes
    assert probe.prompt == "Return the sines.\nfrom typing import List, Tuple\nimport numpy as np\n\n" \
                           "def sines(xs: List[int]) -> List[Tuple[int, float]]:"
    assert probe.target.startswith("\n    # one pair per angle")
    program = probe.program
    assert program.imports == UPDATE["imports"]  # the example's imports equal the update's: run once
    assert program.solution_imports == "from typing import List, Tuple\nimport numpy as np\n\n"
    assert program.unit_tests == ("def test_one():\n    assert sines([0]) == [(0, 0.0)]",
                                  "def test_two():\n    assert sines([]) == []\n")


def test_example_imports_that_differ_from_the_updates_run_after_them():
    [record] = parse_code_update_rows([_row(prog_syn_imports="import math\nimport numpy")], "arena.jsonl", 0)
    assert record.probes[0].program.imports == UPDATE["imports"] + "\nimport math\nimport numpy"


@pytest.mark.parametrize("fields, field, expected", [
    ({"ref_solution": "import math\n\ndef other(xs):\n    return xs\n"}, "prog_syn_examples[0].ref_solution",
     ("a solution defining the function of solution_signature 'def sines(xs: List[int]) -> List[Tuple[int, "
      "float]]:' (no top-level function 'sines' (named by the signature) among ['other'])")),
    ({"ref_solution": "def sines(xs:\n    return xs\n"}, "prog_syn_examples[0].ref_solution", "Python source"),
    ({"solution_signature": "sines = 3"}, "prog_syn_examples[0].solution_signature",
     "a function signature such as 'def f(x):'"),
    ({"unit_tests": "def check_one():\n    assert sines([0])\n"}, "prog_syn_examples[0].unit_tests",
     "at least one test function (def test...)"),
    ({"unit_tests": ["assert sines([]) == []"]}, "prog_syn_examples[0].unit_tests", "at least one test function"),
])
def test_bad_examples_are_errors_naming_file_record_and_field(fields, field, expected):
    with pytest.raises(RecordError) as caught:
        parse_code_update_rows([_row(**fields)], "arena.jsonl", 0)
    message = str(caught.value)
    assert message.startswith(f"arena.jsonl: record 0: field '{field}': expected ")
    assert expected in message


def test_hub_rows_give_the_same_program(tmp_path):
    grouped = parse_code_update_rows([_row()], "arena.jsonl", 0)[0].probes[0]
    example = _row()["prog_syn_examples"][0]
    hub_row = {"update": UPDATE, "update_id": UPDATE["update_id"], **{k: v for k, v in example.items()
                                                                       if k != "prog_syn_imports"},
               "imports": example["prog_syn_imports"]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(hub_row) + "\n")
    [record] = CodeUpdateDataModule(str(path), train_examples=0, shuffle_seed=None).load_records()
    assert record.probes[0] == grouped
