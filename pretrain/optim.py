"""Optimizers: SGD, AdamW, LARS (You et al. 2017, as used by SimCLR and BYOL) and LAMB (You et al.
2020, as used by EVA-CLIP)."""
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


class LAMB(Optimizer):
    """Adam's bias-corrected moments with weight decay, scaled per layer by a trust ratio.

    For each parameter p with gradient g at step t:
    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd p`` and
    ``p <- p - lr * (||p|| / ||r||) * r``, the ratio 1 when either norm is 0. Groups flagged
    ``lars_exclude`` (biases, norms and scalars) take the plain Adam step ``p <- p - lr * r``.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        if lr < 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LAMB: lr >= 0, eps > 0 and betas in [0, 1) expected, got lr={lr}, eps={eps}, "
                             f"betas={betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                t = st["step"]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                r = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(group["eps"]))
                if group["weight_decay"] != 0:
                    r.add_(p.float(), alpha=group["weight_decay"])
                trust = 1.0
                if not group["lars_exclude"]:
                    pn, rn = p.float().norm(), r.norm()
                    trust = torch.where((pn > 0) & (rn > 0), pn / rn, torch.ones_like(pn))
                p.add_((r * trust).to(p.dtype), alpha=-group["lr"])
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
        if name not in ("lars", "lamb"):
            g.pop("lars_exclude", None)
        groups.append(g)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta)
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=tuple(betas))
    raise ConfigError(f"unknown optimizer '{name}'; valid: sgd, adamw, lars, lamb")
