"""Small networks and scoring helpers shared by the criteria tests."""

import torch
from torch import nn

from fxprune.passes.score_bn_scale import bn_scale_scores
from fxprune.passes.score_fpgm import fpgm_scores
from fxprune.passes.score_hessian import hessian_scores
from fxprune.passes.score_lamp import lamp_scores
from fxprune.passes.score_random import random_scores
from fxprune.passes.score_taylor import taylor_scores

W1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # hidden channel c is row c ...
W2 = torch.tensor([[2.0, -1.0, 0.5]])                    # ... and column c here
BATCHES = [torch.tensor([[1.0, 2.0], [0.5, -1.0]]), torch.tensor([[-1.0, 1.0], [2.0, 0.0], [0.0, 1.0]])]


def linear_net(w1=W1, w2=W2):
    net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(w1)
        net[1].weight.copy_(w2)
    return net


def score(name, groups, **kw):
    fns = {"taylor": taylor_scores, "hessian": hessian_scores, "lamp": lamp_scores, "fpgm": fpgm_scores,
           "bn-scale": bn_scale_scores, "random": random_scores}
    if name in ("taylor", "hessian"):
        return fns[name](groups, kw.pop("data", BATCHES), kw.pop("loss_fn", None), progress=False, **kw)
    return fns[name](groups, **kw)


def hidden(groups, scores):
    return scores.values[list(groups.prunable[0].classes)]


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.down(x))


def resnet_like():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         Block(8, 8, 1), Block(8, 16, 2), nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 5))


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
_GEN = torch.Generator().manual_seed(2)
DATA = [(torch.randn(4, 3, 16, 16, generator=_GEN), torch.randint(0, 5, (4,), generator=_GEN)) for _ in range(3)]
CRITERIA = ["bn-scale", "taylor", "hessian", "random", "lamp", "fpgm"]
DATA_DRIVEN = {"taylor", "hessian"}
