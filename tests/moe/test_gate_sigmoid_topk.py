import torch

from moe_exp.moe.gates.sigmoid_topk import SigmoidTopKGate


def test_sigmoid_topk_weights_by_hand():
    gate = SigmoidTopKGate(3, 3, k=2)
    with torch.no_grad():
        gate.proj.weight.copy_(torch.eye(3))
        gate.proj.bias.zero_()
    h = torch.tensor([[2.0, 0.0, -1.0]])
    r = gate(h)
    s = torch.sigmoid(h[0])  # 0.881, 0.5, 0.269: experts 0 and 1 are kept
    assert r.indices.tolist() == [[0, 1]]
    torch.testing.assert_close(r.weights[0], s[:2] / s[:2].sum())
    # a softmax top-2 over the same logits would weight them 0.881 : 0.119, not 0.638 : 0.362
    assert abs(float(r.weights[0, 0]) - 0.638) < 1e-3
