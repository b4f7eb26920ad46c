"""The pure losses against hand-computed values and their naive equivalents."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.training.losses import (
    IGNORE_INDEX,
    dpo_loss,
    selective_log_softmax,
    sequence_logps,
    sft_loss,
    token_logps,
)


def test_selective_log_softmax_equals_its_naive_form():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 4
    index = torch.randint(0, 11, (2, 5))
    naive = torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index), naive)
    # hand value: logits [0, ln 3] -> p = [1/4, 3/4]
    two = torch.tensor([[0.0, math.log(3.0)]])
    assert torch.allclose(selective_log_softmax(two, torch.tensor([1])),
                          torch.tensor([math.log(0.75)]))
    bf16 = selective_log_softmax(logits.bfloat16(), index)
    assert bf16.dtype == torch.float32


def _uniform_then_peaked():
    """Vocab 2. Row 0: position 0 predicts with p = [1/4, 3/4]; position 1 uniform."""
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 5.0]]])  # (1, 3, 2)
    return logits


def test_sft_loss_by_hand_with_the_shift():
    logits = _uniform_then_peaked()
    # labels[0] is never predicted; labels[1] = 1 is predicted by position 0 (p 3/4),
    # labels[2] = 0 by position 1 (p 1/2)
    labels = torch.tensor([[7, 1, 0]])
    expected = -(math.log(0.75) + math.log(0.5)) / 2
    assert math.isclose(sft_loss(logits, labels).item(), expected, rel_tol=1e-6)
    # mask the first completion token (a prompt token): only position 1 counts
    masked = torch.tensor([[7, IGNORE_INDEX, 0]])
    assert math.isclose(sft_loss(logits, masked).item(), math.log(2.0), rel_tol=1e-6)
    # num_items divides the sum instead (gradient accumulation over micro-batches)
    assert math.isclose(sft_loss(logits, labels, num_items=4).item(),
                        -(math.log(0.75) + math.log(0.5)) / 4, rel_tol=1e-6)


def test_sft_loss_equals_cross_entropy_and_ignores_padding():
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 13, requires_grad=True)
    labels = torch.randint(0, 13, (3, 6))
    labels[:, :2] = IGNORE_INDEX  # prompt
    labels[2, 4:] = IGNORE_INDEX  # padding
    naive = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1),
                            ignore_index=IGNORE_INDEX)
    loss = sft_loss(logits, labels)
    torch.testing.assert_close(loss, naive)
    loss.backward()
    assert logits.grad[2, 4:].abs().sum() == 0  # padded positions get no gradient
    assert logits.grad[:, 0].abs().sum() == 0  # position 0 predicts a prompt token


def test_sft_loss_without_labels_is_zero():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss = sft_loss(logits, torch.full((1, 3), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()


def test_sequence_logps_by_hand():
    logits = _uniform_then_peaked().repeat(2, 1, 1)
    labels = torch.tensor([[7, 1, 0], [7, IGNORE_INDEX, 0]])
    expected = torch.tensor([math.log(0.75) + math.log(0.5), math.log(0.5)])
    torch.testing.assert_close(sequence_logps(logits, labels), expected)
    torch.testing.assert_close(sequence_logps(logits, labels, average=True),
                               torch.tensor([expected[0].item() / 2, math.log(0.5)]))
    logps, mask = token_logps(logits, labels)
    assert mask.tolist() == [[True, True], [False, True]]
    assert logps[1, 0] == 0


# --- preference losses: each checked against its naive formula, pair by pair ------------------

def _naive(h: float, beta: float, loss_type: str, e: float) -> float:
    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))
    if loss_type == "sigmoid":
        return -(1 - e) * log_sigmoid(beta * h) - e * log_sigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - e) * log_sigmoid(beta * h) + e * log_sigmoid(-beta * h)) / (1 - 2 * e)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss_type,e", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0),
                                         ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_losses_equal_their_naive_formulas(loss_type, e):
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16) * 5 - 20 for _ in range(4))
    out = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=e)
    expected = [_naive(float((a - c) - (b - d)), 0.3, loss_type, e)
                for a, b, c, d in zip(pc, pr, rc, rr)]
    torch.testing.assert_close(out.losses, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, 0.3 * (pr - rr))


def test_dpo_loss_is_log_2_while_the_policy_is_the_reference():
    logps = torch.tensor([-12.5, -40.0, -3.25])
    out = dpo_loss(logps, logps - 2, logps, logps - 2)
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2)), atol=1e-6, rtol=0)
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-10.0], requires_grad=True)
    rejected = torch.tensor([-10.0], requires_grad=True)
    out = dpo_loss(chosen, rejected, torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.1)
    out.losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises chosen, lowers rejected
    assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("kwargs", [{"loss_type": "kto"}, {"beta": 0.0},
                                    {"label_smoothing": 0.5},
                                    {"loss_type": "hinge", "label_smoothing": 0.1}])
def test_bad_dpo_settings_are_refused(kwargs):
    x = torch.zeros(2)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, **kwargs)
