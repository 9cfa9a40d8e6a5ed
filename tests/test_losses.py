"""lambda(t) of Eq. 7."""

import math

import pytest
import torch

from snapgen_cli.core.losses import lambda_t


def test_lambda_t_is_normalised_logit_normal_density():
    t = torch.linspace(0.001, 0.999, 999)
    lam = lambda_t(t)
    assert lambda_t(torch.tensor(0.5)).item() == 1.0  # exactly: the KD terms vanish at t = 0.5
    assert lam.max() == pytest.approx(1.0) and t[lam.argmax()] == pytest.approx(0.5, abs=1e-3)
    density = torch.exp(-torch.logit(t) ** 2 / 2) / (math.sqrt(2 * math.pi) * t * (1 - t))
    torch.testing.assert_close(lam, density / (4 / math.sqrt(2 * math.pi)))
    assert lambda_t(torch.tensor([0.0, 1.0])).tolist() == [0.0, 0.0]
    torch.testing.assert_close(lambda_t(torch.tensor(0.2)), lambda_t(torch.tensor(0.8)))
