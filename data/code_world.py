"""The world's code domain: fictitious updates to real ``math`` functions, CodeUpdateArena-style.

Each update adds a keyword argument to a standard-library function (``math.comb(n, k, repetition=True)``)
and comes with one-line program-synthesis problems that need it, each with unit tests whose expected
values are computed here from the updated semantics. The world model is pretrained on programs that use
the *old* API, so an edit has something to overwrite. Programs are single lines
(``def solve(n, k): return math.comb(n, k)``) so that a word-level tokenizer's space-joined decoding is
still valid Python.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ProgramExample:
    """One program-synthesis problem: the new-API reference solution, the old-API one, and tests."""

    scenario: str
    problem: str
    solution_signature: str
    ref_solution: str
    old_solution: str
    unit_tests: tuple[str, ...]


@dataclass(frozen=True)
class CodeUpdate:
    """A fictitious API update in CodeUpdateArena's fields, plus its problems and old-API texts."""

    function_path: str
    signature: str
    description: str
    rationale: str
    docstring: str
    implementation: str
    update_type: str
    examples: tuple[ProgramExample, ...]
    old_api_programs: tuple[str, ...]

    @property
    def package(self) -> str:
        return self.function_path.split(".")[0]

    @property
    def function_name(self) -> str:
        return self.function_path.split(".")[-1]

    @property
    def update_id(self) -> str:
        return f"[{self.function_path}]:[{self.update_type}]:[update-0]"

    @property
    def imports(self) -> str:
        """CodeUpdateArena's convention: keep the old function reachable as ``old_<name>``."""
        name = self.function_name
        return (f"import {self.package}\nold_{name} = {self.function_path}\n"
                f"setattr({self.package}, 'old_{name}', old_{name})")

    def pretraining_texts(self) -> list[str]:
        return list(self.old_api_programs)


@dataclass(frozen=True)
class _UpdateSpec:
    """How to write one update: the new keyword, its semantics, and problem phrasings."""

    function: str  # e.g. "comb"
    params: tuple[str, ...]  # positional parameters of solve(), e.g. ("n", "k")
    keyword: str  # the new keyword argument, e.g. "repetition=True"
    default: str  # its default, e.g. "repetition=False"
    description: str
    docstring: str
    implementation: str
    new_semantics: Callable[..., int]
    old_problems: tuple[str, ...]  # phrasings solved by the old call
    new_problems: tuple[str, ...]  # phrasings that need the keyword
    inputs: tuple[tuple[int, ...], ...]  # argument tuples for unit tests
    call_args: tuple[str, ...] | None = None  # positional arguments of the API call (default: all params)


def _multifactorial(n: int, step: int) -> int:
    return math.prod(range(n, 0, -step))


