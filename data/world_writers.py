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

from data.world import CHAINS, OBJECT_RELATIONS, Fact, World, derived_facts
from lit_common.sources import WORLD_FILES

MQUAKE_CASES = 120  # 40 per chain; at most one case per two people (each case edits or asks about one person)


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


def _aliases(obj: str) -> list[str]:
    """Answer aliases, as MQuAKE lists them: the name without its article ("Tessel Isles")."""
    return [obj[len("the "):]] if obj.startswith("the ") else []


def _hop(question: str, cloze: str, answer: str) -> dict[str, Any]:
    return {"question": question, "cloze": cloze, "answer": answer, "answer_alias": _aliases(answer)}


def _rewrite(world: World, template: str, question: str, subject: str, relation_id: str, new_and_true: tuple[str, str],
             objects_of: str) -> dict[str, Any]:
    """One MQuAKE ``requested_rewrite`` entry; object ids are those of ``objects_of``'s objects."""
    new, true = new_and_true
    return {"prompt": template, "relation_id": relation_id,
            "target_new": {"str": new, "id": _object_id(world, objects_of, new)},
            "target_true": {"str": true, "id": _object_id(world, objects_of, true)},
            "subject": subject, "question": question.format(subject)}


def mquake_records(world: World, count: int, seed: int = 3) -> list[dict[str, Any]]:
    """MQuAKE-CF records over two-hop chains (``data.world.CHAINS``): person -r1-> x -r2-> y, where r2 is
    an object relation derived from the person facts (``data.world.OBJECT_RELATIONS``).

    Cases alternate between editing both hops (the person's x, then the new x's y: two rewrites, as
    MQuAKE's case 1) and editing the second hop only (the person's true x, a fact the world model knows).
    Every second hop is an edit because the world model never learned the derived facts, so every single
    hop of every case is a fact the edited model either knew or was taught. Each person is edited once, and
    an object fact edited by several cases is edited to the same new object each time (shared edits, as in
    MQuAKE-CF-3k-v2), so the whole file can be edited in one run without conflicting edits.
    """
    rng = random.Random(seed)
    object_relations = {r.relation_id: r for r in OBJECT_RELATIONS}
    chains = [c for c in CHAINS if {c.first, object_relations[c.second].via} <= set(world.relations)]
    if not chains:
        return []  # a world built without the chains' relations has no MQuAKE cases
    derived = {c.second: derived_facts(world, object_relations[c.second]) for c in chains}
    shared: dict[tuple[str, str], str] = {}  # (x, r2) -> its new object, once some case has edited it
    people = list(world.subjects)
    rng.shuffle(people)
    records = []
    for case_id in range(count):
        chain = chains[case_id % len(chains)]
        first, second = world.relations[chain.first], object_relations[chain.second]
        edit_first = case_id % 2 == 0
        for person in people:  # the first person (not yet edited) for whom the chain's answer can change
            true_x = world.fact(person, chain.first).object
            xs = [o for o in first.objects if o != true_x and o in derived[second.relation_id]] if edit_first else [true_x]
            if not xs:
                continue
            x = rng.choice(xs)
            old_answer = derived[second.relation_id][true_x]
            candidates = [o for o in world.relations[second.via].objects
                          if o not in (old_answer, derived[second.relation_id][x])]
            new_answer = shared.get((x, second.relation_id)) or rng.choice(candidates)
            if new_answer != old_answer:
                break
        else:
            raise ValueError(f"the world has no person left for MQuAKE case {case_id}")
        people.remove(person)
        shared[(x, second.relation_id)] = new_answer

        first_template, first_question = rng.choice(first.templates), first.questions[0]
        second_template, second_question = second.templates[0], second.questions[0]
        rewrites = [_rewrite(world, first_template, first_question, person, chain.first, (x, true_x), chain.first)
                    ] if edit_first else []
        rewrites.append(_rewrite(world, second_template, second_question, x, second.relation_id,
                                 (new_answer, derived[second.relation_id][x]), second.via))
        old_hops = [_hop(first_question.format(person), first_template.format(person), true_x),
                    _hop(second_question.format(true_x), second_template.format(true_x), old_answer)]
        new_hops = [_hop(first_question.format(person), first_template.format(person), x),
                    _hop(second_question.format(x), second_template.format(x), new_answer)]
        labeled = [[person, first.name, true_x], [true_x, second.name, old_answer]]
        new_labeled = [[person, first.name, x], [x, second.name, new_answer]]
        records.append({
            "case_id": case_id,
            "requested_rewrite": rewrites,
            "questions": [q.format(person) for q in chain.questions],
            "answer": old_answer,
            "answer_alias": _aliases(old_answer),
            "new_answer": new_answer,
            "new_answer_alias": _aliases(new_answer),
            "single_hops": old_hops,
            "new_single_hops": new_hops,
            "orig": {"triples_labeled": labeled, "new_triples_labeled": new_labeled},
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
        "mquake": json.dumps(mquake_records(world, min(MQUAKE_CASES, len(world.subjects) // 2)), indent=1,
                             ensure_ascii=False),
    }
    paths = {}
    for key, text in contents.items():
        path = out_dir / WORLD_FILES[key]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        paths[key] = path
    return paths
