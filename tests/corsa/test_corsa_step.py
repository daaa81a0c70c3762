"""The CoRSA step (lit_corsa.step) equals a plain-PyTorch reimplementation of docs/corsa.md §3 on a tiny model."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from data.tokenization import EncodedRequest, RequestCollator
from lit_corsa.objectives import METHODS, resolve_objective
from lit_corsa.settings import ObjectiveSettings
from lit_corsa.step import EditStep


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():  # LoRA B starts at zero; give it values so every path matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    requests = [EncodedRequest(0, [1, 5, 6, 7], [9, 10], [11]), EncodedRequest(1, [1, 8, 7], [12], [13, 14, 15]),
                EncodedRequest(2, [1, 5, 5], [16], [17])]
    batch = RequestCollator(pad_id=0)(requests)
    reference = torch.tensor([[-3.0, -2.5], [-4.0, -1.0], [-2.0, -2.2]])
    return model, batch, reference


def _answer_logps(model, seq):
    """Per-token log-probs of the answer tokens, computed the textbook way (fp32, explicit shift)."""
    logits = model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"]).logits[:, :-1].float()
    labels = seq["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def _reference_gradient(model, params, batch, reference, beta, rho, sam, merge):
    def task_grads():
        chosen_lp, chosen_mask = _answer_logps(model, batch["chosen"])
        rejected_lp, _ = _answer_logps(model, batch["rejected"])
        sft = -chosen_lp.sum() / chosen_mask.sum()
        z = beta * ((chosen_lp.sum(1) - reference[:, 0]) - (rejected_lp.sum(1) - reference[:, 1]))
        dpo = F.softplus(-z).mean()  # -log sigmoid(z)
        g_dpo = torch.cat([g.reshape(-1) for g in torch.autograd.grad(dpo, params, retain_graph=True)])
        g_sft = torch.cat([g.reshape(-1) for g in torch.autograd.grad(sft, params)])
        if merge == "sequential" and g_dpo @ g_sft < 0:
            g_dpo = g_dpo - (g_dpo @ g_sft) / (g_sft @ g_sft + 1e-12) * g_sft
        return (g_dpo + g_sft) / 2

    g = task_grads()
    if sam:
        original = [p.detach().clone() for p in params]
        eps = rho * g / torch.sqrt(g @ g + 1e-12)
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(eps[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        g = task_grads()
        with torch.no_grad():
            for p, o in zip(params, original):
                p.copy_(o)
    return g


@pytest.mark.parametrize("method, merge", [("corsa", "sequential"), ("dpo", "sequential"), ("corsa", "none")])
def test_step_matches_plain_pytorch(tiny, method, merge):
    model, batch, reference = tiny
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    objective = resolve_objective(method, ObjectiveSettings(projection=merge))
    grads, logs = EditStep(objective, beta=0.1, rho=0.05)(model, params, batch, reference)
    ours = torch.cat([g.reshape(-1) for g in grads])
    expected = _reference_gradient(model, params, batch, reference, 0.1, 0.05, objective.use_sam, merge)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "φ must be restored bit-exactly"
    assert {"sft", "dpo", "margin", "projected"} <= set(logs)
    assert ("sam_grad_norm" in logs) == objective.use_sam


def test_lora_step_is_sft_only(tiny):
    model, batch, reference = tiny
    params = [p for p in model.parameters() if p.requires_grad]
    grads, logs = EditStep(METHODS["lora"])(model, params, batch, reference=None)
    chosen_lp, mask = _answer_logps(model, batch["chosen"])
    expected = torch.autograd.grad(-chosen_lp.sum() / mask.sum(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    assert set(logs) == {"sft"}


def test_easyedit_weighting_is_one_weighted_loss(tiny):
    model, batch, reference = tiny
    params = [p for p in model.parameters() if p.requires_grad]
    objective = METHODS["easyedit_dpo"]
    assert (objective.sft_weight, objective.dpo_weight, objective.use_sam) == (0.99, 0.01, False)
    grads, _ = EditStep(objective, beta=0.1)(model, params, batch, reference)
    chosen_lp, mask = _answer_logps(model, batch["chosen"])
    rejected_lp, _ = _answer_logps(model, batch["rejected"])
    z = 0.1 * ((chosen_lp.sum(1) - reference[:, 0]) - (rejected_lp.sum(1) - reference[:, 1]))
    loss = 0.99 * (-chosen_lp.sum() / mask.sum()) + 0.01 * F.softplus(-z).mean()
    for g, e in zip(grads, torch.autograd.grad(loss, params)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_rows_without_old_answer_drop_out_of_the_margin(tiny):
    model, batch, reference = tiny
    params = [p for p in model.parameters() if p.requires_grad]
    batch["has_rejected"] = torch.tensor([True, False, True])
    step = EditStep(resolve_objective("dpo", ObjectiveSettings(projection="none")))
    full = step.one_pass(model, params, batch, reference)
    sub = {"chosen": {k: v[[0, 2]] for k, v in batch["chosen"].items()},
           "rejected": {k: v[[0, 2]] for k, v in batch["rejected"].items()},
           "has_rejected": torch.tensor([True, True])}
    only_two = step.one_pass(model, params, sub, reference[[0, 2]])
    torch.testing.assert_close(full.dpo, only_two.dpo)


def test_unknown_method_and_useless_projection():
    with pytest.raises(ValueError, match="unknown method 'rome'"):
        resolve_objective("rome")
    with pytest.raises(ValueError, match="has no effect on method 'lora'"):
        resolve_objective("lora", ObjectiveSettings(projection="symmetric"))
