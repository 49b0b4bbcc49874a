import functools

import pytest
import torch

from moe_exp.models import MixtureClassifier, VisionMoE
from moe_exp.moe.experts import CNNExpert, MLPExpert, SoftTreeExpert, TreeBalanceLoss, mixed
from moe_exp.moe.experts.bank import MLPExpertBank
from moe_exp.moe.gates import SoftmaxGate, TopKGate

IMG = (3, 16, 16)
K = 10


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def vmoe(num_experts=4, k=2, **kw):
    kw = {"dim": 16, "heads": 2, "depth": 4, **kw}
    router = functools.partial(TopKGate, k=k)
    return VisionMoE(IMG, K, num_experts, expert=None, router=router, regularizers={}, **kw)


def test_vmoe_shapes_and_one_routing_per_moe_layer():
    model = vmoe()
    log_probs, routings = model(torch.randn(3, *IMG))
    assert log_probs.shape == (3, K)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3))
    assert len(routings) == 2
    tokens = 3 * (16 // 4) ** 2
    assert all(r.indices.shape == (tokens, 2) and r.num_experts == 4 for r in routings)
    log_probs.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(("moe_every", "moe_blocks"), [(1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2])])
def test_vmoe_moe_every(moe_every, moe_blocks):
    model = vmoe(moe_every=moe_every)
    assert [i for i, b in enumerate(model.blocks) if b.moe is not None] == moe_blocks
    assert all(isinstance(m.experts, MLPExpertBank) for m in model.moe_layers)
    assert len(model(torch.randn(2, *IMG))[1]) == len(moe_blocks)
    with pytest.raises(ValueError, match="moe_every=5"):
        vmoe(moe_every=5)


def test_vmoe_rejects_vectors_and_bad_patches():
    with pytest.raises(ValueError, match="needs images"):
        VisionMoE((12,), K, 4, None, functools.partial(TopKGate, k=1))
    with pytest.raises(ValueError, match="patch=32"):
        vmoe(patch=32)


def test_vmoe_parameter_counts():
    sparse = vmoe(num_experts=8, k=2).parameter_counts()
    assert sparse["params_active"] < sparse["params_total"]
    assert sparse["params_total"] == sum(p.numel() for p in vmoe(8, 2).parameters())
    bank = sum(p.numel() for p in vmoe(8, 2).moe_layers[0].experts.parameters())
    assert sparse["params_total"] - sparse["params_active"] == round(2 * bank * 6 / 8)
    router = functools.partial(SoftmaxGate)
    dense = VisionMoE(IMG, K, 4, None, router, dim=16, heads=2).parameter_counts()
    assert dense["params_active"] == dense["params_total"]


def test_vmoe_shared_experts_and_expert_dropout():
    model = vmoe(shared_experts=2, expert_dropout=0.5, expert_hidden=8)
    block = model.blocks[1]
    assert block.shared is not None and block.shared[0].out_features == 16
    assert model.blocks[0].shared is None
    assert block.moe.experts.drop.p == 0.5
    x = torch.randn(2, *IMG)
    assert not torch.allclose(model(x)[0], model(x)[0])
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0])


def mixture(expert, num_experts=4, k=2, in_shape=IMG, **kw):
    router = functools.partial(TopKGate, k=k)
    return MixtureClassifier(in_shape, K, num_experts, expert, router, **kw)


def test_mixture_parameter_counts_active_below_total():
    counts = mixture(functools.partial(MLPExpert, hidden=8)).parameter_counts()
    assert counts["params_active"] < counts["params_total"]


@pytest.mark.parametrize("combine", ["probs", "logits"])
def test_mixture_shared_experts_are_always_on_and_counted_active(combine):
    expert = functools.partial(MLPExpert, hidden=8)
    plain = mixture(expert, combine=combine).parameter_counts()
    model = mixture(expert, combine=combine, shared_experts=2)
    assert len(model.shared) == 2
    counts = model.parameter_counts()
    per_expert = sum(p.numel() for p in model.shared[0].parameters())
    assert counts["params_active"] == plain["params_active"] + 2 * per_expert
    x = torch.randn(5, *IMG)
    log_probs, _ = model(x)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(5))
    log_probs.sum().backward()
    assert all(p.grad is not None for p in model.shared.parameters())


