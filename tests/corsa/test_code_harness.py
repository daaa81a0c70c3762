"""The code-update scoring path, checked the way ``bench/code_harness.py`` checks the real files: every
reference solution of a fixture set shaped like CodeUpdateArena's records goes through exactly what scores
a generated body (reader -> ``run_solution``), next to the dataset's own check layout.

Each passing example stands for one way the path used to fail on the real files: imports before the
signature (``typing``, ``numpy``) dropped; ``old_sin = math.sin`` re-run after the update, which then calls
itself; ``import torch`` under a 512 MB limit; a ``solution_signature`` that is not the solution's own
header; a renamed function. Two examples must fail, each with its cause named: a package not installed
here and a wrong reference.
"""

from __future__ import annotations

import json

import pytest

from bench.code_harness import main as harness_main
from lit_corsa.sandbox import run_python
from lit_corsa.settings import EvaluationSettings

SIN_UPDATE = {
    "description": "Update the math.sin function to accept angle in degrees rather than radians.",
    "rationale": "Most people are used to working with degrees.",
    "docstring": "sin(x, unit='radians'): with unit='degrees' x is converted from degrees first.",
    "signature": "math.sin(x, unit='radians')",
    "imports": "import math\nimport random\nimport string\nold_sin = math.sin\nsetattr(math, 'old_sin', old_sin)",
    "implementation": "def sin(x, unit='radians'):\n    if unit == 'radians':\n        return old_sin(x)\n"
                      "    elif unit == 'degrees':\n        x = x * 3.141592653589793 / 180\n"
                      "        return old_sin(x)\n"
                      "    else:\n        raise ValueError(\"Unit must be either 'radians' or 'degrees'\")\n",
    "update_type": "modify-output-semantics",
    "function_path": "math.sin",
    "package": "math",
    "update_id": "[math.sin]:[modify-output-semantics]:[update-0]",
}

TORCH_UPDATE = {
    "description": "torch.clamp gains a scale applied after clamping.",
    "rationale": "Clamp-then-scale is a common pattern.",
    "docstring": "clamp(input, min=None, max=None, *, scale=1.0): the clamped tensor times scale.",
    "signature": "torch.clamp(input, min=None, max=None, *, scale=1.0)",
    "imports": "import torch\nold_clamp = torch.clamp\nsetattr(torch, 'old_clamp', old_clamp)",
    "implementation": "def clamp(input, min=None, max=None, *, scale=1.0):\n"
                      "    return old_clamp(input, min=min, max=max) * scale\n",
    "update_type": "add-argument",
    "function_path": "torch.clamp",
    "package": "torch",
    "update_id": "[torch.clamp]:[add-argument]:[update-0]",
}

RENAME_UPDATE = {
    "description": "math.gcd is renamed to math.greatest_common_divisor.",
    "rationale": "Spelled-out names read better.",
    "docstring": "greatest_common_divisor(a, b): what gcd returned.",
    "signature": "math.greatest_common_divisor(a, b)",
    "imports": "import math\nold_gcd = math.gcd\nsetattr(math, 'old_gcd', old_gcd)",
    "implementation": "def greatest_common_divisor(a, b):\n    return old_gcd(a, b)\n",
    "update_type": "modify-function-name",
    "function_path": "math.gcd",
    "package": "math",
    "update_id": "[math.gcd]:[modify-function-name]:[update-0]",
}


def _example(update: dict, index: int, signature: str, solution: str, tests: list[str]) -> dict:
    return {
        "scenario": "A tutor shows sine waves.", "problem": f"Problem {index}: write the function.",
        "solution_signature": signature, "unit_tests": "\n\n".join(tests), "prog_syn_imports": update["imports"],
        "ref_solution": solution, "prog_syn_id": f"{update['update_id']}:[prog_syn-{index}]",
    }


SINE_TESTS = [
    ("def test_sine_of_90():\n    result = calculate_sine_values([90])\n    import math\n"
     "    assert math.isclose(result[0][1], 1.0)\n"),
    "def test_empty():\n    assert calculate_sine_values([]) == []\n",
]
SINE_SOLUTION = ("from typing import List, Tuple\nimport math\n\n"
                 "def calculate_sine_values(degrees_list: List[int]) -> List[Tuple[float, float]]:\n"
                 "    results = []\n    for degree in degrees_list:\n"
                 "        results.append((degree, math.sin(degree, unit='degrees')))\n    return results\n")


