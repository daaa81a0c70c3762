"""Reading benchmark files and validating their records, with errors that say where and what.

Every error names the source (file path or hub id), the record index (0-based; the line number for
JSONL), the field (dotted path) and what was expected, so a user with a 20 000-record file can fix it.
The normalised records all benchmarks turn into (:class:`EditRecord`) are defined here too, because they
are the contract between the format readers and everything downstream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class DataFormatError(ValueError):
    """A benchmark file or record that cannot be read as the format it claims to be."""


class RecordError(DataFormatError):
    """One record's field is missing or malformed; ``label`` names the record as its benchmark does
    (e.g. ``case_id 17``), next to its index."""

    def __init__(self, source: str, index: int, field_path: str, expected: str, got: Any = None,
                 label: str = "") -> None:
        shown = "missing" if got is _MISSING else f"got {_preview(got)}"
        record = f"record {index} ({label})" if label else f"record {index}"
        super().__init__(f"{source}: {record}: field '{field_path}': expected {expected}, {shown}")
        self.source, self.index, self.field_path = source, index, field_path


_MISSING = object()


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list (``.json``) or JSON lines (``.jsonl``) file of objects."""
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(f"{path}: is a directory; expected a .json or .jsonl file of records")
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})") from None
    if path.suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(_parse_json(line, f"{path}: line {line_number}"))
    else:
        records = _parse_json(text, str(path))
        if not isinstance(records, list):
            raise DataFormatError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise RecordError(str(path), index, "<record>", "a JSON object", record)
    return records


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        ends_early = err.pos >= len(text.rstrip()) or not text.rstrip().endswith(("]", "}"))
        hint = " (the file looks truncated)" if ends_early else ""
        raise DataFormatError(f"{where}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}{hint}") from None


class RecordReader:
    """Typed access to one record's fields; every failure becomes a :class:`RecordError`."""

    def __init__(self, source: str, index: int, record: dict[str, Any], prefix: str = "", label: str = "") -> None:
        self.source, self.index, self.record, self.prefix, self.label = source, index, record, prefix, label

    def error(self, field_path: str, expected: str, got: Any = _MISSING) -> RecordError:
        return RecordError(self.source, self.index, self.prefix + field_path, expected, got, self.label)

    def has(self, field_path: str) -> bool:
        return self._lookup(field_path) is not _MISSING

    def _lookup(self, field_path: str) -> Any:
        value: Any = self.record
        for key in field_path.split("."):
            if not isinstance(value, dict) or key not in value:
                return _MISSING
            value = value[key]
        return value

    def get(self, field_path: str, check: Callable[[Any], bool], expected: str) -> Any:
        value = self._lookup(field_path)
        if value is _MISSING or not check(value):
            raise self.error(field_path, expected, value)
        return value

    def string(self, field_path: str, allow_empty: bool = False) -> str:
        expected = "a string" if allow_empty else "a non-empty string"
        return self.get(field_path, lambda v: isinstance(v, str) and (allow_empty or v.strip() != ""), expected)

    def template(self, field_path: str) -> str:
        """A prompt with exactly one ``{}`` where the subject goes."""
        text = self.string(field_path)
        if text.count("{}") != 1:
            raise self.error(field_path, "a prompt with exactly one '{}' for the subject", text)
        return text

    def strings(self, field_path: str, allow_empty_list: bool = False) -> list[str]:
        expected = "a list of non-empty strings" + ("" if allow_empty_list else " (at least one)")
        value = self.get(field_path, lambda v: isinstance(v, list), expected)
        if not value and not allow_empty_list:
            raise self.error(field_path, expected, value)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise self.error(f"{field_path}[{i}]", "a non-empty string", item)
        return value

    def objects(self, field_path: str, allow_empty_list: bool = False) -> list[dict[str, Any]]:
        expected = "a list of objects" + ("" if allow_empty_list else " (at least one)")
        value = self.get(field_path, lambda v: isinstance(v, list), expected)
        if not value and not allow_empty_list:
            raise self.error(field_path, expected, value)
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"{field_path}[{i}]", "an object", item)
        return value

    def obj(self, field_path: str, expected: str = "an object") -> dict[str, Any]:
        return self.get(field_path, lambda v: isinstance(v, dict), expected)

    def answer(self, field_path: str) -> str:
        """An answer given as a string or as a list of aliases, possibly nested one level as KnowEdit writes
        them (``"genus"``, ``["genus"]``, ``[["genus", "genera"]]``): the first alias is the one scored."""
        value = self._lookup(field_path)
        first = value
        for _ in range(2):
            first = first[0] if isinstance(first, list) and first else first
        if not isinstance(first, str) or not first.strip():
            raise self.error(field_path, "a non-empty string or a list of them (aliases; the first is scored)", value)
        return first

    def child(self, value: dict[str, Any], field_path: str) -> "RecordReader":
        """A reader for a nested object (e.g. one list item) whose errors still name the full path."""
        return RecordReader(self.source, self.index, value, f"{self.prefix}{field_path}.", self.label)


# ---- the normalised records every benchmark turns into -------------------------------------------------

PROBE_KINDS = ("efficacy", "paraphrase", "neighborhood", "locality", "portability", "program", "hop")

