"""The probe budget and row choice: counts, scores against hand computations, and the rows a guard really probes."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safestep import SafeStep
from safestep.bounds import Ghost
from safestep.probe import LogitProbe, check_probe_size, choose_rows, probe_count, row_scores


@pytest.mark.parametrize("batch, size, expected", [(128, 0.125, 16), (16, 0.125, 2), (10, 0.125, 2), (3, 0.125, 1),
                                                   (64, 0.5, 32), (64, 1.0, 64), (64, 20, 20), (8, 20, 8), (64, None, 64)])
def test_probe_count_is_a_share_a_count_or_everything(batch, size, expected):
    assert probe_count(batch, size) == expected


@pytest.mark.parametrize("bad", [0, -1, 0.0, 1.5, True, "all", 2.0])
def test_bad_probe_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="probe_size"):
        check_probe_size(bad)


def test_scores_are_the_negative_margin_or_the_cross_entropy():
    z = torch.tensor([[3.0, 1.0, 0.0], [2.0, 1.9, -1.0], [0.0, 5.0, 4.0]])
    assert row_scores(z).tolist() == pytest.approx([-2.0, -0.1, -1.0])
    labels = torch.tensor([0, 2, 0])
    expected = torch.nn.functional.cross_entropy(z, labels, reduction="none")
    assert row_scores(z, labels).tolist() == pytest.approx(expected.tolist())


def test_sequence_scores_take_the_hardest_position_and_skip_ignored_ones():
    z = torch.zeros(2, 3, 4)
    z[0, :, 0] = 1.0  # sequence 0: class 0 wins by 1 everywhere
    z[1, 1, 3] = 9.0  # sequence 1, position 1: class 3 wins by 9
    labels = torch.tensor([[1, 0, 0], [0, -100, 0]])
    ce = lambda row, label: float(torch.logsumexp(row, 0) - row[label])  # noqa: E731
    assert row_scores(z, labels).tolist() == pytest.approx([ce(z[0, 0], 1), ce(z[1, 0], 0)])  # position (1, 1) ignored
    labels[1, 1] = 0
    assert row_scores(z, labels).tolist() == pytest.approx([ce(z[0, 0], 1), ce(z[1, 1], 0)])
    z[0, 2, 1] = math.nan
    assert row_scores(z, labels)[0].item() == math.inf  # a broken row must be probed


def test_choose_rows_takes_the_top_scores_in_ascending_order_ties_to_the_lower_index():
    scores = torch.tensor([0.1, 5.0, 0.1, 3.0, 5.0, -1.0])
    assert choose_rows(6, 3, scores, step=0).tolist() == [1, 3, 4]
    assert choose_rows(6, 2, torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), step=7).tolist() == [0, 1]
    assert choose_rows(6, 6, scores, step=0) is None


def test_a_mixed_choice_spends_half_on_scores_and_half_on_the_rotated_stride():
    scores = torch.zeros(16)
    scores[[3, 11]] = 5.0
    assert choose_rows(16, 4, scores, step=0, scored_share=0.5).tolist() == [0, 3, 4, 11]  # stride 0, 4, 8, 12
    assert choose_rows(16, 4, scores, step=1, scored_share=0.5).tolist() == [1, 3, 5, 11]  # rotated by the step
    scores[[0, 4]] = 9.0  # the stride's first picks are already scored: the next stride candidates stand in
    assert choose_rows(16, 4, scores, step=0, scored_share=0.5).tolist() == [0, 4, 8, 12]


def _problem(model, seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)
    x[37] *= 4.0  # one far-out row, labelled with its least likely class: the largest loss, and the logits
    with torch.no_grad():  # that move most along the step
        y[37] = model(x[37:38]).argmin()
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))


def _rho(select, seed=0):
    model = _model(seed)
    x, y = _problem(model, seed)
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.3), model, mode="monitor", probe_select=select,
                   labels_fn=lambda batch: y)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    F.cross_entropy(model(x), y).backward()
    opt.step()
    delta = {n: p.detach() - theta0[n] for n, p in model.named_parameters()}
    tau = math.sqrt(sum(float((d**2).sum()) for d in delta.values()))
    full = LogitProbe(model)(theta0, {n: d / tau for n, d in delta.items()}, x, "jvp")
    radii = Ghost().row_radii(full.logits, full.slopes)
    return opt.last_report, radii


@pytest.mark.parametrize("select", ["score", "mixed"])
def test_scored_rows_find_the_row_that_sets_the_radius_and_a_stride_misses_it(select):
    report, radii = _rho(select)
    assert int(radii.argmin()) == 37 and report.rows_probed == 8
    assert report.rho == pytest.approx(radii.min().item(), rel=1e-5)  # the budget found the binding row
    strided, _ = _rho("stride")
    assert strided.rho > 1.05 * radii.min().item()  # rows 0, 8, ..., 56 do not contain row 37


def test_the_choice_is_a_deterministic_function_of_batch_and_state():
    first, _ = _rho("score")
    again, _ = _rho("score")
    assert first.rho == again.rho and first.rows_probed == again.rows_probed
