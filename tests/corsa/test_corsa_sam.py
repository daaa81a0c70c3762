import pytest
import torch

from lit_corsa.sam import global_grad_norm, sam_perturb, sam_restore

SHAPES = [(64, 16), (16, 64), (100,)]  # LoRA-like A, B and a bias-sized vector


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((0.02 * torch.randn(*s, generator=g)).to(dtype)) for s in SHAPES]


def _direction(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in SHAPES]


def _flat(tensors):
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def test_perturb_moves_by_rho_along_the_direction_and_restore_is_exact():
    params, direction = _params(torch.float32), _direction()
    before = [p.detach().clone() for p in params]
    saved = sam_perturb(params, direction, rho=0.05)
    assert saved is not None
    step = _flat(params) - _flat(before)
    assert step.norm().item() == pytest.approx(0.05, rel=1e-4)
    unit = _flat(direction) / _flat(direction).norm()
    torch.testing.assert_close(step / step.norm(), unit, atol=1e-4, rtol=0)
    sam_restore(params, saved)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_bf16_restore_is_bit_exact_where_subtracting_eps_is_not():
    params, direction = _params(torch.bfloat16), _direction()
    before = [p.detach().clone() for p in params]
    saved = sam_perturb(params, direction, rho=0.05)
    assert not all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    # the reference undoes the step by subtraction; in bf16 that does not land back on φ
    norm = _flat(direction).norm().float()
    eps = [(d * (0.05 / norm)).to(torch.bfloat16) for d in direction]
    subtracted = [p.detach() - e for p, e in zip(params, eps)]
    assert not all(torch.equal(s, b) for s, b in zip(subtracted, before))
    sam_restore(params, saved)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("fill", [0.0, float("nan"), float("inf")])
def test_zero_or_non_finite_direction_changes_nothing(fill):
    params = _params(torch.float32)
    before = [p.detach().clone() for p in params]
    direction = [torch.full(s, fill) for s in SHAPES]
    assert sam_perturb(params, direction, rho=0.05) is None
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_none_direction_leaves_that_parameter_alone():
    params = _params(torch.float32)
    before = [p.detach().clone() for p in params]
    direction = _direction()
    direction[1] = None
    saved = sam_perturb(params, direction, rho=0.1)
    assert saved[1] is None
    assert torch.equal(params[1].detach(), before[1])
    moved = torch.cat([(params[i].detach() - before[i]).reshape(-1) for i in (0, 2)])
    assert moved.norm().item() == pytest.approx(0.1, rel=1e-4)
    sam_restore(params, saved)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_global_grad_norm():
    grads = [torch.tensor([3.0]), None, torch.tensor([[4.0]], dtype=torch.bfloat16)]
    norm = global_grad_norm(grads)
    assert norm.dtype == torch.float32
    assert norm.item() == 5.0
    assert global_grad_norm([None]).item() == 0.0
