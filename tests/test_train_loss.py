"""InteractionLoss against a float64 reference; assignments; teacher map resizing."""
import itertools
import math

import pytest
import torch

from lfi.nn.interaction_loss import InteractionLoss
from lfi.nn.interaction_loss import assign_concepts
from lfi.nn.interaction_queries import LayerMaps
from lfi.nn.interaction_queries import QueryMaps
from lfi.teachers.base import TeacherMaps

B, H, K, N, D = 3, 2, 4, 12, 8


def make_maps(layers=2, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        q = torch.randn(B, H, K, D, generator=g).requires_grad_(requires_grad)
        k = torch.randn(B, H, N, D, generator=g).requires_grad_(requires_grad)
        v = torch.randn(B, H, N, D, generator=g)
        out.append(LayerMaps(layer, q, k, v, D ** -0.5))
    return QueryMaps(out, grid=(3, 4))


def make_teacher(Kt=3, seed=1, valid=None, scores=None):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(B, Kt, N, generator=g) * 2, -1)
    p[0, 0, :3] = 0  # exact zeros in the target are allowed
    p = p / p.sum(-1, keepdim=True)
    return TeacherMaps(p.view(B, Kt, 3, 4), valid=valid, scores=scores, concepts=[f"c{i}" for i in range(Kt)])


def reference(qm, probs, index, weight, T=1.0, heads="broadcast"):
    """float64: mean over layers of sum_bj w_bj r_bj / max(1, sum w)."""
    total = 0.0
    w = weight.double()
    for lm in qm:
        logits = (lm.q.double() @ lm.k.double().transpose(-1, -2)) * lm.scale / T  # (B, H, K, N)
        t = probs.double().gather(1, index.unsqueeze(-1).expand(B, K, N))  # (B, K, N)
        if heads == "broadcast":
            logp = torch.log_softmax(logits, -1)
            kl = (torch.xlogy(t[:, None], t[:, None]) - t[:, None] * logp).sum(-1).mean(1)  # (B, K)
        else:
            p = torch.softmax(logits, -1).mean(1)
            kl = (torch.xlogy(t, t) - t * torch.log(p)).sum(-1)
        total = total + (kl * w).sum() / w.sum().clamp_min(1)
    return total / len(qm)


@pytest.mark.parametrize("heads,via,T", [("broadcast", "qk", 1.0), ("broadcast", "logits", 1.0),
                                         ("broadcast", "qk", 2.0), ("mean", "qk", 1.0), ("mean", "qk", 0.5)])
def test_loss_equals_float64_reference(heads, via, T):
    qm = make_maps()
    valid = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    tm = make_teacher(valid=valid)
    loss_fn = InteractionLoss(assignment="fixed", heads=heads, temperature=T, via=via)
    loss = loss_fn(qm, tm)
    index, weight = loss_fn.last_assignment
    assert index[:, :3].tolist() == [[0, 1, 2]] * B and weight[:, 3].sum() == 0  # extra query unassigned
    ref = reference(qm, tm.flat(), index, weight, T, heads)
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
    # gradients equal the float64 reference's
    grads = torch.autograd.grad(loss, [qm[0].q, qm[1].k])
    q64 = QueryMaps([LayerMaps(lm.layer, lm.q.detach().double().requires_grad_(),
                               lm.k.detach().double().requires_grad_(), lm.v.double(), lm.scale) for lm in qm],
                    grid=qm.grid)
    ref64 = reference(q64, tm.flat(), index, weight, T, heads)
    ref_grads = torch.autograd.grad(ref64, [q64[0].q, q64[1].k])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_captured_maps_path_matches_qk_path():
    qm = make_maps(requires_grad=False)
    tm = make_teacher()
    a = InteractionLoss()(qm, tm)
    b = InteractionLoss()(torch.stack([lm.maps for lm in qm], 1), tm.flat())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_topk_assignment_follows_scores():
    qm = make_maps(requires_grad=False)
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0], [0.3, 0.2, 0.1, 0.0, 0.4], [1.0, 0.0, 0.0, 0.0, 0.0]])
    valid = torch.ones(B, 5, dtype=torch.bool)
    valid[2, 1:] = False
    tm = make_teacher(Kt=5, scores=scores, valid=valid)
    loss_fn = InteractionLoss(assignment="topk")
    loss = loss_fn(qm, tm)
    index, weight = loss_fn.last_assignment
    assert index[0].tolist() == [3, 1, 2, 0]
    assert index[1].tolist() == [4, 0, 1, 2]
    assert index[2, 0] == 0 and weight[2].tolist() == [1, 0, 0, 0]
    torch.testing.assert_close(loss.double(), reference(qm, tm.flat(), index, weight), atol=2e-5, rtol=2e-5)


def test_hungarian_matches_brute_force():
    pytest.importorskip("scipy")
    qm = make_maps(requires_grad=False)
    tm = make_teacher(Kt=3)
    loss_fn = InteractionLoss(assignment="hungarian")
    loss = loss_fn(qm, tm)
    index, weight = loss_fn.last_assignment
    probs = tm.flat()
    for b in range(B):  # brute force: best injective map of the 3 concepts onto 3 of the 4 queries
        best, best_cost = None, math.inf
        for qs in itertools.permutations(range(K), 3):
            idx = torch.zeros(B, K, dtype=torch.long)
            w = torch.zeros(B, K)
            for c, j in enumerate(qs):
                idx[b, j], w[b, j] = c, 1
            cost = reference(qm, probs, idx, w)
            if cost < best_cost:
                best, best_cost = qs, cost
        got = tuple(int((index[b] == c).nonzero()[weight[b, (index[b] == c)].bool()][0]) for c in range(3))
        assert got == best
    torch.testing.assert_close(loss.double(), reference(qm, probs, index, weight), atol=2e-5, rtol=2e-5)


def test_fixed_needs_enough_queries_and_shape_errors():
    qm = make_maps(requires_grad=False)
    with pytest.raises(ValueError, match="topk"):
        InteractionLoss()(qm, make_teacher(Kt=6))
    with pytest.raises(ValueError, match="patches"):
        InteractionLoss()(qm, torch.softmax(torch.randn(B, 3, N + 1), -1))
    with pytest.raises(ValueError):
        InteractionLoss(assignment="nope")


def test_teacher_maps_resize_in_log_space():
    p = torch.softmax(torch.randn(2, 3, 4, 4), -1)
    p = p / p.flatten(2).sum(-1)[..., None, None]
    tm = TeacherMaps(p)
    r = tm.flat((8, 8))
    assert r.shape == (2, 3, 64)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(tm.flat(), p.flatten(2))
    # no concept given valid -> all rows count; absent -> weight 0 and no effect on the loss
    idx, w = assign_concepts("fixed", [], r, torch.tensor([[1, 0, 1], [1, 1, 1]]).bool(), None, 4)
    assert w.tolist() == [[1, 0, 1, 0], [1, 1, 1, 0]]
