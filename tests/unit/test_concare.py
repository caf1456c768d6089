"""ConCare: grouped GRU, masking, attention, DeCov, the bootstrap metrics, and the module's input checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from eagrl.callbacks import measured_features, rank_features
from eagrl.errors import EAGRLInputError
from eagrl.evaluation import binary_metrics, bootstrap_metrics
from eagrl.models.concare import ConCare, GroupedGRU, decov_loss
from lightning_modules import ConCareModule


def test_grouped_gru_equals_one_torch_gru_per_feature():
    torch.manual_seed(0)
    n_features, hidden = 3, 5
    grouped = GroupedGRU(n_features, hidden)
    x = torch.randn(4, 7, n_features)  # [B, T, F]
    out = grouped(x)  # [B, T, F, H]
    for f in range(n_features):
        gru = torch.nn.GRU(1, hidden, batch_first=True)
        with torch.no_grad():
            gru.weight_ih_l0.copy_(grouped.w_in[f][:, None])
            gru.weight_hh_l0.copy_(grouped.w_hid[f].T)
            gru.bias_ih_l0.copy_(grouped.b_in[f])
            gru.bias_hh_l0.copy_(grouped.b_hid[f])
        expected, _ = gru(x[..., f : f + 1])
        torch.testing.assert_close(out[:, :, f], expected, atol=1e-5, rtol=1e-5)


def _patients(seed: int = 0, batch: int = 5, steps: int = 6, n_features: int = 4, n_demo: int = 2):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([steps, 3, 1, 4, 2][:batch])
    mask = torch.arange(steps)[None] < lengths[:, None]  # [B, T]
    x = torch.randn(batch, steps, n_features, generator=g)
    days = torch.cumsum(torch.randint(1, 3, (batch, steps), generator=g), dim=1)
    return x, torch.randn(batch, n_demo, generator=g), mask, days


@pytest.mark.parametrize("faithful", [True, False])
def test_padding_days_change_nothing(faithful):
    torch.manual_seed(0)
    net = ConCare(4, 2, hidden=8, heads=2, ffn_hidden=8, faithful=faithful).eval()
    x, demo, mask, days = _patients()
    out = net(x, demo, mask, days)
    garbage = x.clone()
    garbage[~mask] = 1e3  # padded days hold nonsense
    days_garbage = days.clone()
    days_garbage[~mask] = 999
    out_garbage = net(garbage, demo, mask, days_garbage)
    torch.testing.assert_close(out["logit"], out_garbage["logit"])
    torch.testing.assert_close(out["attention"], out_garbage["attention"])
    for b in range(len(x)):  # each patient alone, unpadded, gives the same prediction as in the batch
        t = int(mask[b].sum())
        alone = net(x[b : b + 1, :t], demo[b : b + 1], mask[b : b + 1, :t], days[b : b + 1, :t])
        torch.testing.assert_close(alone["logit"], out["logit"][b : b + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone["attention"], out["attention"][b : b + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("faithful", [True, False])
def test_attention_is_a_distribution_over_features(faithful):
    torch.manual_seed(1)
    net = ConCare(4, 2, hidden=8, heads=2, ffn_hidden=8, faithful=faithful)
    out = net(*_patients())
    assert out["logit"].shape == (5,) and out["decov"].shape == ()
    assert out["attention"].shape == (5, 4)  # demographic token dropped
    assert (out["attention"] >= 0).all()
    torch.testing.assert_close(out["attention"].sum(dim=1), torch.ones(5))


def test_decov_on_a_hand_computed_example():
    # one token, two dims, three patients: x = (1, 2, 3), y = (2, 4, 9) -> cov_xy = (3 + 0 + 4) / 2 = 3.5;
    # the off-diagonal entries squared: 2 x 3.5^2 = 24.5; half of it: 12.25
    tokens = torch.tensor([[[1.0, 2.0]], [[2.0, 4.0]], [[3.0, 9.0]]])  # [B=3, N=1, H=2]
    assert decov_loss(tokens).item() == pytest.approx(12.25)
    assert decov_loss(tokens[:1]).item() == 0.0
    uncorrelated = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]], [[0.0, 1.0]], [[0.0, -1.0]]])
    assert decov_loss(uncorrelated).item() == pytest.approx(0.0)


def _auroc_by_pairs(probs: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = probs[labels == 1], probs[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def test_metrics_on_a_hand_computed_case():
    probs, labels = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    point = binary_metrics(probs, labels)
    assert point["auroc"] == pytest.approx(0.75)  # 3 of 4 (positive, negative) pairs ordered right
    assert point["auprc"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)  # precision 1 at recall .5, 2/3 at recall 1
    assert point["accuracy"] == pytest.approx(0.75) and point["f1"] == pytest.approx(2 / 3)


def test_bootstrap_matches_a_hand_rolled_resampling():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=40)
    probs = np.clip(labels * 0.3 + rng.random(40) * 0.7, 0, 1)
    out = bootstrap_metrics(torch.tensor(probs), torch.tensor(labels), n_bootstrap=100, seed=7)
    draw, values = np.random.default_rng(7), []
    while len(values) < 100:
        index = draw.integers(0, 40, size=40)
        if labels[index].min() != labels[index].max():
            values.append(_auroc_by_pairs(probs[index], labels[index]))
    assert out["auroc"] == pytest.approx(np.mean(values), abs=1e-6)
    assert out["auroc_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-6)
    assert bootstrap_metrics(torch.tensor(probs), torch.tensor(labels), 100, seed=7) == out
    assert bootstrap_metrics(torch.tensor(probs), torch.tensor(labels), 100, seed=8)["auroc"] != out["auroc"]


def test_bootstrap_of_a_single_class_is_nan_not_an_error():
    out = bootstrap_metrics(torch.tensor([0.2, 0.7]), torch.tensor([1, 1]), n_bootstrap=10)
    assert np.isnan(out["auroc"]) and np.isnan(out["auroc_std"]) and out["accuracy"] == 0.5


def test_rank_features_orders_by_weight():
    ranked, top = rank_features(["a", "b", "c"], [0.2, 0.5, 0.3], top_k=2)
    assert ranked == [["b", 0.5], ["c", 0.3], ["a", 0.2]] and top == ["b", "c"]


def test_rank_features_never_names_a_feature_that_was_never_measured():
    ranked, top = rank_features(["a", "b", "c", "d"], [0.2, 0.5, 0.3, 0.0], top_k=3, measured=[True, False, True, False])
    assert ranked == [["c", 0.3], ["a", 0.2]] and top == ["c", "a"]  # fewer than k measured: a shorter list
    missing = torch.tensor([[[True, False], [True, True]], [[True, True], [False, True]]])  # [B=2, T=2, F=2]
    mask = torch.tensor([[True, True], [True, False]])  # patient 1's day 2 is padding
    assert measured_features(missing, mask).tolist() == [[False, True], [False, False]]


@pytest.mark.parametrize("faithful", [True, False])
def test_concare_is_invariant_to_the_feature_order(faithful):
    """One GRU and one decay rate per feature, attention over an unordered set of tokens: permuting the input
    columns together with their per-feature parameters leaves the prediction unchanged."""
    torch.manual_seed(3)
    net = ConCare(4, 2, hidden=8, heads=2, ffn_hidden=8, faithful=faithful).eval().double()
    x, demo, mask, days = _patients()
    x, demo = x.double(), demo.double()
    permutation = torch.tensor([2, 0, 3, 1])
    permuted = copy.deepcopy(net)
    with torch.no_grad():
        for name in ("w_in", "w_hid", "b_in", "b_hid"):
            getattr(permuted.gru, name).copy_(getattr(net.gru, name)[permutation])
        permuted.time_attention.rate.copy_(net.time_attention.rate[permutation])
    out, out_permuted = net(x, demo, mask, days), permuted(x[..., permutation], demo, mask, days)
    torch.testing.assert_close(torch.sigmoid(out_permuted["logit"]), torch.sigmoid(out["logit"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out_permuted["attention"], out["attention"][:, permutation], atol=1e-6, rtol=0)
    moved = net(x[..., permutation], demo, mask, days)  # the columns alone: another feature's values in each GRU
    assert not torch.allclose(moved["logit"], out["logit"], atol=1e-6)


def test_attention_finds_the_one_feature_the_label_depends_on():
    """Generated data: the label is the sign of feature 3's mean; the expert must rank feature 3 first."""
    torch.manual_seed(0)
    batch, steps, n_features = 512, 6, 8
    lengths = torch.randint(2, steps + 1, (batch,))
    mask = torch.arange(steps)[None] < lengths[:, None]
    x = torch.randn(batch, steps, n_features) * mask[..., None]
    y = ((x[:, :, 3].sum(1) / lengths) > 0).float()
    demo = torch.randn(batch, 2)
    net = ConCare(n_features, 2, hidden=32, heads=4, ffn_hidden=32)
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(150):
        i = torch.randint(0, batch, (64,))
        out = net(x[i], demo[i], mask[i])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out["logit"], y[i]) + 10 * out["decov"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        out = net.eval()(x, demo, mask)
    names = [f"f{j}" for j in range(n_features)]
    firsts = [rank_features(names, w, 5)[1][0] for w in out["attention"].tolist()]
    assert ((out["logit"] > 0).float() == y).float().mean() > 0.9
    assert firsts.count("f3") / batch > 0.8


def _module(names=("a", "b", "c")) -> ConCareModule:
    return ConCareModule(hidden=8, heads=2, ffn_hidden=8, feature_names=list(names), n_demographic=2)


def _batch(n_features: int = 3):
    x, demo, mask, days = _patients(n_features=n_features + 2)
    return {"x": x, "demographics": demo, "mask": mask, "days": days, "label": torch.ones(len(x))}


def test_a_non_finite_input_names_the_feature():
    module, batch = _module(), _batch()
    batch["x"][1, 0, 3] = float("nan")  # column 3 = dynamic feature "b" (after 2 demographics)
    with pytest.raises(EAGRLInputError, match=r"feature 'b' of the sample at batch position 1, day index 0"):
        module.model_step(batch)
    batch = _batch()
    batch["demographics"][4, 1] = float("inf")
    with pytest.raises(EAGRLInputError, match=r"demographic input 1 of the sample at batch position 4"):
        module.model_step(batch)


def test_a_checkpoint_of_another_feature_set_is_refused():
    module = _module(("a", "b", "c"))
    other = {"hyper_parameters": {"feature_names": ["a", "b", "d", "e"]}}
    with pytest.raises(EAGRLInputError, match=r"missing from the checkpoint: \['c'\].*only in the checkpoint: \['d', 'e'\]"):
        module.on_load_checkpoint(other)
    module.on_load_checkpoint({"hyper_parameters": {"feature_names": ["a", "b", "c"]}})
