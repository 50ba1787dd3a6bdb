import pytest
import torch
from torch import nn

from grokalign_fast.centroids import centroid, centroid_alignment, centroid_inner_product, centroid_norm, cosine
from utils import F64, assert_close_all, exact_jacobians, mlp, model_cases, outputs_and_grads

CASES = model_cases()


@pytest.mark.parametrize("name,model,x", CASES, ids=[c[0] for c in CASES])
def test_centroid_is_the_jacobian_transpose_times_ones(name, model, x):
    """c(x) = J(x)^T 1, with J from torch.autograd.functional.jacobian (one row per output)."""
    want = exact_jacobians(model, x).sum(1).reshape(x.shape)
    torch.testing.assert_close(centroid(model, x), want, **F64)


def test_centroid_of_cpa_net_is_row_sum_of_region_matrix():
    model = mlp([5, 7, 3], act=nn.ReLU, bias=False)
    x = torch.randn(4, 5, dtype=torch.float64)
    W1, W2 = model[0].weight, model[2].weight
    for b in range(4):
        A = W2 @ torch.diag((W1 @ x[b] > 0).double()) @ W1  # f(x) = A_w x on the region of x
        torch.testing.assert_close(centroid(model, x)[b], A.sum(0), **F64)


def test_alignment_formulas():
    model = mlp([6, 8, 4], act=nn.GELU)
    x = torch.randn(5, 6, dtype=torch.float64)
    c = centroid(model, x)
    cos = (x * c).sum(1) / (x.norm(dim=1) * c.norm(dim=1))
    torch.testing.assert_close(centroid_alignment(model, x), cos, **F64)
    torch.testing.assert_close(centroid_alignment(model, x, reduction="mean"), cos.mean(), **F64)
    torch.testing.assert_close(centroid_inner_product(model, x), (x * c).sum(1), **F64)
    torch.testing.assert_close(centroid_norm(model, x), c.norm(dim=1), **F64)
    torch.testing.assert_close(centroid_norm(model, x, reduction="sum"), c.norm(dim=1).sum(), **F64)


def test_aligned_network_has_alignment_one():
    x = torch.randn(3, 4, dtype=torch.float64)
    f = lambda z: 0.5 * (z * z).sum(1, keepdim=True) * torch.tensor([1.0, 2.0], dtype=z.dtype)  # J rows = a_c x
    torch.testing.assert_close(centroid_alignment(f, x), torch.ones(3, dtype=torch.float64), **F64)


def test_multidimensional_inputs_and_zero_vectors():
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    cos = centroid_alignment(lambda z: z.flatten(1) * 2, x)
    assert torch.equal(cos, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(cosine(torch.ones(2, 3), torch.zeros(2, 3)), torch.zeros(2))


def test_centroid_differentiable_in_training_and_detached_in_no_grad():
    """The parameter gradients of a loss on c(x) equal those of the same loss on J^T 1 built by
    torch.autograd.functional.jacobian(create_graph=True), float64."""
    model = mlp([4, 5, 2], act=nn.Tanh)
    x = torch.randn(3, 4, dtype=torch.float64)
    c = centroid(model, x)
    assert c.requires_grad
    want = exact_jacobians(model, x, create_graph=True).sum(1).reshape(x.shape)
    params = list(model.parameters())  # the last bias does not reach J: a zero gradient
    assert_close_all(outputs_and_grads([c], params), outputs_and_grads([want], params))
    with torch.no_grad():
        assert not centroid(model, x).requires_grad


def test_bad_input():
    with pytest.raises(TypeError, match=r"\bx\b"):
        centroid(lambda z: z, torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"changed the batch size"):
        centroid(lambda z: z[:1], torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        centroid_alignment(lambda z: z, torch.ones(2, 3), reduction="avg")
