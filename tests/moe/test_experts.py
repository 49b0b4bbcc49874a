import functools
import math

import pytest
import torch
from torch import nn

from moe_exp.moe.experts import EXPERTS as ALL_EXPERTS
from moe_exp.moe.experts import (
    CNNExpert,
    MLPExpert,
    ResNetExpert,
    SoftTreeExpert,
    TreeBalanceLoss,
    build_experts,
    first_kind,
    mixed,
)
from moe_exp.moe.routing import Routing

C = 5
EXPERTS = list(ALL_EXPERTS.values())  # every expert kind the library defines
SHAPES = [(3, 16, 16), (12,)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("shape", SHAPES, ids=["image", "vector"])
@pytest.mark.parametrize("cls", EXPERTS, ids=lambda c: c.__name__)
def test_expert_output_shape_and_gradients(cls, shape):
    expert = cls(shape, C)
    y = expert(torch.randn(6, *shape))
    assert y.shape == (6, C)
    y.square().sum().backward()
    for name, p in expert.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", EXPERTS, ids=lambda c: c.__name__)
def test_dropout_is_active_in_training_only(cls):
    x = torch.randn(8, 3, 16, 16)
    expert = cls((3, 16, 16), C, dropout=0.5)
    expert.train()
    assert not torch.allclose(expert(x), expert(x))
    expert.eval()
    torch.testing.assert_close(expert(x), expert(x))
    still = cls((3, 16, 16), C, dropout=0.0).train()  # no dropout: training is deterministic
    torch.testing.assert_close(still(x), still(x))


@pytest.mark.parametrize("cls", EXPERTS, ids=lambda c: c.__name__)
def test_dropout_range_is_checked(cls):
    with pytest.raises(ValueError, match="dropout must be in"):
        cls((4,), C, dropout=1.0)


def test_tree_leaves_form_a_distribution_and_output_is_the_leaf_mixture():
    tree = SoftTreeExpert((7,), C, depth=3, beta=2.0)
    x = torch.randn(10, 7)
    leaf = tree.leaf_probs(x)
    assert leaf.shape == (10, 8)
    torch.testing.assert_close(leaf.sum(-1), torch.ones(10))
    mixture = leaf @ tree.leaf_logits.softmax(-1)  # Σ_ℓ P^ℓ(x) Q^ℓ
    torch.testing.assert_close(tree(x).exp(), mixture)
    torch.testing.assert_close(tree(x).softmax(-1), mixture)  # logits whose softmax is p(y|x)


def test_tree_leaf_paths_by_hand_at_depth_2():
    tree = SoftTreeExpert((3,), C, depth=2)
    with torch.no_grad():
        tree.inner.weight.copy_(torch.eye(3))  # p_i = σ(x_i)
        tree.inner.bias.zero_()
    x = torch.tensor([[0.5, -1.0, 2.0]])
    p0, p1, p2 = torch.sigmoid(x[0]).tolist()
    expected = [(1 - p0) * (1 - p1), (1 - p0) * p1, p0 * (1 - p2), p0 * p2]
    torch.testing.assert_close(tree.leaf_probs(x)[0], torch.tensor(expected))


def _tree_penalty_by_hand(xs):
    """Frosst & Hinton's C (λ = 1) for a depth-2 tree with p_i(x) = σ(x_i)."""
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    ps = [[sig(v) for v in x] for x in xs]
    reach = [[1.0, 1 - p[0], p[0]] for p in ps]  # P^i(x) for nodes 0, 1, 2
    total = 0.0
    for i, depth in ((0, 0), (1, 1), (2, 1)):
        alpha = sum(r[i] * p[i] for r, p in zip(reach, ps, strict=True)) / sum(r[i] for r in reach)
        total += -(2.0**-depth) * 0.5 * (math.log(alpha) + math.log(1 - alpha))
    return total


def test_tree_balance_penalty_equals_the_formula_on_a_hand_case():
    xs = [[0.5, -1.0, 2.0], [-2.0, 0.3, 1.0], [1.5, 1.0, -0.5]]
    tree = SoftTreeExpert((3,), C, depth=2)
    with torch.no_grad():
        tree.inner.weight.copy_(torch.eye(3))
        tree.inner.bias.zero_()
    tree(torch.tensor(xs))
    penalty = tree.pop_penalty()
    assert penalty.item() == pytest.approx(_tree_penalty_by_hand(xs), rel=1e-5)
    assert tree.pop_penalty() is None  # consumed: never reused by a later step


def test_tree_balance_penalty_depth_1_is_minimal_for_an_even_split():
    tree = SoftTreeExpert((1,), C, depth=1)
    with torch.no_grad():
        tree.inner.weight.fill_(1.0)
        tree.inner.bias.zero_()
    tree(torch.tensor([[3.0], [-3.0]]))  # α = (σ(3) + σ(-3)) / 2 = 0.5
    assert tree.pop_penalty().item() == pytest.approx(-0.5 * 2 * math.log(0.5), rel=1e-5)


def _routing(experts_of_inputs, e):
    n = len(experts_of_inputs)
    return Routing(
        logits=torch.zeros(n, e),
        probs=torch.full((n, e), 1 / e),
        weights=torch.ones(n, 1),
        indices=torch.tensor(experts_of_inputs).view(n, 1),
    )


def test_tree_balance_loss_sums_the_trees_that_ran_and_is_differentiable():
    trees = [SoftTreeExpert((4,), C, depth=2) for _ in range(3)]
    loss = TreeBalanceLoss(weight=0.5)
    loss.attach([*trees, MLPExpert((4,), C)])  # non-trees are ignored
    x = torch.randn(9, 4)
    with torch.no_grad():
        trees[1](x)  # a call outside the mixture (e.g. analysis) leaves a stale penalty
    trees[0](x[:5])
    trees[2](x[5:])  # this step, tree 1 got no inputs
    expected = trees[0].balance_penalty(
        trees[0].node_probs(x[:5]), _reach(trees[0], x[:5])
    ) + trees[2].balance_penalty(trees[2].node_probs(x[5:]), _reach(trees[2], x[5:]))
    routing = _routing([0] * 5 + [2] * 4, 4)
    value = loss(routing)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert trees[0].inner.weight.grad is not None and trees[1].inner.weight.grad is None
    assert all(t.last_penalty is None for t in trees)  # all cleared after use
    assert loss(routing).item() == 0.0


def _reach(tree, x):
    return tree._log_reach(*tree._log_branches(x))[0].exp()


def test_tree_balance_loss_needs_attached_experts_and_warns_without_trees():
    with pytest.raises(RuntimeError, match="attach"):
        TreeBalanceLoss()(_routing([0, 1], 2))
    with pytest.warns(UserWarning, match="no soft-tree experts"):
        TreeBalanceLoss().attach([MLPExpert((4,), C)])


def _mixed_partial(n_cnn, n_mlp):
    return functools.partial(
        mixed,
        groups=[
            {"count": n_cnn, "expert": functools.partial(CNNExpert, width=8)},
            {"count": n_mlp, "expert": functools.partial(MLPExpert, hidden=16)},
        ],
    )


def test_mixed_builds_each_kind_in_order():
    experts = build_experts(_mixed_partial(2, 1), 3, (3, 8, 8), C)
    assert [type(e) for e in experts] == [CNNExpert, CNNExpert, MLPExpert]
    assert all(e(torch.randn(2, 3, 8, 8)).shape == (2, C) for e in experts)
    assert first_kind(_mixed_partial(2, 1)).func is CNNExpert
    plain = functools.partial(MLPExpert, hidden=8)
    assert len(build_experts(plain, 4, (5,), C)) == 4 and first_kind(plain) is plain


def test_mixed_counts_must_sum_to_experts():
    with pytest.raises(ValueError, match=r"counts \[2, 1\] sum to 3 but experts=4"):
        build_experts(_mixed_partial(2, 1), 4, (3, 8, 8), C)
    with pytest.raises(ValueError, match="count=-1"):
        build_experts(_mixed_partial(-1, 1), 0, (3, 8, 8), C)
    with pytest.raises(ValueError, match="at least one group"):
        mixed((4,), C, groups=[])


def test_resnet_blocks_and_norms():
    net = ResNetExpert((3, 16, 16), C, width=8, blocks=(2, 1), norm="group")
    assert net(torch.randn(3, 3, 16, 16)).shape == (3, C)
    assert sum(isinstance(m, nn.GroupNorm) for m in net.modules()) > 0
    with pytest.raises(ValueError, match="blocks"):
        ResNetExpert((3, 16, 16), C, blocks=())