def test_mixture_shared_probs_is_an_equal_weight_mix():
    expert = functools.partial(MLPExpert, hidden=8)
    model = mixture(expert, shared_experts=1, channels_last=False)
    x = torch.randn(4, *IMG)
    routed, _ = model.moe(x, router_input=model.gate_encoder(x))
    expected = (routed + model.shared[0](x).softmax(-1)) / 2
    torch.testing.assert_close(model(x)[0].exp(), expected)


def test_mixture_of_mixed_experts_checks_the_count():
    groups = [
        {"count": 2, "expert": functools.partial(CNNExpert, width=8)},
        {"count": 1, "expert": functools.partial(MLPExpert, hidden=8)},
    ]
    factory = functools.partial(mixed, groups=groups)
    model = mixture(factory, num_experts=3, shared_experts=1)
    assert [type(e) for e in model.moe.experts] == [CNNExpert, CNNExpert, MLPExpert]
    assert isinstance(model.shared[0], CNNExpert)
    assert model(torch.randn(2, *IMG))[0].shape == (2, K)
    with pytest.raises(ValueError, match="but experts=4"):
        mixture(factory, num_experts=4)


def test_tree_balance_reaches_the_routing_record_through_the_model():
    reg = TreeBalanceLoss(weight=0.5)
    expert = functools.partial(SoftTreeExpert, depth=2)
    model = MixtureClassifier(
        (6,), K, 3, expert, SoftmaxGate, regularizers={"tree_balance": reg}
    )  # dense gate: every tree sees every input
    x = torch.randn(8, 6)
    _, (routing,) = model(x)
    expected = 0.0
    for tree in model.moe.experts:
        p = tree.node_probs(x)
        reach = tree._log_reach(*tree._log_branches(x))[0].exp()
        expected = expected + tree.balance_penalty(p, reach)
    torch.testing.assert_close(routing.aux_losses["tree_balance"], 0.5 * expected)
    routing.aux_losses["tree_balance"].backward()
    assert model.moe.experts[0].inner.weight.grad is not None


def test_the_probs_combiner_keeps_a_distribution_for_any_gate_weights():
    from moe_exp.models.mixture import _fill_to_uniform

    p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    short = _fill_to_uniform(0.5 * p)  # weights summing to 0.5: half goes to the uniform
    torch.testing.assert_close(short, 0.5 * p + 0.5 / 3)
    over = _fill_to_uniform(3.0 * p)  # ReLU weights summing to 3: scaled back
    torch.testing.assert_close(over, p)
    torch.testing.assert_close(_fill_to_uniform(p), p)


def test_the_gate_sees_only_what_gate_input_leaves_it():
    x = torch.rand(6, *IMG)
    hue_swapped = x[:, [2, 0, 1]]  # the same channel mean at every pixel
    reshaped = x.flatten(2)[:, :, torch.randperm(16 * 16)].view_as(x)  # the same colour means
    cnn = functools.partial(CNNExpert, width=4)
    grey, colour, image = (mixture(cnn, gate_input=v).eval() for v in ("grey", "colour", "image"))
    assert grey.gate_encoder.net[0].in_channels == 1
    assert torch.allclose(grey.route(x).logits, grey.route(hue_swapped).logits, atol=1e-6)
    assert torch.allclose(colour.route(x).logits, colour.route(reshaped).logits, atol=1e-6)
    assert not torch.allclose(image.route(x).logits, image.route(hue_swapped).logits, atol=1e-3)
    log_probs, _ = grey(x)  # the experts still see all of it
    assert log_probs.shape == (6, K)
    with pytest.raises(ValueError, match="gate_input='edges' is not one of image, grey, colour"):
        mixture(cnn, gate_input="edges")
