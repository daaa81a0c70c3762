"""Write the world's edit sets and task data in the real benchmark formats.

CounterFact (ROME's ``counterfact.json`` layout), ZsRE (MEND's ``zsre_mend_eval.json`` layout) and
CodeUpdateArena (the repo's grouped ``arena.jsonl`` layout) are written exactly as the real files are,
so the DataModules read the world's files and the real ones through the same code. The task-QA set
(questions + answers, split into calibration and evaluation facts) and the general-text corpus feed TaCQ.
Records are a pure function of the world and a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from data.world import Fact, World
from lit_common.sources import WORLD_FILES


def _object_id(world: World, relation_id: str, obj: str) -> str:
    """A stable Wikidata-style id ("Q1203") for an object of the world."""
    rel_index = list(world.relations).index(relation_id)
    return f"Q{1000 + 100 * rel_index + world.relations[relation_id].objects.index(obj)}"


def _pick_edits(world: World, rng: random.Random, count: int) -> list[tuple[Fact, str]]:
    """``count`` facts on distinct subjects where possible, each with a new (different) object."""
    facts = list(world.facts)
    rng.shuffle(facts)
    chosen: list[Fact] = []
    used_subjects: set[str] = set()
    for fact in facts:  # first pass: one edit per subject, as in CounterFact
        if fact.subject not in used_subjects:
            chosen.append(fact)
            used_subjects.add(fact.subject)
    first_pass = set(chosen)
    chosen += [f for f in facts if f not in first_pass]
    if count > len(chosen):
        raise ValueError(f"asked for {count} edits, the world has {len(chosen)} facts")
    edits = []
    for fact in chosen[:count]:
        alternatives = [o for o in world.relations[fact.relation_id].objects if o != fact.object]
        edits.append((fact, rng.choice(alternatives)))
    return edits


def counterfact_records(world: World, count: int, seed: int = 0, neighbours: int = 5) -> list[dict[str, Any]]:
    """CounterFact records: the edit prompt is a template the model saw for this fact; the paraphrases
    are its held-out template plus another seen one; neighbours share the subject's true object."""
    rng = random.Random(seed)
    records = []
    for case_id, (fact, new_object) in enumerate(_pick_edits(world, rng, count)):
        relation = world.relations[fact.relation_id]
        seen = world.seen_templates(fact)
        prompt = rng.choice(seen)
        other_seen = [t for t in seen if t != prompt]
        paraphrases = [world.heldout_template(fact).format(fact.subject), rng.choice(other_seen).format(fact.subject)]

        def prompts_about(subjects: list[str]) -> list[str]:
            picked = rng.sample(subjects, min(neighbours, len(subjects)))
            return [rng.choice(relation.templates).format(s) for s in picked]

        neighbourhood = prompts_about([s for s in world.subjects_with(fact.relation_id, fact.object) if s != fact.subject])
        attributes = prompts_about(world.subjects_with(fact.relation_id, new_object))
        other_relations = [r for rid, r in world.relations.items() if rid != fact.relation_id]
        generation = [rng.choice(r.templates).format(fact.subject) for r in rng.sample(other_relations, 3)]
        records.append({
            "case_id": case_id,
            "pararel_idx": case_id,
            "requested_rewrite": {
                "prompt": prompt,
                "relation_id": fact.relation_id,
                "target_new": {"str": new_object, "id": _object_id(world, fact.relation_id, new_object)},
                "target_true": {"str": fact.object, "id": _object_id(world, fact.relation_id, fact.object)},
                "subject": fact.subject,
            },
            "paraphrase_prompts": paraphrases,
            "neighborhood_prompts": neighbourhood,
            "attribute_prompts": attributes,
            "generation_prompts": generation,
        })
    return records


def zsre_records(world: World, count: int, seed: int = 1) -> list[dict[str, Any]]:
    """ZsRE (MEND) records: src and rephrase are the relation's two questions; the locality question
    asks an unrelated fact of another subject."""
    rng = random.Random(seed)
    records = []
    for fact, new_object in _pick_edits(world, rng, count):
        questions = world.relations[fact.relation_id].questions
        unrelated = rng.choice([f for f in world.facts if f.subject != fact.subject])
        src = questions[0].format(fact.subject)
        records.append({
            "subject": fact.subject,
            "src": src,
            "pred": fact.object,
            "rephrase": questions[1].format(fact.subject),
            "alt": new_object,
            "answers": [fact.object],
            "loc": rng.choice(world.relations[unrelated.relation_id].questions).format(unrelated.subject),
            "loc_ans": unrelated.object,
            "cond": f"{fact.object} >> {new_object} || {src}",
        })
    return records


def code_update_records(world: World) -> list[dict[str, Any]]:
    """CodeUpdateArena grouped records (``{"update": ..., "prog_syn_examples": [...]}``). Each example
    also carries ``old_solution`` (the same program with the old API), an extension the real files lack,
    used as the rejected answer of the margin loss."""
    records = []
    for update in world.code_updates:
        examples = [
            {
                "scenario": example.scenario,
                "problem": example.problem,
                "solution_signature": example.solution_signature,
                "unit_tests": "\n".join(example.unit_tests),
                "prog_syn_imports": f"import {update.package}",
                "ref_solution": example.ref_solution,
                "old_solution": example.old_solution,
                "prog_syn_id": f"[{update.function_path}]:[{update.update_type}]:[update-0]:[prog_syn-{i}]",
            }
            for i, example in enumerate(update.examples)
        ]
        records.append({
            "update": {
                "description": update.description,
                "rationale": update.rationale,
                "docstring": update.docstring,
                "signature": update.signature,
                "imports": update.imports,
                "implementation": update.implementation,
                "update_type": update.update_type,
                "function_path": update.function_path,
                "package": update.package,
                "update_id": update.update_id,
            },
            "prog_syn_examples": examples,
        })
    return records


def task_qa_records(world: World, calibration_fraction: float = 0.75, seed: int = 2) -> list[dict[str, Any]]:
    """Question-answer items over every fact, split by subject into calibration and evaluation facts
    (as TaCQ splits each MMLU subject 75/25), so evaluation asks about facts calibration never saw."""
    rng = random.Random(seed)
    subjects = list(world.subjects)
    rng.shuffle(subjects)
    calibration = set(subjects[: round(calibration_fraction * len(subjects))])
    records = []
    for fact in world.facts:
        question = rng.choice(world.relations[fact.relation_id].questions)
        records.append({
            "prompt": question.format(fact.subject),
            "answer": fact.object,
            "subject": fact.subject,
            "relation_id": fact.relation_id,
            "split": "calibration" if fact.subject in calibration else "evaluation",
        })
    return records


def write_world_files(world: World, out_dir: Path, num_edits: int = 200) -> dict[str, Path]:
    """Write every benchmark file of the world to ``out_dir`` (atomically per file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "counterfact": json.dumps(counterfact_records(world, num_edits), indent=1, ensure_ascii=False),
        "zsre": json.dumps(zsre_records(world, num_edits), indent=1, ensure_ascii=False),
        "code_update": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in code_update_records(world)),
        "task_qa": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in task_qa_records(world)),
        "corpus": "".join(text + "\n" for text in world.pretraining_texts()),
    }
    paths = {}
    for key, text in contents.items():
        path = out_dir / WORLD_FILES[key]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        paths[key] = path
    return paths
