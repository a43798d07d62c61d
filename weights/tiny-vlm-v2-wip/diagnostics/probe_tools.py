"""Shared by the diagnostics: a proportion's 95% Wilson score interval, a held-out softmax probe, and the
related pairs of named objects in a scene."""

import math

import torch

from autoselect.testbed import data_v2


def wilson_interval(right: int, total: int, z: float = 1.96):
    """The 95% Wilson score interval of a proportion right / total."""
    p = right / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def classify(x, y, train, classes, hidden=0, steps=300):
    """Held-out accuracy of a softmax classifier (hidden = 0: linear; else one GELU layer), Adam, full batch."""
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    width = x.shape[1]
    net = (torch.nn.Linear(width, classes) if hidden == 0 else
           torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, classes)))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(x[:train]), y[:train]).backward()
        optimiser.step()
    with torch.no_grad():
        return float((net(x[train:]).argmax(1) == y[train:]).float().mean())


def related_pairs(scene):
    """(a, b, direction) for every ordered pair of named objects (`data_v2._unique`) with a relation."""
    named = data_v2._unique(scene.objects)
    return [(a, b, actual) for a in named for b in named if a is not b and (actual := data_v2.relation(a, b))]
