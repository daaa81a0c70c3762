import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_common.scoring import PairScore, answer_accuracy, preferred
from lit_common.sources import load_causal_lm
from lit_tacq.calibration import read_task_records
from lit_tacq.evaluation import EvaluationData, evaluate, scored_evaluation, text_nll


class Oracle(nn.Module):
    """Predicts the true next token, except where that token is one it is blind to."""

    def __init__(self, vocab_size: int, blind: list[int]) -> None:
        super().__init__()
        self.vocab_size, self.blind = vocab_size, torch.tensor(blind)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids, attention_mask=None):
        following = torch.roll(input_ids, -1, dims=1)
        guess = torch.where(torch.isin(following, self.blind), (following + 1) % self.vocab_size, following)
        return SimpleNamespace(logits=F.one_hot(guess, self.vocab_size).float())


def test_accuracy_is_the_worlds_definition_and_nll_is_per_answer_token(tiny):
    pairs = [(r["prompt"], r["answer"]) for r in read_task_records(tiny.task_qa, "evaluation")]
    blind = [tiny.tokenizer(" " + a, add_special_tokens=False)["input_ids"][-1] for _, a in pairs[:4]]
    oracle = Oracle(len(tiny.tokenizer), blind)
    accuracy = evaluate(oracle, tiny.tokenizer, EvaluationData(pairs=pairs), batch_size=5)["accuracy"]
    # the oracle gets an answer right exactly when none of its tokens is one it is blind to
    knows = [not set(tiny.tokenizer(" " + a, add_special_tokens=False)["input_ids"]) & set(blind) for _, a in pairs]
    assert 0 < accuracy < 1 and accuracy == sum(knows) / len(pairs)
    assert answer_accuracy(oracle, tiny.tokenizer, pairs, batch_size=7) == accuracy  # batching changes nothing

    model = load_causal_lm(tiny.model_dir).eval()
    prompt, answer = pairs[0]
    prompt_ids = tiny.tokenizer(prompt)["input_ids"]
    answer_ids = tiny.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0].log_softmax(-1)
    expected = -sum(logprobs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(answer_ids)) / len(answer_ids)
    assert math.isclose(evaluate(model, tiny.tokenizer, EvaluationData(pairs=pairs[:1]))["answer_nll"], expected,
                        rel_tol=1e-5)


def test_text_nll_and_evaluate_keys(tiny):
    model = load_causal_lm(tiny.model_dir).train()
    windows = [torch.arange(10, 26), torch.arange(30, 46)]
    nll = text_nll(model, windows)
    logits = model(input_ids=torch.stack(windows)).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.stack(windows)[:, 1:].flatten())
    assert math.isclose(nll, expected.item(), rel_tol=1e-5)
    metrics = evaluate(model, tiny.tokenizer, EvaluationData(pairs=[("Where was Bob born?", "Varrow")], windows=windows))
    assert set(metrics) == {"accuracy", "answer_nll", "text_nll", "perplexity"}
    assert model.training  # the mode is restored


class Biased(nn.Module):
    """The same next-token distribution at every position: ``bias`` favours some tokens, whatever the input."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_preference_compares_mean_token_logprobs_of_answer_and_alternative(tiny):
    ids: dict[str, list[int]] = {}  # eight answers of the world that share no token
    for record in read_task_records(tiny.task_qa):
        tokens = tiny.tokenizer(" " + record["answer"], add_special_tokens=False)["input_ids"]
        if len(ids) < 8 and not set(tokens) & {t for seen in ids.values() for t in seen}:
            ids[record["answer"]] = tokens
    words = list(ids)
    pairs = [(f"Question {i}?", words[i]) for i in range(4)]
    alternatives = words[4:8]
    bias = torch.zeros(len(tiny.tokenizer))
    for word in (words[0], words[1], words[6], words[7]):  # answers 0, 1 and alternatives 2, 3 are favoured
        bias[ids[word]] = 4.0
    model = Biased(bias)
    data = EvaluationData(pairs=pairs, alternatives=alternatives)
    metrics, correct = scored_evaluation(model, tiny.tokenizer, data, batch_size=3)
    assert metrics["preference"] == 0.5  # pairs 0 and 1 prefer their answer, 2 and 3 their alternative
    logp = bias.log_softmax(-1)
    expected = [logp[ids[a]].mean() > logp[ids[b]].mean() for (_, a), b in zip(pairs, alternatives)]
    assert expected == [True, True, False, False]
    assert evaluate(model, tiny.tokenizer, data) == metrics and len(correct) == 4
    plain = evaluate(model, tiny.tokenizer, EvaluationData(pairs=pairs))
    assert "preference" not in plain and plain["accuracy"] == metrics["accuracy"]  # alternatives change nothing else
    assert plain["answer_nll"] == metrics["answer_nll"]


def test_preference_is_per_token_and_needs_one_alternative_per_pair(tiny):
    pair = ("Where was Bob born?", "Varrow")
    answer, longer = PairScore(False, 2.0, 1), PairScore(False, 3.0, 2)  # total NLL 2 < 3, per token 2 > 1.5
    assert preferred([answer], [longer]) == [False]
    with pytest.raises(ValueError, match="2 alternatives for 1 pairs"):
        EvaluationData(pairs=[pair], alternatives=["A", "B"])
    with pytest.raises(ValueError, match="1 answers but 0 alternatives"):
        preferred([answer], [])
