"""lambda_max against analytic Hessians."""

import torch
from torch import nn

from craft_deploy.analyze import lambda_max, power_iteration


def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12))
    eig = torch.tensor([9.0, 4.0, 3.0] + [1.0] * 9)
    a = q @ torch.diag(eig) @ q.T  # Hessian of 0.5 w^T A w
    res = power_iteration(lambda v: [a @ v[0]], [torch.zeros(12)], iters=100, tol=1e-6)
    assert res["converged"] and abs(res["lambda_max"] - 9.0) < 1e-3
    assert res["iterations"] == len(res["trace"]) < 100


def test_lambda_max_of_least_squares_matches_2_xtx_over_n():
    """For mean((Xw - y)^2) the Hessian is 2 X^T X / N, whatever w is."""
    torch.manual_seed(0)
    x = torch.randn(64, 5) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.2])
    y = torch.randn(64, 1)
    model = nn.Linear(5, 1, bias=False)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    res = lambda_max(model, nn.MSELoss(), batches, iters=200, tol=1e-7)
    expected = torch.linalg.eigvalsh(2 * x.T @ x / 64).max().item()
    assert abs(res["lambda_max"] - expected) / expected < 1e-3
    assert res["batches"] == 2 and res["images"] == 64


def test_lambda_max_with_batch_statistics_matches_the_analytic_hessian():
    """BatchNorm (no affine) then a linear layer under MSE: the Hessian is 2 Z^T Z / N with Z the normalised inputs,
    normalised by each batch's own statistics in batch mode and by the running ones in eval mode."""
    torch.manual_seed(0)
    x = torch.randn(64, 5) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.2]) + 1.0
    y = torch.randn(64, 1)
    bn = nn.BatchNorm1d(5, affine=False)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(4.0)
    model = nn.Sequential(bn, nn.Linear(5, 1, bias=False))
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]

    def expected(normalise):
        h = sum(2 * normalise(xb).T @ normalise(xb) / len(xb) for xb, _ in batches) / len(batches)
        return torch.linalg.eigvalsh(h).max().item()

    batch = expected(lambda xb: (xb - xb.mean(0)) / torch.sqrt(xb.var(0, unbiased=False) + bn.eps))
    running = expected(lambda xb: (xb - 0.5) / (4.0 + bn.eps) ** 0.5)
    res = lambda_max(model, nn.MSELoss(), batches, iters=300, tol=1e-8, batchnorm="batch")
    assert abs(res["lambda_max"] - batch) / batch < 1e-3 and res["batchnorm"] == "batch"
    assert torch.all(bn.running_mean == 0.5) and torch.all(bn.running_var == 4.0) and not bn.training
    res = lambda_max(model, nn.MSELoss(), batches, iters=300, tol=1e-8)
    assert abs(res["lambda_max"] - running) / running < 1e-3 and abs(batch - running) / running > 0.1


def test_lambda_max_runs_through_a_timm_cnn():
    from craft_deploy.models import load_model

    model = load_model("test_efficientnet", num_classes=4, pretrained=False)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    res = lambda_max(model, nn.CrossEntropyLoss(), [(x, y)], iters=5, tol=0.0)
    assert res["lambda_max"] > 0 and res["iterations"] == 5 and not res["converged"]


def test_weight_rank_of_a_known_spectrum():
    from craft_deploy.analyze import weight_rank

    lin = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(10, 10))
        lin.weight.copy_(q @ torch.diag(torch.tensor([3.0, 2.0, 1.0] + [0.0] * 7)) @ q.T)  # energies 9, 4, 1
    row = weight_rank(nn.Sequential(lin))["0"]
    assert row["components_80"] == 2 and row["components_90"] == 2  # 9/14 = 64%, 13/14 = 93%
    assert row["rank_fraction_80"] == 0.2
    p = torch.tensor([9.0, 4.0, 1.0]) / 14
    assert abs(row["effective_rank"] - torch.exp(-(p * p.log()).sum()).item()) < 1e-3


def test_activation_ranges_find_an_outlier_channel():
    from craft_deploy.analyze import activation_ranges

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Identity())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4, 3).view(4, 3, 1, 1) * torch.tensor([1.0, 1.0, 50.0, 0.0]).view(4, 1, 1, 1))
        model[0].bias.zero_()
    x = torch.rand(2, 3, 5, 5)
    res = activation_ranges(model, lambda m: m(x))
    conv = res["0"]
    assert conv["channels"] == 4 and abs(conv["max"][2] - 50 * x[:, 2].max().item()) < 1e-4
    assert conv["outlier_ratio"] > 20


def test_model_cost_counts_multiply_adds_by_hand():
    """Conv 3->8, 3x3, stride 2 on 16x16 (8x8 outputs), a depthwise 3x3 conv, then Linear 8*8*8 -> 10 and a low-rank
    pair; a 2:4-pruned Linear counts half its multiply-adds over nonzero weights."""
    from craft_deploy.analyze import model_cost

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.Flatten(),
        nn.Linear(512, 10),
        nn.Linear(10, 4, bias=False),
        nn.Linear(4, 10),
    )
    with torch.no_grad():
        model[3].weight.view(-1, 4)[:, :2] = 0  # 2:4 along the input dimension
    cost = model_cost(model, (3, 16, 16))
    conv, depthwise, linear, pair = 64 * 8 * 27, 64 * 8 * 9, 512 * 10, 10 * 4 + 4 * 10
    assert cost["multiply_adds"] == conv + depthwise + linear + pair
    assert cost["nonzero_multiply_adds"] == conv + depthwise + linear // 2 + pair
    assert cost["parameters"] == sum(p.numel() for p in model.parameters())
    assert cost["layer_weights"] - cost["nonzero_layer_weights"] == 512 * 10 // 2


def test_analyze_cli_writes_json_and_plot(tiny_bundle, tmp_path):
    import json

    from click.testing import CliRunner

    from craft_deploy.cli.main import main

    res = CliRunner().invoke(
        main,
        [
            "analyze",
            str(tiny_bundle),
            "--lambda-images",
            "16",
            "--lambda-iters",
            "3",
            "--calib-samples",
            "32",
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "a" / "analyze.json").read_text())
    assert rec["sharpness"]["iterations"] <= 3 and rec["sharpness"]["images"] == 16
    assert rec["weight_rank"] and rec["activation_ranges"]
    assert rec["cost"]["multiply_adds"] >= rec["cost"]["nonzero_multiply_adds"] > 0 and "multiply-adds" in res.output
    assert (tmp_path / "a" / "analyze.png").read_bytes()[:4] == b"\x89PNG"
