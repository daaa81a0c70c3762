"""Code API updates in CodeUpdateArena's two layouts: grouped (``{"update", "prog_syn_examples"}`` per
line, the repo's ``arena.jsonl``) and hub rows (one program-synthesis example per row, with its
``update``; ``leo-liuzy/CodeUpdateArena``), which are grouped back by ``update.update_id``.

One edit = one API update. Its first ``train_examples`` program-synthesis examples are the training
requests (prompt = problem + what precedes the reference solution's function, its imports, and its
``def`` header; new answer = the function's body, see :func:`split_solution`); the rest
are ``program`` probes, scored by Pass@k of generated bodies against their unit tests with the updated
function patched in. The answer a request replaces comes from the example's ``old_solution`` when the
file has it (the embedded world writes it; the real files do not, and such requests train without the
margin term).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from data.base import EditDataModule
from data.formats import (
    EditRecord,
    EditRequest,
    Probe,
    ProgramTest,
    RecordError,
    RecordReader,
)


@dataclass(frozen=True)
class SolutionParts:
    """A reference solution cut where a model takes over: ``prelude`` (what precedes the function, e.g.
    ``from typing import List``; shown in the prompt and run before the function), ``header`` (the ``def``
    line as the solution writes it) and ``body`` (what a model must generate).
    ``prelude + join_solution(header, body)`` is the reference solution again."""

    prelude: str
    header: str
    body: str


def signature_name(signature: str) -> str:
    """The function a signature names: its first identifier followed by ``(`` (the real files also write
    ``function f(x)``, ``f(x, /) -> T`` or a ``def`` without its colon)."""
    match = re.search(r"([A-Za-z_]\w*)\s*\(", signature)
    if match is None:
        raise ValueError(f"no function name followed by '(' in {signature!r}")
    return match[1]


def _header_end(source: str, start: int) -> int:
    """Offset just after the colon that ends the ``def`` header starting at ``start`` (the first ``:``
    outside brackets: annotations, defaults and lambdas keep theirs inside)."""
    depth, line_starts = 0, [0] + [match.end() for match in re.finditer("\n", source[start:])]
    for token in tokenize.generate_tokens(io.StringIO(source[start:]).readline):
        if token.type != tokenize.OP:
            continue
        if token.string in ("(", "[", "{"):
            depth += 1
        elif token.string in (")", "]", "}"):
            depth -= 1
        elif token.string == ":" and depth == 0:
            row, col = token.end
            return start + line_starts[row - 1] + col
    raise ValueError("the function header has no closing ':'")


def split_solution(solution: str, signature: str) -> SolutionParts:
    """Cut ``solution`` at the top-level function that ``signature`` names, found by name in the parsed
    source (the real files' signatures often differ from the solution's own header: another annotation,
    an extra default, ``function`` for ``def``). ValueError when the solution does not define it.

    A body on the header's line (``def f(x): return x``) is stripped; an indented block keeps its leading
    newline and indentation. Whatever follows the function (helpers) belongs to the body."""
    name = signature_name(signature)
    solution = solution.replace("\r\n", "\n").replace("\r", "\n")  # lines as ast and tokenize count them
    tree = ast.parse(solution)
    node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name),
                None)
    if node is None:
        defined = _top_level_functions(solution)
        raise ValueError(f"no top-level function {name!r} (named by the signature) among {defined}")
    line_offsets = [0] + [match.end() for match in re.finditer("\n", solution)]
    start = line_offsets[min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1]
    end = _header_end(solution, line_offsets[node.lineno - 1])
    rest = solution[end:].rstrip()
    one_line = node.body[0].lineno == solution[:end].count("\n") + 1
    return SolutionParts(solution[:start], solution[start:end], rest.strip() if one_line else rest)


def solution_body(solution: str, signature: str) -> str:
    """What follows the header of the function ``signature`` names (the part a model must generate)."""
    return split_solution(solution, signature).body


def join_solution(signature: str, body: str) -> str:
    """Signature + generated body as a program (a one-line body goes on the signature's line)."""
    return signature + (body if body[:1] in ("\n", " ", "\t") else " " + body)


def split_unit_tests(tests: str | list[str]) -> tuple[str, ...]:
    """Tests come as a list of function sources or as one string of functions separated by blank lines."""
    if isinstance(tests, list):
        return tuple(tests)
    return tuple(t for t in re.split(r"\n\s*\n(?=def |@)", tests) if t.strip())


def _top_level_functions(source: str) -> list[str]:
    return [node.name for node in ast.parse(source).body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_function_names(unit_tests: Sequence[str]) -> list[str]:
    """The ``test*`` functions a check program calls, in order (raises SyntaxError on invalid source)."""
    return [name for source in unit_tests for name in _top_level_functions(source) if name.startswith("test")]


def replacing_function(implementation: str, function_path: str) -> str:
    """The function of an update's implementation that replaces ``function_path``: the one with the path's
    last name, else the only function defined (a new or renamed API). ValueError when neither exists."""
    defined = _top_level_functions(implementation)
    old_name = function_path.rpartition(".")[2]
    if old_name in defined:
        return old_name
    if len(defined) == 1:
        return defined[0]
    raise ValueError(f"cannot tell which of the functions {defined} replaces {function_path}")


def _python(reader: RecordReader, field_path: str, value: str) -> str:
    """Dataset-supplied code must at least parse: found now, not after a round of training."""
    try:
        ast.parse(value)
    except SyntaxError as err:
        raise reader.error(field_path, f"Python source (line {err.lineno}: {err.msg})", value) from None
    return value


def _unit_tests(reader: RecordReader, field_path: str) -> tuple[str, ...]:
    value = reader.get(field_path, lambda v: isinstance(v, (str, list)) and len(v) > 0,
                       "test sources (a non-empty string or list of strings)")
    if isinstance(value, list):
        reader.strings(field_path)
    tests = split_unit_tests(value)
    for i, source in enumerate(tests):
        _python(reader, f"{field_path}[{i}]" if isinstance(value, list) else field_path, source)
    if not test_function_names(tests):
        raise reader.error(field_path, "at least one test function (def test...): without one every solution "
                           "would pass", value)
    return tests


def _parse_update(reader: RecordReader) -> dict[str, str]:
    update = reader.child(reader.get("update", lambda v: isinstance(v, dict), "an object"), "update")
    fields = ("update_id", "function_path", "docstring", "imports", "implementation")
    parsed = {name: update.string(name) for name in fields}
    parsed["update_type"] = update.string("update_type") if update.has("update_type") else ""
    if "." not in parsed["function_path"]:
        raise update.error("function_path", "a dotted path such as 'math.sin'", parsed["function_path"])
    for name in ("imports", "implementation"):
        _python(update, name, parsed[name])
    try:
        replacing_function(parsed["implementation"], parsed["function_path"])
    except ValueError as err:
        raise update.error("implementation", f"a function replacing {parsed['function_path']} ({err})",
                           parsed["implementation"]) from None
    return parsed


def _solution(reader: RecordReader, field_path: str, signature: str) -> SolutionParts:
    source = _python(reader, field_path, reader.string(field_path))
    try:
        return split_solution(source, signature)
    except ValueError as err:
        raise reader.error(field_path, f"a solution defining the function of solution_signature {signature!r} "
                           f"({err})", source) from None


def _parse_example(reader: RecordReader, update: dict[str, str]) -> tuple[EditRequest, Probe]:
    """Prompt = problem + the reference's prelude and header; target = its body. The check program runs
    the update's imports and then the example's (``prog_syn_imports``; in the real files the same text,
    run once) before the update is installed, so ``old_<name> = <path>`` binds the old function."""
    problem, signature = reader.string("problem"), reader.string("solution_signature")
    try:
        signature_name(signature)
    except ValueError:
        raise reader.error("solution_signature", "a function signature such as 'def f(x):'", signature) from None
    reference = _solution(reader, "ref_solution", signature)
    old = _solution(reader, "old_solution", signature).body if reader.has("old_solution") else None
    imports_field = "prog_syn_imports" if reader.has("prog_syn_imports") else "imports"
    example_imports = (_python(reader, imports_field, reader.string(imports_field, allow_empty=True))
                       if reader.has(imports_field) else "")
    program = ProgramTest(
        imports="\n".join(dict.fromkeys(text for text in (update["imports"], example_imports) if text.strip())),
        implementation=update["implementation"],
        function_path=update["function_path"],
        solution_imports=reference.prelude,
        solution_signature=reference.header,
        unit_tests=_unit_tests(reader, "unit_tests"),
        update_type=update["update_type"],
    )
    prompt = f"{problem}\n{reference.prelude}{reference.header}"
    return (EditRequest(prompt, reference.body, old),
            Probe("program", prompt, reference.body, old, program))


def _record(update: dict[str, str], examples: list[tuple[EditRequest, Probe]], train_examples: int) -> EditRecord:
    trained, held_out = examples[:train_examples], examples[train_examples:]
    return EditRecord(
        record_id=f"code:{update['update_id']}",
        subject=update["function_path"],
        requests=tuple(request for request, _ in trained),
        probes=(*(Probe("efficacy", r.prompt, r.target_new, r.target_old) for r, _ in trained),
                *(probe for _, probe in held_out)),
    )


def parse_code_update_rows(rows: list[dict[str, Any]], source: str, train_examples: int = 2) -> list[EditRecord]:
    """Grouped records or hub rows (all rows one layout); every update needs more than ``train_examples``
    examples so that something is left to evaluate."""
    grouped: dict[str, tuple[dict[str, str], list[tuple[EditRequest, Probe]], int]] = {}
    for index, row in enumerate(rows):
        reader = RecordReader(source, index, row)
        update = _parse_update(reader)
        if "prog_syn_examples" in row:
            items = reader.objects("prog_syn_examples")
            examples = [_parse_example(reader.child(item, f"prog_syn_examples[{i}]"), update) for i, item in enumerate(items)]
        elif "problem" in row:
            examples = [_parse_example(reader, update)]
        else:
            raise reader.error("prog_syn_examples", "a list of program-synthesis examples (grouped layout) "
                               "or the example's fields at top level (hub rows)")
        entry = grouped.setdefault(update["update_id"], (update, [], index))
        entry[1].extend(examples)
    records = []
    for update, examples, first_index in grouped.values():
        if len(examples) <= train_examples:
            raise RecordError(source, first_index, "prog_syn_examples",
                              f"more than train_examples={train_examples} examples for update {update['update_id']}",
                              len(examples))
        records.append(_record(update, examples, train_examples))
    return records


class CodeUpdateDataModule(EditDataModule):
    """API-update edits (``source``: an ``arena.jsonl``-style file, ``leo-liuzy/CodeUpdateArena``, or
    ``world:code_update``)."""

    hub_split = "test"

    def __init__(self, *args: Any, train_examples: int = 2, append_eos: bool = True, max_length: int = 1024,
                 **kwargs: Any) -> None:
        # generated programs are executed, so an edited model must learn to stop after the solution.
        # max_length: prompts are never cut (an example that does not fit is an error naming it); real
        # examples run to 833 tokens (SmolLM2's tokenizer, the first 70 updates of arena.jsonl; 132 of
        # their 289 exceed the other benchmarks' 256).
        super().__init__(*args, append_eos=append_eos, max_length=max_length, **kwargs)
        self.train_examples = train_examples

    def parse_rows(self, rows: list[dict[str, Any]], source: str) -> list[EditRecord]:
        return parse_code_update_rows(rows, source, self.train_examples)