# KnowEdit's sub-kinds as its files spell them, and the probe group each becomes (its own metrics)
PORTABILITY_GROUPS = {"Reasoning": "reasoning", "Subject_Aliasing": "subject_aliasing",
                      "Logical_Generalization": "logical_generalization"}
LOCALITY_GROUPS = {"Relation_Specificity": "relation_specificity", "Forgetfulness": "forgetfulness"}
ONE_HOP = "one_hop"  # EasyEdit's own portability field ({"New Question", "New Answer"}), named as EasyEdit does
# MQuAKE's questions (hop probes), each group scored per case (lit_corsa.evaluation.CASE_METRICS): an edit's
# own prompt, a single hop of the edited chain, a multi-hop question
HOP_GROUPS = ("edit", "single_hop", "multi_hop")
# the groups a probe of each kind may carry ("" = none): portability and hop probes always name theirs
PROBE_GROUPS = {"portability": (*PORTABILITY_GROUPS.values(), ONE_HOP), "locality": ("", *LOCALITY_GROUPS.values()),
                "hop": HOP_GROUPS}


@dataclass(frozen=True)
class ProgramTest:
    """What it takes to run a generated solution against its unit tests with an API update patched in."""

    imports: str
    implementation: str
    function_path: str
    solution_imports: str
    solution_signature: str
    unit_tests: tuple[str, ...]
    update_type: str = ""  # CodeUpdateArena's; "modify-function-name" removes the old name when patching


@dataclass(frozen=True)
class Probe:
    """One evaluation question: after the edit, ``target`` should be the answer (and be preferred over
    ``contrast`` when there is one). Efficacy and paraphrase probes target the new answer, neighbourhood
    probes keep the old one, locality probes keep whatever the model answered before, portability probes
    ask a question whose answer follows from the edit (``target`` is that answer, once the edit holds).
    ``group`` is the benchmark's sub-kind (:data:`PROBE_GROUPS`), scored on its own as well. Hop probes
    (MQuAKE) are answered by greedy generation, which may give ``target`` or one of its ``aliases``, and
    are scored per ``case`` (the benchmark's case id): a case's probes of a group count together."""

    kind: str
    prompt: str
    target: str
    contrast: str | None = None
    program: ProgramTest | None = None
    group: str = ""
    aliases: tuple[str, ...] = ()
    case: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"unknown probe kind {self.kind!r}; known: {PROBE_KINDS}")
        groups = PROBE_GROUPS.get(self.kind, ("",))
        if self.group not in groups:
            raise ValueError(f"probe kind {self.kind!r} has groups {groups}, not {self.group!r}")
        if (self.kind == "hop") != (self.case is not None):
            raise ValueError(f"hop probes, and only they, are scored per case; got kind {self.kind!r}, case {self.case!r}")
        if self.aliases and self.kind != "hop":
            raise ValueError(f"answer aliases are matched in hop probes' generations only, not in {self.kind!r} probes")


def grouped_probes(reader: RecordReader, field_path: str, kind: str, groups: dict[str, str]) -> list[Probe]:
    """KnowEdit's ``{sub-kind: [{prompt, ground_truth}, ...]}`` objects (its ``locality`` and ``portability``),
    one probe per item, grouped by sub-kind; an unknown sub-kind is an error rather than silently unscored."""
    shape = f"an object {{{' | '.join(groups)}: [{{prompt, ground_truth}}, ...]}}"
    probes = []
    for name in reader.obj(field_path, shape):
        if name not in groups:
            raise reader.error(field_path, f"KnowEdit's {kind} sub-kinds as keys ({', '.join(groups)})", name)
        for i, item in enumerate(reader.objects(f"{field_path}.{name}", allow_empty_list=True)):
            entry = reader.child(item, f"{field_path}.{name}[{i}]")
            probes.append(Probe(kind, entry.string("prompt"), entry.answer("ground_truth"), group=groups[name]))
    return probes


def portability_probes(reader: RecordReader) -> list[Probe]:
    """A record's ``portability`` field, in either shape it comes in: EasyEdit's ``{"New Question", "New
    Answer"}`` (its ZsRE and CounterFact portability files; group ``one_hop``) or KnowEdit's
    ``{Reasoning | Subject_Aliasing | Logical_Generalization: [{prompt, ground_truth}]}``; none without one."""
    if not reader.has("portability"):
        return []
    field_value = reader.obj("portability", "an object: EasyEdit's {New Question, New Answer} or KnowEdit's "
                                            f"{{{' | '.join(PORTABILITY_GROUPS)}: [...]}}")
    if "New Question" in field_value or "New Answer" in field_value:
        return [Probe("portability", reader.string("portability.New Question"), reader.answer("portability.New Answer"),
                      group=ONE_HOP)]
    return grouped_probes(reader, "portability", "portability", PORTABILITY_GROUPS)


@dataclass(frozen=True)
class EditRequest:
    """One training triple: the prompt, the answer to teach, and the answer it replaces (if known)."""

    prompt: str
    target_new: str
    target_old: str | None


@dataclass(frozen=True)
class EditRecord:
    """One edit of a benchmark, normalised: what to train on and how to score it."""

    record_id: str
    subject: str
    requests: tuple[EditRequest, ...]
    probes: tuple[Probe, ...] = field(default=())
