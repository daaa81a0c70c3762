import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from lit_common.scoring import answer_accuracy
from lit_common.sources import load_causal_lm
from lit_tacq.calibration import read_task_records
from lit_tacq.evaluation import EvaluationData, answer_scores, evaluate, text_nll


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
    accuracy, _ = answer_scores(oracle, tiny.tokenizer, pairs, batch_size=5)
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
    assert math.isclose(answer_scores(model, tiny.tokenizer, pairs[:1])[1], expected, rel_tol=1e-5)


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
