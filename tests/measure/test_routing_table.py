"""The per-input routing table on hand-sized models: token routing and capacity drops."""

import functools

import torch

from moe_exp.data.in_memory import Split
from moe_exp.measure.routing_table import routing_rows, write_routing_table
from moe_exp.models import MixtureClassifier, VisionMoE
from moe_exp.moe.experts import MLPExpert
from moe_exp.moe.gates.topk import TopKGate


def _split(n=12):
    g = torch.Generator().manual_seed(0)
    latents = torch.randint(0, 2, (n, 1), generator=g).float()
    return Split(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3, latents)


def test_token_routing_gets_one_row_per_image_per_layer():
    torch.manual_seed(0)
    model = VisionMoE(
        (3, 8, 8), 3, 4, None, functools.partial(TopKGate, k=2), patch=4, dim=8, depth=2
    )
    rows = routing_rows(model, _split(), 5, ["flip"], {"flip": ["no", "yes"]})
    assert len(rows) == 12 and rows[0]["flip"] in ("no", "yes")
    weights = [rows[0][f"layer0_w_e{e}"] for e in range(4)]
    assert abs(sum(weights) - 1) < 1e-4  # top-2 weights sum to 1 per token, so per image


def test_capacity_drops_and_expert_predictions_are_recorded(tmp_path):
    torch.manual_seed(0)
    model = MixtureClassifier(
        (3, 8, 8),
        3,
        4,
        functools.partial(MLPExpert, hidden=8),
        functools.partial(TopKGate, k=2, eval_capacity_factor=0.5),
        channels_last=False,
    )
    rows = routing_rows(model, _split(), 12, [], {})
    kept_assignments = sum(f"expert_{j}" in row for row in rows for j in (1, 2))
    dropped = sum(row["dropped"] for row in rows)
    assert dropped == 24 - kept_assignments and dropped >= 12  # capacity 3 per expert: <= 12
    kept = [row for row in rows if "expert_1" in row]
    assert all(isinstance(row["expert_1_prediction"], int) for row in kept)
    path = write_routing_table(tmp_path / "t.csv", rows)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["index", "label", "prediction"] and "p_e3" in header


def test_accuracy_by_value_reads_each_latent_value_of_the_table():
    from moe_exp.measure.routing_table import accuracy_by_value

    rows = [
        {"label": 0, "prediction": 0, "colour": "red", "shape": "circle"},
        {"label": 1, "prediction": 0, "colour": "red", "shape": "cross"},
        {"label": 2, "prediction": 2, "colour": "light blue", "shape": "cross"},
    ]
    values = {"colour": ["red", "light blue", "white"], "shape": ["circle", "cross"]}
    assert accuracy_by_value(rows, values, "test/") == {
        "test/acc_colour_red": 0.5,
        "test/acc_colour_light_blue": 1.0,  # no white input: no key rather than a made-up 0
        "test/acc_shape_circle": 1.0,
        "test/acc_shape_cross": 0.5,
    }