_SPECS: tuple[_UpdateSpec, ...] = (
    _UpdateSpec(
        "comb", ("n", "k"), "repetition=True", "repetition=False",
        "Let math.comb count combinations with repetition when asked.",
        "math.comb(n, k, repetition=False): with repetition=True returns the number of ways to choose k "
        "items from n kinds when kinds may repeat, i.e. comb(n + k - 1, k).",
        "def comb(n, k, repetition=False):\n    if repetition:\n        return old_comb(n + k - 1, k)\n"
        "    return old_comb(n, k)\n",
        lambda n, k: math.comb(n + k - 1, k),
        ("count the ways to pick k of n different {things}", "count the teams of k {things} out of n"),
        ("count the ways to fill a box with k {things} from n kinds when kinds may repeat",
         "count the bags of k {things} drawn from n flavours with repeats allowed"),
        ((3, 2), (5, 3), (4, 4)),
    ),
    _UpdateSpec(
        "factorial", ("n",), "step=2", "step=1",
        "Let math.factorial compute multifactorials through a step argument.",
        "math.factorial(n, step=1): returns n * (n - step) * (n - 2 * step) * ... over positive terms; "
        "step=2 gives the double factorial.",
        "def factorial(n, step=1):\n    result = 1\n    while n > 0:\n        result *= n\n        n -= step\n"
        "    return result\n",
        lambda n: _multifactorial(n, 2),
        ("count the orders in which n {things} can stand in a line", "compute the factorial of n {things}"),
        ("compute the double factorial of n {things}", "multiply every second count down from n {things}"),
        ((5,), (6,), (7,)),
    ),
    _UpdateSpec(
        "isqrt", ("n",), "round_up=True", "round_up=False",
        "Let math.isqrt round the square root up on request.",
        "math.isqrt(n, round_up=False): with round_up=True returns the smallest integer r with r * r >= n.",
        "def isqrt(n, round_up=False):\n    r = old_isqrt(n)\n    if round_up and r * r < n:\n"
        "        return r + 1\n    return r\n",
        lambda n: math.isqrt(n) + (math.isqrt(n) ** 2 < n),
        ("find the side of the largest square grid that n {things} can fill",
         "round down the square root of n {things}"),
        ("find the side of the smallest square grid that holds all n {things}",
         "round up the square root of n {things}"),
        ((10,), (16,), (27,)),
    ),
    _UpdateSpec(
        "gcd", ("a", "b"), "coprime=True", "coprime=False",
        "Let math.gcd answer whether two numbers are coprime.",
        "math.gcd(a, b, coprime=False): with coprime=True returns True when the greatest common divisor "
        "of a and b is 1, else False.",
        "def gcd(a, b, coprime=False):\n    g = old_gcd(a, b)\n    if coprime:\n        return g == 1\n"
        "    return g\n",
        lambda a, b: math.gcd(a, b) == 1,
        ("find the largest group size that splits a and b {things} evenly",
         "compute the greatest common divisor of a and b {things}"),
        ("tell whether a and b {things} share no common divisor above one",
         "check if a and b {things} are coprime"),
        ((4, 9), (6, 8), (7, 21)),
    ),
    _UpdateSpec(
        "prod", ("values",), "skip_zeros=True", "skip_zeros=False",
        "Let math.prod ignore zero entries on request.",
        "math.prod(iterable, skip_zeros=False): with skip_zeros=True multiplies only the non-zero items.",
        "def prod(iterable, start=1, skip_zeros=False):\n    if skip_zeros:\n"
        "        iterable = [x for x in iterable if x != 0]\n    return old_prod(iterable, start=start)\n",
        lambda values: math.prod(v for v in values if v != 0),
        ("multiply all the counts of {things} in values", "compute the product of the {things} in values"),
        ("multiply the counts of {things} in values but ignore the empty ones",
         "compute the product of the non zero counts of {things} in values"),
        (((2, 0, 3),), ((0, 5),), ((1, 2, 4),)),
    ),
    _UpdateSpec(
        "floor", ("x", "m"), "multiple=m", "multiple=1",
        "Let math.floor round down to a multiple.",
        "math.floor(x, multiple=1): returns the largest multiple of `multiple` that is <= x.",
        "def floor(x, multiple=1):\n    return old_floor(x / multiple) * multiple\n",
        lambda x, m: (x // m) * m,
        ("round x {things} down to a whole number", "drop the fraction of x {things}"),
        ("round x {things} down to a multiple of m", "pack x {things} into full crates of m and count them"),
        ((17, 5), (20, 4), (9, 10)),
        call_args=("x",),
    ),
    _UpdateSpec(
        "ceil", ("x", "m"), "multiple=m", "multiple=1",
        "Let math.ceil round up to a multiple.",
        "math.ceil(x, multiple=1): returns the smallest multiple of `multiple` that is >= x.",
        "def ceil(x, multiple=1):\n    return old_ceil(x / multiple) * multiple\n",
        lambda x, m: -(-x // m) * m,
        ("round x {things} up to a whole number", "lift x {things} to the next whole number"),
        ("round x {things} up to a multiple of m", "find how many {things} fill enough crates of m for x"),
        ((17, 5), (20, 4), (9, 10)),
        call_args=("x",),
    ),
    _UpdateSpec(
        "perm", ("n", "k"), "circular=True", "circular=False",
        "Let math.perm count circular arrangements.",
        "math.perm(n, k, circular=False): with circular=True counts arrangements of k of n items around "
        "a circle, i.e. perm(n, k) // k.",
        "def perm(n, k, circular=False):\n    p = old_perm(n, k)\n    if circular:\n        return p // k\n"
        "    return p\n",
        lambda n, k: math.perm(n, k) // k,
        ("count the ordered rows of k {things} taken from n", "count the ways to line up k of n {things}"),
        ("count the ways to seat k of n {things} around a round table",
         "count the circular arrangements of k {things} chosen from n"),
        ((5, 3), (4, 4), (6, 2)),
    ),
)

# Plain statements with the values the new keywords take, so that every token of a new-API solution
# has been read in pretraining (an LLM knows ``True`` and ``2``; only the update itself is new to it).
# Without them those tokens keep random embeddings that a LoRA on the Linear layers cannot reach.
KEYWORD_VALUE_TEXTS = ("done = True", "done = False", "step = 2", "step = 1")

_THINGS = ("apples", "stones", "coins", "books", "lamps", "birds", "ships", "cards")


def _problem(task: str) -> str:
    return f"Write solve so that it can {task}."


def _call(spec: _UpdateSpec, keyword: str | None) -> str:
    args = ", ".join((spec.call_args or spec.params) + ((keyword,) if keyword else ()))
    return f"math.{spec.function}({args})"


def _program(spec: _UpdateSpec, keyword: str | None) -> str:
    return f"def solve({', '.join(spec.params)}): return {_call(spec, keyword)}"


def _unit_tests(spec: _UpdateSpec) -> tuple[str, ...]:
    tests = []
    for i, args in enumerate(spec.inputs):
        expected = spec.new_semantics(*args)
        tests.append(f"def test_case_{i}():\n    assert solve({', '.join(map(repr, args))}) == {expected!r}\n")
    return tuple(tests)


def _build_update(spec: _UpdateSpec, rng: random.Random) -> CodeUpdate:
    things = rng.sample(_THINGS, len(_THINGS))
    signature = f"def solve({', '.join(spec.params)}):"
    examples = tuple(
        ProgramExample(
            scenario=f"You maintain a small script that must {phrasing.format(things=thing)}.",
            problem=_problem(phrasing.format(things=thing)),
            solution_signature=signature,
            ref_solution=_program(spec, spec.keyword),
            old_solution=_program(spec, None),
            unit_tests=_unit_tests(spec),
        )
        for phrasing in spec.new_problems
        for thing in things[4:6]
    )
    # Half the old-API programs spell the default out (``math.comb(n, k, repetition=False)``), as real
    # code does: pretraining then knows the keyword's tokens, and the update changes what they mean.
    old_programs = tuple(
        f"{_problem(phrasing.format(things=thing))} {_program(spec, spec.default if i % 2 else None)}"
        for phrasing in spec.old_problems
        for i, thing in enumerate(things[:4])
    )
    return CodeUpdate(
        function_path=f"math.{spec.function}",
        signature=f"math.{spec.function}({', '.join(spec.params)}, {spec.default})",
        description=spec.description,
        rationale="Callers kept re-implementing this variant by hand.",
        docstring=spec.docstring,
        implementation=spec.implementation,
        update_type="add-argument-semantics",
        examples=examples,
        old_api_programs=old_programs,
    )


def build_code_updates(rng: random.Random, count: int) -> list[CodeUpdate]:
    """The first ``count`` updates (at most ``len(_SPECS)``), with seeded problem wording."""
    if count > len(_SPECS):
        raise ValueError(f"the world defines {len(_SPECS)} code updates, {count} requested")
    return [_build_update(spec, rng) for spec in _SPECS[:count]]
