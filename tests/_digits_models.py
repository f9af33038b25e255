"""Small digits models shared by the evaluation tests (trained once per test session)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from advprune.data import load_dataset, make_loader
from advprune.models import create


@functools.cache
def natural_digits_model(width: int = 8, epochs: int = 4, seed: int = 0) -> nn.Module:
    """digits_cnn trained naturally (no attack): ~97 % test accuracy in ~2 s on one core.

    Cached: callers must not modify it (use copy.deepcopy).
    """
    torch.manual_seed(seed)
    splits = load_dataset("digits")
    model = create("digits_cnn", width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = make_loader(splits.train, 64, shuffle=True, seed=seed)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@functools.cache
def digits_splits():
    """The digits splits (no validation split), loaded once."""
    return load_dataset("digits")


@functools.cache
def digits_test(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` digits test images (N, 1, 8, 8) in [0, 1] and their labels."""
    test = load_dataset("digits").test
    count = len(test) if n is None else n
    x = torch.stack([test[i][0] for i in range(count)])
    y = torch.tensor([int(test[i][1]) for i in range(count)])
    return x, y


class RoundedInputs(nn.Module):
    """Gradient masking: rounds inputs to the digits' 17 grey levels; the input gradient is
    exactly zero almost everywhere, yet the function is nearly the wrapped model's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 16) / 16)
