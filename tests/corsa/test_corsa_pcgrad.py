import pytest
import torch

from lit_corsa.pcgrad import project_conflicting


def _split(v):
    """A 2-D vector as two one-element 'parameters', so the dot products must span parameters."""
    return [torch.tensor([float(v[0])]), torch.tensor([float(v[1])])]


def _flat(grads):
    return [g.item() for g in grads]


# conflicting: d = (1, 1), s = (−1, 0), ⟨d, s⟩ = −1, ‖s‖² = 1
# d' = d − (−1/1)·s = (0, 1); sequential keeps s since ⟨s, d'⟩ = 0 → merged = ((0,1) + (−1,0)) / 2
# symmetric: s' = s − (⟨s, d⟩/‖d‖²)·d = (−1, 0) + ½(1, 1) = (−½, ½) → merged = ((0,1) + (−½,½)) / 2
@pytest.mark.parametrize(
    "mode, expected, projected",
    [
        ("sequential", [-0.5, 0.5], True),
        ("symmetric", [-0.25, 0.75], True),
        ("none", [0.0, 0.5], False),
    ],
)
def test_conflicting_vectors(mode, expected, projected):
    merged, did = project_conflicting(_split((1, 1)), _split((-1, 0)), mode=mode)
    assert _flat(merged) == pytest.approx(expected, abs=1e-6)
    assert did is projected


@pytest.mark.parametrize("mode", ["sequential", "symmetric", "none"])
def test_non_conflicting_vectors_are_only_averaged(mode):
    # ⟨(1, 2), (3, −1)⟩ = 1 > 0
    merged, did = project_conflicting(_split((1, 2)), _split((3, -1)), mode=mode)
    assert _flat(merged) == pytest.approx([2.0, 0.5])
    assert did is False


def test_inputs_are_not_modified():
    d, s = _split((1, 1)), _split((-1, 0))
    project_conflicting(d, s, mode="symmetric")
    assert _flat(d) == [1.0, 1.0] and _flat(s) == [-1.0, 0.0]


def test_none_gradients_count_as_zeros():
    # flat d = (2, 0), s = (−1, 1): ⟨d, s⟩ = −2, ‖s‖² = 2 → d' = (2, 0) + (−1, 1) = (1, 1)
    # merged = ((1, 1) + (−1, 1)) / 2 = (0, 1); the third parameter has no gradient at all
    d = [torch.tensor([2.0]), None, None]
    s = [torch.tensor([-1.0]), torch.tensor([1.0]), None]
    merged, did = project_conflicting(d, s)
    assert did is True
    assert merged[0].item() == pytest.approx(0.0, abs=1e-6)
    assert merged[1].item() == pytest.approx(1.0, abs=1e-6)
    assert merged[2] is None


def test_dtype_is_kept():
    d = [torch.tensor([1.0, 1.0], dtype=torch.bfloat16)]
    s = [torch.tensor([-1.0, 0.0], dtype=torch.bfloat16)]
    merged, _ = project_conflicting(d, s)
    assert merged[0].dtype == torch.bfloat16
    assert merged[0].tolist() == [-0.5, 0.5]


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        project_conflicting(_split((1, 1)), _split((1, 1)), mode="pcgrad")
    with pytest.raises(ValueError, match="length"):
        project_conflicting(_split((1, 1)), [torch.ones(1)])
