"""Diffusion-DPO invariants (the Diffusion-DPO conventions): ln 2 at equality, sign flip on swap, per-pair mean."""

import math

import pytest
import torch

from ppd_core.train.losses import diffusion_dpo_loss, implicit_accuracy, per_sample_mse, sft_loss


def test_loss_is_ln2_when_policy_equals_reference():
    mse = torch.rand(8)
    out = diffusion_dpo_loss(mse, mse.clone(), beta_dpo=2500.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert out.implicit_acc.item() == 0.5
    assert torch.equal(out.inside, torch.zeros(4))


def test_swapping_winner_and_loser_flips_the_sign():
    model, ref = torch.rand(6), torch.rand(6)
    a = diffusion_dpo_loss(model, ref, beta_dpo=100.0)
    swap = lambda x: torch.cat([x[3:], x[:3]])  # noqa: E731
    b = diffusion_dpo_loss(swap(model), swap(ref), beta_dpo=100.0)
    torch.testing.assert_close(a.inside, -b.inside)
    assert a.implicit_acc.item() + b.implicit_acc.item() == pytest.approx(1.0)


def test_loss_is_the_mean_over_pairs_not_of_the_mean_inside():
    model = torch.tensor([0.0, 0.0, 1.0, -1.0])  # two pairs: w - l = -1 and +1
    ref = torch.zeros(4)
    out = diffusion_dpo_loss(model, ref, beta_dpo=3.0)
    expected = (
        -(
            torch.nn.functional.logsigmoid(torch.tensor(3.0))
            + torch.nn.functional.logsigmoid(torch.tensor(-3.0))
        )
        / 2
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.loss.item() != pytest.approx(
        math.log(2)
    )  # the buggy -logsigmoid(mean(inside)) would give ln 2


def test_lower_winner_error_lowers_the_loss_and_counts_as_correct():
    ref = torch.full((4,), 0.5)
    better = diffusion_dpo_loss(torch.tensor([0.4, 0.4, 0.5, 0.5]), ref, beta_dpo=100.0)
    worse = diffusion_dpo_loss(torch.tensor([0.6, 0.6, 0.5, 0.5]), ref, beta_dpo=100.0)
    assert better.loss < math.log(2) < worse.loss
    assert better.implicit_acc.item() == 1.0 and worse.implicit_acc.item() == 0.0


def test_gradient_flows_to_the_policy_only():
    model = torch.rand(4, requires_grad=True)
    ref = torch.rand(4, requires_grad=True)
    diffusion_dpo_loss(model, ref, beta_dpo=10.0).loss.backward()
    assert model.grad is not None and ref.grad is None


@pytest.mark.parametrize("shapes", [((3,), (3,)), ((4,), (2,)), ((2, 2), (2, 2))])
def test_bad_shapes_are_rejected(shapes):
    with pytest.raises(ValueError):
        diffusion_dpo_loss(torch.zeros(shapes[0]), torch.zeros(shapes[1]), beta_dpo=1.0)


def test_per_sample_mse_and_sft():
    pred = torch.zeros(2, 3, 4, 4)
    target = torch.ones(2, 3, 4, 4)
    target[1] *= 2
    torch.testing.assert_close(per_sample_mse(pred, target), torch.tensor([1.0, 4.0]))
    assert sft_loss(torch.tensor([1.0, 3.0])).item() == 2.0
    assert implicit_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])).item() == pytest.approx(0.625)