def arena_records() -> list[dict]:
    """Three updates in the grouped ``arena.jsonl`` layout: five examples that must pass, two that must not."""
    sine = "def calculate_sine_values(degrees_list: List[int]) -> List[Tuple[float, float]]:"
    sin_examples = [
        _example(SIN_UPDATE, 0, sine, SINE_SOLUTION, SINE_TESTS),
        _example(SIN_UPDATE, 1, "def mean_sine(angles: List[float]) -> float:",
                 "import math\nimport numpy as np\nfrom typing import List\n\n"
                 "def mean_sine(angles: List[float]) -> float:\n"
                 "    return float(np.mean([math.sin(a, unit='degrees') for a in angles]))\n",
                 ["def test_mean():\n    assert abs(mean_sine([90, 270])) < 1e-9\n"]),
        # the dataset's signature is not the solution's header (as in 25 of the first 289 real examples)
        _example(SIN_UPDATE, 2, "function rounded_sine(angle: float) -> float",
                 "import math\n\ndef rounded_sine(angle: float, digits: int = 6) -> float:\n"
                 "    value = math.sin(angle, unit='degrees')\n    return round(value, digits)\n",
                 ["def test_rounded():\n    assert rounded_sine(30) == 0.5\n"]),
        _example(SIN_UPDATE, 3, "def needs_missing(x):",
                 "import not_installed_package_for_tests\n\ndef needs_missing(x):\n    return x\n",
                 ["def test_missing():\n    assert needs_missing(1) == 1\n"]),
        _example(SIN_UPDATE, 4, "def wrong_sine(x):", "import math\n\ndef wrong_sine(x):\n    return math.sin(x)\n",
                 ["def test_wrong():\n    assert math.isclose(wrong_sine(90), 1.0)\n"]),
    ]
    torch_example = _example(TORCH_UPDATE, 0, "def scaled_clip(values: torch.Tensor) -> torch.Tensor:",
                             "import torch\n\ndef scaled_clip(values: torch.Tensor) -> torch.Tensor:\n"
                             "    return torch.clamp(values, min=0.0, max=1.0, scale=2.0)\n",
                             [("def test_scaled_clip():\n    out = scaled_clip(torch.tensor([-1.0, 0.25, 3.0]))\n"
                               "    assert out.tolist() == [0.0, 0.5, 2.0]\n")])
    rename_example = _example(RENAME_UPDATE, 0, "def simplify(n: int, d: int) -> tuple:",
                              "import math\n\ndef simplify(n: int, d: int) -> tuple:\n"
                              "    g = math.greatest_common_divisor(n, d)\n    return n // g, d // g\n",
                              ["def test_simplify():\n    assert simplify(6, 8) == (3, 4)\n",
                               "def test_old_name_gone():\n    import math\n    assert not hasattr(math, 'gcd')\n"])
    return [{"update": SIN_UPDATE, "prog_syn_examples": sin_examples},
            {"update": TORCH_UPDATE, "prog_syn_examples": [torch_example]},
            {"update": RENAME_UPDATE, "prog_syn_examples": [rename_example]}]


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("arena")
    source = root / "arena.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in arena_records()))
    return harness_main([str(source), "--jobs", "2", "--out", str(root / "harness.json")])


def test_reference_solutions_pass_through_the_scoring_path(harness):
    by_id = {o["example"]: o for o in harness["examples"]}
    must_pass = ["code:[math.sin]:[modify-output-semantics]:[update-0]#0",  # typing imports before the def
                 "code:[math.sin]:[modify-output-semantics]:[update-0]#1",  # numpy imported as np
                 "code:[math.sin]:[modify-output-semantics]:[update-0]#2",  # signature is not the header
                 "code:[torch.clamp]:[add-argument]:[update-0]#0",  # import torch under the default limit
                 "code:[math.gcd]:[modify-function-name]:[update-0]#0"]  # renamed: old name deleted
    for example in must_pass:
        assert by_id[example]["passed"], (example, by_id[example]["cause"])
    assert by_id[must_pass[2]]["header_differs"]
    summary = harness["summary"]
    assert (summary["scoring_path_passed"], summary["dataset_check_passed"], summary["examples"]) == (5, 5, 7)
    assert summary["only_scoring_path_failed"] == summary["only_dataset_check_failed"] == 0


def test_failures_are_reported_with_their_cause(harness):
    by_id = {o["example"]: o for o in harness["examples"]}
    missing = by_id["code:[math.sin]:[modify-output-semantics]:[update-0]#3"]
    wrong = by_id["code:[math.sin]:[modify-output-semantics]:[update-0]#4"]
    assert missing["cause"] == missing["dataset_cause"] == "package not installed: not_installed_package_for_tests"
    assert (wrong["cause"], wrong["dataset_cause"]) == ("unit test: AssertionError", "program: AssertionError")
    assert missing["detail"] == "ModuleNotFoundError: No module named 'not_installed_package_for_tests'"
    assert by_id["code:[math.gcd]:[modify-function-name]:[update-0]#0"]["detail"] == ""
    assert harness["summary"]["scoring_path_failures"] == {
        "package not installed: not_installed_package_for_tests": 1, "unit test: AssertionError": 1}


def test_memory_limit_is_a_setting_and_binds():
    """512 MB (the old fixed limit) cannot import torch; the default can (the torch example above)."""
    result = run_python("import torch", timeout_s=30, memory_mb=512)
    out_of_memory = "MemoryError" in result.stderr or "cannot allocate memory" in result.stderr.lower()
    assert not result.passed and out_of_memory, result.stderr[-2000:]
    assert EvaluationSettings().sandbox_memory_mb >= 2048
    with pytest.raises(ValueError, match=r"model.evaluation.sandbox_memory_mb = 100 \(expected >= 256 MB"):
        EvaluationSettings(sandbox_memory_mb=100)
