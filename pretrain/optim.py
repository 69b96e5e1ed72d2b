"""Optimizers: SGD, AdamW and LARS (You et al. 2017, as used by SimCLR and BYOL)."""
from __future__ import annotations

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD with momentum and a layer-wise trust ratio.

    For each parameter p with gradient g (weight decay wd folded in first, g <- g + wd * p),
    the update is scaled by ``eta * ||p|| / ||g||`` (1 when either norm is 0). Groups flagged
    ``lars_exclude`` (biases and norm parameters, by the objectives' param groups) get neither
    the trust ratio nor weight decay, as in the SimCLR and BYOL papers.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, nesterov: bool = False):
        if lr < 0 or eta <= 0:
            raise ValueError(f"LARS: lr must be >= 0 and eta > 0, got lr={lr}, eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            exclude = group["lars_exclude"]
            wd = group["weight_decay"]
            if wd != 0 and not exclude:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if not exclude:
                p_norm = torch._foreach_norm(params)
                g_norm = torch._foreach_norm(grads)
                scales = []
                for pn, gn in zip(p_norm, g_norm):
                    trust = torch.where((pn > 0) & (gn > 0), group["eta"] * pn / gn, torch.ones_like(pn))
                    scales.append(trust)
                grads = torch._foreach_mul(grads, scales)
            bufs = []
            for p, g in zip(params, grads):
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = g.detach().clone()
                else:
                    st["momentum_buffer"].mul_(group["momentum"]).add_(g)
                bufs.append(st["momentum_buffer"])
            upd = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
            torch._foreach_add_(params, upd, alpha=-group["lr"])
        return loss


def build_optimizer(param_groups: list[dict], name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    betas=(0.9, 0.999), lars_eta: float = 0.001) -> Optimizer:
    """Build an optimizer; groups that set their own ``weight_decay`` keep it."""
    from .config import ConfigError

    if name == "lars" and not lars_eta > 0:
        raise ConfigError(f"optim.lars_eta must be > 0; got {lars_eta}")
    if lr < 0:
        raise ConfigError(f"optim.lr must be >= 0; got {lr}")
    groups = []
    for g in param_groups:
        g = dict(g)
        g.setdefault("weight_decay", weight_decay)
        if name != "lars":
            g.pop("lars_exclude", None)
        groups.append(g)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta)
    raise ConfigError(f"unknown optimizer '{name}'; valid: sgd, adamw, lars")
