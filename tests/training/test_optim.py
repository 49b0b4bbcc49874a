"""The optimiser: AdamW fused into one kernel where every parameter's device has it, with the
same updates as torch's tensor-by-tensor AdamW."""

import torch

from moe_exp.training.optim import adamw


def test_adamw_is_fused_on_the_cpu_and_matches_the_tensor_by_tensor_update():
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    fused = adamw([{"params": params, "lr": 1e-2, "weight_decay": 0.1}])
    loop = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for group in (params, copies):
            for p in group:
                p.grad = torch.ones_like(p) * p.detach().sum()
        fused.step()
        loop.step()
    for a, b in zip(params, copies, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_adamw_falls_back_where_a_parameter_cannot_be_fused():
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    assert not adamw([{"params": [meta], "lr": 1e-3}]).defaults["fused"]
