import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_exp.moe.experts.bank import MLPExpertBank, grouped_linear
from moe_exp.moe.gates import TopKGate
from moe_exp.moe.layer import GroupedExperts, MoE, dispatch_combine
from moe_exp.moe.layout import ExpertLayout

N, D, H, OUT, E = 48, 6, 10, 4, 5


def as_modules(bank: MLPExpertBank) -> nn.ModuleList:
    """The same experts as ordinary nn.Linear modules (copied weights)."""
    experts = nn.ModuleList()
    for e in range(bank.num_experts):
        first, second = nn.Linear(bank.d_in, bank.d_hidden), nn.Linear(bank.d_hidden, bank.d_out)
        with torch.no_grad():
            first.weight.copy_(bank.w1[e].t())
            first.bias.copy_(bank.b1[e])
            second.weight.copy_(bank.w2[e].t())
            second.bias.copy_(bank.b2[e])
        experts.append(nn.Sequential(first, nn.GELU(), second))
    return experts


def test_bank_is_grouped_experts():
    assert isinstance(MLPExpertBank(E, D, H, OUT), GroupedExperts)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """One thread: one matmul per expert; two: the bank pairs experts (padded layout)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("k", [1, 2])
def test_bank_equals_linear_experts_in_outputs_and_gradients(k, threads):
    torch.manual_seed(0)
    bank = MLPExpertBank(E, D, H, OUT, activation="gelu")
    modules = as_modules(bank)
    gate = TopKGate(D, E, k=k)
    x = torch.randn(N, D, requires_grad=True)
    routing = gate(x)
    # force an expert with no inputs: its gradients must be zero, not garbage
    routing.indices = routing.indices.masked_fill(routing.indices == 3, 0)

    counts = torch.bincount(routing.indices.flatten(), minlength=E).tolist()
    layout = bank.layout(x, counts)
    assert (layout.positions is not None) == (threads == 2)
    assert (layout.rows > sum(counts)) == (threads == 2)  # the padding path is exercised

    y = dispatch_combine(x, routing, bank)
    loss = (y * torch.linspace(-1, 1, OUT)).square().sum()
    params = [x, gate.proj.weight, bank.w1, bank.b1, bank.w2, bank.b2]
    g_bank = torch.autograd.grad(loss, params, retain_graph=True)

    y_ref = dispatch_combine(x, routing, modules)
    loss_ref = (y_ref * torch.linspace(-1, 1, OUT)).square().sum()
    params = [x, gate.proj.weight, *modules.parameters()]
    g_ref = torch.autograd.grad(loss_ref, params, allow_unused=True)
    g_ref = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_ref, strict=True)]
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_bank[0], g_ref[0], atol=1e-5, rtol=1e-5)
    if k > 1:  # (k = 1 renormalises the kept weight to 1: no router gradient to compare)
        assert g_ref[1].abs().sum() > 0
    torch.testing.assert_close(g_bank[1], g_ref[1], atol=1e-5, rtol=1e-5)
    g_bank, g_ref = [g_bank[0], *g_bank[2:]], [g_ref[0], *g_ref[2:]]
    per_expert = [g_ref[1 + 4 * e : 5 + 4 * e] for e in range(E)]
    torch.testing.assert_close(g_bank[1], torch.stack([w.t() for w, _, _, _ in per_expert]))
    torch.testing.assert_close(g_bank[2], torch.stack([b for _, b, _, _ in per_expert]))
    torch.testing.assert_close(g_bank[3], torch.stack([w.t() for _, _, w, _ in per_expert]))
    torch.testing.assert_close(g_bank[4], torch.stack([b for _, _, _, b in per_expert]))
    assert g_bank[1][3].abs().sum() == 0 and g_bank[4][3].abs().sum() == 0


def test_dropped_assignments_transform_and_predictions_match_linear_experts(threads):
    torch.manual_seed(3)
    bank = MLPExpertBank(E, D, H, OUT)
    modules = as_modules(bank)
    x = torch.randn(N, D, requires_grad=True)
    routing = TopKGate(D, E, k=2, capacity_factor=0.6)(x)
    assert routing.dropped > 0  # capacity-dropped assignments carry index -1
    outs = {}
    for name, experts in (("bank", bank), ("modules", modules)):
        y = dispatch_combine(
            x, routing, experts, lambda t: t.log_softmax(-1), record_predictions=True
        )
        outs[name] = (
            y,
            torch.autograd.grad(y.square().sum(), x, retain_graph=True)[0],
            routing.expert_predictions,
        )
    (y, gx, (rows, ids, pred)), (y_ref, gx_ref, (rows_ref, ids_ref, pred_ref)) = outs.values()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(rows, rows_ref) and torch.equal(ids, ids_ref) and torch.equal(pred, pred_ref)


def test_padding_rows_add_no_inf_or_nan_of_their_own():
    """Expert 4 overflows to inf on every input. Its padding rows must not turn an input it
    was not given (row 0, routed to expert 0) into NaN via inf · 0."""
    torch.manual_seed(6)
    bank = MLPExpertBank(E, D, H, OUT)
    with torch.no_grad():
        bank.b2[4].fill_(float("inf"))
    x = torch.randn(N, D)
    routing = TopKGate(D, E, k=1)(x)
    counts = [12, 0, 20, 9, 7]  # pairs (2, 0) and (3, 4): expert 4 is padded from 7 to 9 rows
    routing.indices = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))[:, None]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert bank.layout(x, counts).rows > N
        y = dispatch_combine(x, routing, bank)
    finally:
        torch.set_num_threads(before)
    finite = y.isfinite().all(-1)
    assert finite[:41].all() and not finite[41:].any()  # rows 41-47 are expert 4's


def test_bank_equals_dense_masked_reference():
    torch.manual_seed(1)
    bank = MLPExpertBank(E, D, H, OUT, activation="relu")
    gate = TopKGate(D, E, k=2)
    x = torch.randn(N, D)
    routing = gate(x)
    y = dispatch_combine(x, routing, bank)
    dense = torch.stack([bank.expert_forward(e, x) for e in range(E)], 1)  # [N, E, OUT]
    ref = (routing.gates().unsqueeze(-1) * dense).sum(1)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    gw = torch.autograd.grad(y.sum(), bank.w1)[0]
    gw_ref = torch.autograd.grad(ref.sum(), bank.w1)[0]
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-5)


def test_grouped_linear_passes_gradcheck():
    torch.manual_seed(2)
    x = torch.randn(7, 3, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, 2, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: grouped_linear(x, w, b, [3, 0, 4]), (x, w, b))
    ref = torch.cat([F.linear(x[:3], w[0].t(), b[0]), F.linear(x[3:], w[2].t(), b[2])])
    torch.testing.assert_close(grouped_linear(x, w, b, [3, 0, 4]), ref)
    with pytest.raises(ValueError, match="counts sum to 6"):
        grouped_linear(x, w, b, [3, 0, 3])


def test_paired_layout_pairs_nearest_counts_padded_to_the_larger():
    layout = ExpertLayout.paired([3, 0, 5, 4, 1])
    # by count: expert 2 (5 rows) with 3 (4), then 0 (3) with 4 (1); expert 1 has no rows
    assert layout.groups == [((2, 3), 5, 0), ((0, 4), 3, 10)] and layout.rows == 16
    expert0, expert2, expert3, expert4 = [10, 11, 12], [0, 1, 2, 3, 4], [5, 6, 7, 8], [13]
    assert layout.positions.tolist() == expert0 + expert2 + expert3 + expert4
    # sorted rows: expert 0 = 0-2, 2 = 3-7, 3 = 8-11, 4 = 12; a padding row repeats its
    # expert's last real row (buffer 9: expert 3's pad; 13-15: expert 4's... and 0's)
    assert layout.sources.tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 0, 1, 2, 12, 12, 12]
    torch.testing.assert_close(
        layout.place(torch.arange(13.0))[layout.positions], torch.arange(13.0)
    )


def test_paired_layout_computes_what_one_matmul_per_expert_computes():
    torch.manual_seed(4)
    counts = [3, 0, 5, 4, 1]
    x = torch.randn(sum(counts), 3, dtype=torch.double, requires_grad=True)
    w = torch.randn(5, 3, 2, dtype=torch.double, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.double, requires_grad=True)
    layout = ExpertLayout.paired(counts)

    def paired(x, w, b):
        padded = x.new_zeros(layout.rows, 3).index_copy(0, layout.positions, x)
        return grouped_linear(padded, w, b, layout).index_select(0, layout.positions)

    assert torch.autograd.gradcheck(paired, (x, w, b))
    torch.testing.assert_close(paired(x, w, b), grouped_linear(x, w, b, counts))
    assert torch.autograd.grad(paired(x, w, b).sum(), w)[0][1].abs().sum() == 0  # no rows


def test_bank_gives_the_same_on_one_thread_and_on_two():
    """One thread: one matmul per expert; two: experts in padded pairs (ExpertLayout)."""
    torch.manual_seed(5)
    bank = MLPExpertBank(E, D, H, OUT)
    x = torch.randn(N, D)
    counts = [12, 0, 20, 9, 7]
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            kind = "paired" if bank.layout(x, counts).positions is not None else "contiguous"
            y = bank.forward_grouped(x, counts)
            results.append((kind, y, torch.autograd.grad(y.square().sum(), bank.w1)[0]))
        finally:
            torch.set_num_threads(threads)
    (kind1, y1, g1), (kind2, y2, g2) = results
    assert (kind1, kind2) == ("contiguous", "paired")
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(g1, g2)


def test_bank_pairs_experts_only_when_blocks_are_small():
    bank, x = MLPExpertBank(E, D, H, OUT), torch.randn(1, D)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert bank.layout(x, [12, 0, 20, 9, 7]).positions is not None
        assert bank.layout(x, [600, 0, 600, 600, 700]).positions is not None
        assert bank.layout(x, [1100, 0, 1100, 1100, 1100]).positions is None
    finally:
        torch.set_num_threads(threads)


def test_bank_in_a_moe_layer_trains_and_dropout_is_train_only():
    torch.manual_seed(3)
    layer = MoE(TopKGate(D, E, k=2), MLPExpertBank(E, D, H, D, dropout=0.5))
    x = torch.randn(N, D)
    y, routing = layer(x)
    assert y.shape == (N, D) and routing.num_experts == E
    assert not torch.allclose(layer(x)[0], layer(x)[0])
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])
    with pytest.raises(ValueError, match="activation"):
        MLPExpertBank(E, D, H, OUT, activation="tanh")
