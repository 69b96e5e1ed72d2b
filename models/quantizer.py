"""A cosine-similarity vector quantizer with an EMA codebook (BEiT v2's VQ-KD tokenizer).

Peng et al., "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers"
(arXiv:2208.06366), Sec. 2.2: the tokenizer's encoder outputs are l2-normalised and looked up
in an l2-normalised codebook by cosine similarity; the codebook is not trained by gradient
descent but moved by an exponential moving average of the vectors assigned to each code, and it
is initialised by k-means on the first batch.

:class:`NormEMAQuantizer` is that codebook as a reusable module. It has no parameters: the
codebook and its statistics are buffers, so an optimizer never sees them and they travel with
``state_dict()``. Under ``torch.distributed`` the per-code statistics are summed over the ranks
of ``process_group`` (the data-parallel group; None means the world), so every rank holds the
same codebook, the one a single process would hold with the global batch. Without an
initialised process group (or with one rank) every collective is skipped.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["NormEMAQuantizer", "spherical_kmeans"]

# Rows of the [N, K] similarity matrix computed at a time (bounds peak memory of the lookup).
_CHUNK = 4096


def _nearest(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index of the code with the largest dot product for each row of ``x`` ([N, D] -> [N]).

    Ties go to the lowest index (``torch.argmax``).
    """
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([(c @ codes.t()).argmax(dim=1) for c in x.split(_CHUNK)])


def _counts_and_sums(x: torch.Tensor, idx: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per code: number of assigned rows ``[K]`` and sum of assigned rows ``[K, D]``."""
    counts = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, idx, torch.ones_like(idx, dtype=x.dtype))
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, idx, x)
    return counts, sums


def _draw(n: int, num: int, gen: torch.Generator) -> torch.Tensor:
    """``num`` indices into ``range(n)``: distinct if ``n >= num``, else drawn with replacement."""
    if n <= 0:
        raise ValueError("cannot draw vectors from an empty batch")
    if n >= num:
        return torch.randperm(n, generator=gen)[:num]
    return torch.randint(0, n, (num,), generator=gen)


def spherical_kmeans(
    x: torch.Tensor, num_clusters: int, iters: int, generator: torch.Generator, eps: float = 1e-12
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spherical k-means (cosine similarity, unit-norm means) on unit-norm rows.

    Initial means are ``num_clusters`` rows of ``x`` drawn with ``generator``: distinct rows when
    ``N >= num_clusters``, otherwise drawn **with replacement** (so some initial means repeat;
    a repeated mean loses every tie to its first copy and keeps its value). Each iteration assigns
    every row to the mean of largest dot product and replaces each mean that got rows by the
    l2-normalised sum of its rows; a mean that got none keeps its value.

    Args:
        x: ``[N, D]`` unit-norm rows.
        num_clusters: ``K``.
        iters: Number of assign/update iterations (0 returns the drawn rows).
        generator: CPU generator for the initial draw.
        eps: Floor on the norm in the normalisation.

    Returns:
        ``(means [K, D], counts [K], sums [K, D])``: the means, and the counts and row sums of
        the last assignment (zeros and the means themselves when ``iters == 0``). For every
        cluster with a non-zero count ``means == normalize(sums)``.
    """
    means = x[_draw(x.shape[0], num_clusters, generator).to(x.device)]
    counts = torch.zeros(num_clusters, dtype=x.dtype, device=x.device)
    sums = means.clone()
    for _ in range(iters):
        counts, sums = _counts_and_sums(x, _nearest(x, means), num_clusters)
        means = torch.where((counts > 0)[:, None], F.normalize(sums, dim=1, eps=eps), means)
    return means, counts, sums


class NormEMAQuantizer(nn.Module):
    """Cosine-similarity vector quantizer whose unit-norm codebook follows an EMA (BEiT v2 VQ-KD).

    **Lookup.** ``z [..., code_dim]`` is l2-normalised, ``z_n = z / max(||z||, eps)``; its code
    is ``argmax_k <z_n, c_k>`` over the unit-norm codebook rows ``c_k`` (the largest cosine, which
    is also the smallest Euclidean distance between unit vectors). ``z_q`` has the value of the
    selected code and the straight-through gradient ``z_q = z_n + (q - z_n).detach()``: the
    gradient of ``z_q`` reaches ``z_n`` unchanged and then passes through the normalisation to
    ``z``, as in the reference. With ``grad_through_norm=False`` the estimator is taken around the
    raw input instead, ``z_q = z + (q - z).detach()``, so ``dz_q/dz`` is the identity.
    ``commit_loss = mean((q.detach() - z_n) ** 2)`` over all elements (``F.mse_loss``), the loss
    the reference adds to the tokenizer's objective with weight ``beta = 1``; it has a gradient
    only towards ``z``.

    **Update (training mode only; buffers, no gradient).** Per code ``k`` over the global batch
    (summed with ``all_reduce(SUM)`` over ``process_group``): ``n_k`` = number of vectors assigned
    to ``k``, ``s_k`` = sum of their normalised vectors ``z_n``. Then, with ``d = decay``::

        cluster_size_k <- d * cluster_size_k + (1 - d) * n_k          (every code)
        embed_avg_k    <- d * embed_avg_k    + (1 - d) * s_k          (every code)
        c_k            <- embed_avg_k / max(||embed_avg_k||, eps)     if n_k > 0
        c_k            <- c_k  (row not rewritten)                     if n_k == 0

    The lookup of the step uses the codebook from before the update. Init and restarts keep
    ``embed_avg_k`` parallel to ``c_k``, so ``c_k == normalize(embed_avg_k)`` holds for every
    code; an unassigned code's ``embed_avg_k`` only shrinks by ``d`` (its direction is unchanged),
    and the explicit "not rewritten" rule keeps the code exact and well defined even after a long
    disuse has let ``embed_avg_k`` underflow to zero (the next batch that uses it then sets it to
    the direction of its ``s_k``).

    *Relation to the reference* (unilm ``beit2/norm_ema_quantizer.py``). (1) Its classic
    VQ-VAE machinery, ``EmbeddingEMA.weight_update`` with Laplace smoothing
    ``(N_k + eps) / (n + K eps) * n`` and division of ``embed_avg`` by the smoothed cluster size,
    is never called by its forward. Here it would be a no-op anyway: dividing a row by a positive
    scalar does not change its direction, so ``normalize(embed_avg_k / N~_k) =
    normalize(embed_avg_k)``; ``cluster_size`` is therefore only a statistic and ``eps`` only
    floors norms. (2) What its forward does instead is an EMA of the *unit codes* towards the
    *direction of the batch mean*: ``c_k <- normalize(d * c_k + (1 - d) * normalize(s_k / n_k))``
    for ``n_k > 0``, unassigned codes unchanged. That weighs every step equally whatever ``n_k``;
    the rule here weighs steps by how many vectors they assign (a step with twice the vectors
    moves the code as much as two steps). Both keep unit rows and leave unassigned codes as they
    are. (3) Its k-means init runs on every rank's local batch without a broadcast, and it also
    updates its usage statistic in eval mode; here k-means runs on rank 0 on the gathered global
    batch and is broadcast, and eval mode changes no buffer.

    **Init.** With ``kmeans_init`` the first training batch (gathered from all ranks, in rank
    order) initialises the codebook by :func:`spherical_kmeans` (``kmeans_iters`` iterations)
    on rank 0, then ``codebook``, ``embed_avg`` (the last assignment's sums; ``c_k`` itself for a
    cluster that got none) and ``cluster_size`` (its counts) are broadcast from rank 0. If that
    batch has fewer vectors than codes the initial means are drawn with replacement (duplicates
    lose every tie to their first copy and stay unused until restarted). The ``initted`` buffer is
    saved with the state dict, so a loaded checkpoint is not re-initialised. Without
    ``kmeans_init`` the codebook starts as normalised Gaussian rows drawn from ``seed``
    (``embed_avg = codebook``, ``cluster_size = 1``).

    **Health.** Each training step records the fraction of codes used in the global batch
    (``usage``) and the perplexity ``exp(-sum_k p_k log p_k)`` of its code distribution
    ``p_k = n_k / sum n`` (equal to the number of codes used when they are used equally often);
    ``usage_ema`` is an EMA (decay ``decay``) of ``p``, and the *running usage* is the
    perplexity of the normalised ``usage_ema`` divided by ``num_codes``: the effective fraction
    of the codebook in use over the last ~``1 / (1 - decay)`` steps, which unlike the per-batch
    fraction does not depend on the batch being larger than the codebook. Every ``warn_every``
    training steps after the first ``ceil(1 / (1 - decay))`` a ``UserWarning`` is issued (on
    rank 0) when the running usage is below one half. ``steps_unused[k]`` counts the training
    steps since code ``k`` was last assigned. :meth:`stats` returns all of it as floats.

    **Dead-code restart** (``dead_code_steps > 0``). After the update, every code with
    ``steps_unused >= dead_code_steps`` is replaced by a normalised encoder output of the current
    global batch: rank 0 draws the positions (distinct when the batch is large enough, otherwise
    with replacement) and broadcasts them, the rank holding each drawn vector contributes it, so
    all ranks agree. A restarted code gets ``embed_avg = c_k``, ``cluster_size = 1`` and
    ``steps_unused = 0``. Steps count training forwards (each micro-batch under gradient
    accumulation is one step, as in the reference).

    **Determinism.** The random codebook, the k-means draw and the restart draws come from one
    CPU ``torch.Generator`` seeded with ``seed`` (only rank 0 draws after construction). Its
    state is not part of the state dict, so restarts draw from a generator seeded with ``(seed,
    num_updates)`` instead (``num_updates`` is a saved buffer): a resumed run restarts the same codes
    from the same positions as an uninterrupted one.

    Args:
        num_codes: Codebook size ``K``.
        code_dim: Vector size ``D``.
        decay: EMA decay of the codebook statistics and of ``usage_ema``.
        eps: Floor on every norm in an l2-normalisation.
        kmeans_init: Initialise by k-means on the first training batch.
        kmeans_iters: k-means iterations.
        dead_code_steps: Restart codes unused for this many steps; 0 disables restarts.
        seed: Seed of the generator.
        warn_every: Check the running usage every this many training steps (0: never warn).
        grad_through_norm: Straight-through around the normalised vectors (reference, default)
            or around the raw input.
        process_group: Group the statistics are summed over (the data-parallel group); None is
            the default (world) group.

    Shape:
        ``forward(z)``: ``z [..., D]`` -> ``z_q [..., D]`` (dtype of ``z``), ``indices [...]``
        (int64) and ``info``: ``commit_loss`` (scalar with gradient), ``usage`` and
        ``perplexity`` (detached scalars; global in training mode, this rank's batch in eval).
    """

    def __init__(
        self,
        num_codes: int = 8192,
        code_dim: int = 32,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_steps: int = 0,
        seed: int = 0,
        warn_every: int = 1000,
        grad_through_norm: bool = True,
        process_group: Any = None,
    ):
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ValueError(f"num_codes and code_dim must be positive, got {num_codes}, {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if kmeans_iters < 0 or dead_code_steps < 0 or warn_every < 0:
            raise ValueError("kmeans_iters, dead_code_steps and warn_every must be >= 0")
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.decay = decay
        self.eps = eps
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.dead_code_steps = dead_code_steps
        self.warn_every = warn_every
        self.grad_through_norm = grad_through_norm
        self.process_group = process_group
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._steps_seen = 0  # training forwards in this process (warning cadence only)

        codes = F.normalize(torch.randn(num_codes, code_dim, generator=self.generator), dim=1, eps=eps)
        self.register_buffer("codebook", codes)
        self.register_buffer("embed_avg", codes.clone())
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("usage_ema", torch.zeros(num_codes))
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_restarts", torch.zeros((), dtype=torch.long))
        # Statistics of the last training batch, for logging; not part of a checkpoint.
        self.register_buffer("last_usage", torch.zeros(()), persistent=False)
        self.register_buffer("last_perplexity", torch.zeros(()), persistent=False)

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, decay={self.decay}, "
                f"kmeans_init={self.kmeans_init}, dead_code_steps={self.dead_code_steps}")

    # ------------------------------------------------------------------ distributed helpers
    def _world(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(group=self.process_group)
        return 1

    def _rank(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(group=self.process_group)
        return 0

    def _all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self._world() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        return t

    def _broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Overwrites ``t`` with rank 0's (group rank 0) copy."""
        if self._world() > 1:
            dist.broadcast(t, group_src=0, group=self.process_group)
        return t

    def _sizes(self, n: int, device: torch.device) -> list:
        """Number of vectors on each rank of the group, in rank order."""
        world = self._world()
        if world == 1:
            return [n]
        mine = torch.tensor([n], dtype=torch.long, device=device)
        out = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(out, mine, group=self.process_group)
        return [int(s) for s in out]

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows concatenated in rank order (handles unequal row counts)."""
        sizes = self._sizes(x.shape[0], x.device)
        if len(sizes) == 1:
            return x
        pad = x.new_zeros(max(sizes), x.shape[1])
        pad[: x.shape[0]] = x
        out = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(out, pad, group=self.process_group)
        return torch.cat([o[:s] for o, s in zip(out, sizes)])

    # ------------------------------------------------------------------ public API
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """l2-normalises the last dimension (norms floored at ``eps``)."""
        return F.normalize(z, dim=-1, eps=self.eps)

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Code indices ``[...]`` of ``z [..., D]``; changes no state (the tokenizer's output)."""
        self._check(z)
        flat = self.normalize(z.reshape(-1, self.code_dim).to(self._dtype(z)))
        return _nearest(flat, self.codebook.to(flat.dtype)).view(z.shape[:-1])

    def get_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Unit-norm codes ``[..., D]`` of ``indices [...]``."""
        return F.embedding(indices, self.codebook)

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        self._check(z)
        flat_in = z.reshape(-1, self.code_dim)
        z_n = self.normalize(flat_in.to(self._dtype(z)))
        if self.training and not bool(self.initted):
            self._init_codebook(z_n.detach())
        codes = self.codebook.to(z_n.dtype)
        with torch.no_grad():
            idx = _nearest(z_n.detach(), codes)
        q = codes[idx]
        commit_loss = F.mse_loss(q, z_n)  # q is a buffer row: gradient goes only to z_n
        if self.grad_through_norm:
            z_q = z_n + (q - z_n).detach()
        else:
            z_q = flat_in + (q.to(flat_in.dtype) - flat_in).detach()
        if self.training:
            usage, perplexity = self._update(z_n.detach(), idx)
        else:
            with torch.no_grad():
                usage, perplexity = self._batch_stats(torch.bincount(idx, minlength=self.num_codes))
        info = {"commit_loss": commit_loss, "usage": usage, "perplexity": perplexity}
        return z_q.to(z.dtype).view(z.shape), idx.view(z.shape[:-1]), info

    @torch.no_grad()
    def stats(self) -> Dict[str, float]:
        """Codebook health as floats, for logging (forces a device sync)."""
        out = {
            "usage": float(self.last_usage),
            "perplexity": float(self.last_perplexity),
            "running_usage": self.running_usage(),
            "running_perplexity": self.running_usage() * self.num_codes,
            "max_steps_unused": float(self.steps_unused.max()),
            "num_updates": float(self.num_updates),
            "num_restarts": float(self.num_restarts),
        }
        if self.dead_code_steps > 0:
            out["dead_codes"] = float((self.steps_unused >= self.dead_code_steps).sum())
        return out

    @torch.no_grad()
    def running_usage(self) -> float:
        """Perplexity of the normalised ``usage_ema`` over ``num_codes`` (0 before any update)."""
        total = self.usage_ema.sum()
        if float(total) <= 0:
            return 0.0
        p = self.usage_ema / total
        return float(torch.exp(-torch.special.xlogy(p, p).sum())) / self.num_codes

    # ------------------------------------------------------------------ internals
    def _dtype(self, z: torch.Tensor) -> torch.dtype:
        # Compute in at least the codebook's precision (bf16 activations are looked up in fp32).
        return torch.promote_types(z.dtype, self.codebook.dtype)

    def _check(self, z: torch.Tensor) -> None:
        if z.dim() < 1 or z.shape[-1] != self.code_dim:
            raise ValueError(f"expected z of shape [..., {self.code_dim}], got {list(z.shape)}")

    def _batch_stats(self, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        usage = (counts > 0).to(torch.float32).mean()
        p = counts.to(torch.float32) / counts.sum().clamp_min(1)
        perplexity = torch.exp(-torch.special.xlogy(p, p).sum())
        return usage, perplexity

    @torch.no_grad()
    def _init_codebook(self, z_n: torch.Tensor) -> None:
        data = self._gather_rows(z_n)
        k, d = self.num_codes, self.code_dim
        packed = torch.empty(k, 2 * d + 1, dtype=self.codebook.dtype, device=self.codebook.device)
        if self._rank() == 0:
            means, counts, sums = spherical_kmeans(
                data.to(self.codebook.dtype), k, self.kmeans_iters, self.generator, eps=self.eps
            )
            sums = torch.where((counts > 0)[:, None], sums, means)  # keep embed_avg parallel to the code
            packed.copy_(torch.cat([means, sums, counts[:, None]], dim=1))
        self._broadcast_(packed)
        self.codebook.copy_(packed[:, :d])
        self.embed_avg.copy_(packed[:, d : 2 * d])
        self.cluster_size.copy_(packed[:, 2 * d])
        self.initted.fill_(True)

    @torch.no_grad()
    def _update(self, z_n: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        dt = self.codebook.dtype
        counts, sums = _counts_and_sums(z_n.to(dt), idx, self.num_codes)
        both = self._all_reduce_sum_(torch.cat([sums, counts[:, None]], dim=1))  # one collective
        sums, counts = both[:, :-1], both[:, -1]
        used = counts > 0

        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_avg.mul_(d).add_(sums, alpha=1 - d)
        self.codebook.copy_(torch.where(used[:, None], F.normalize(self.embed_avg, dim=1, eps=self.eps),
                                        self.codebook))

        usage, perplexity = self._batch_stats(counts)
        share = counts / counts.sum().clamp_min(1)
        self.usage_ema.mul_(d).add_(share.to(self.usage_ema.dtype), alpha=1 - d)
        self.steps_unused.copy_(torch.where(used, torch.zeros_like(self.steps_unused), self.steps_unused + 1))
        self.num_updates.add_(1)
        self.last_usage.copy_(usage)
        self.last_perplexity.copy_(perplexity)

        if self.dead_code_steps > 0:
            dead = self.steps_unused >= self.dead_code_steps
            if bool(dead.any()):
                self._restart(dead, z_n)
        self._steps_seen += 1
        self._maybe_warn()
        return usage, perplexity

    @torch.no_grad()
    def _restart(self, dead: torch.Tensor, z_n: torch.Tensor) -> None:
        """Replaces the codes in ``dead`` by vectors of the global batch drawn on rank 0."""
        dead_idx = dead.nonzero().squeeze(1)
        num = dead_idx.numel()
        sizes = self._sizes(z_n.shape[0], z_n.device)
        pos = torch.empty(num, dtype=torch.long, device=z_n.device)
        if self._rank() == 0:
            # drawn from (seed, update count): a resumed run restarts the codes an uninterrupted one does
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.num_updates))
            pos.copy_(_draw(sum(sizes), num, gen))
        self._broadcast_(pos)
        # Each rank contributes the drawn rows it holds; the sum over ranks is every drawn row.
        offset = sum(sizes[: self._rank()])
        local = pos - offset
        mine = (local >= 0) & (local < z_n.shape[0])
        new = torch.zeros(num, self.code_dim, dtype=self.codebook.dtype, device=z_n.device)
        new[mine] = z_n[local[mine]].to(new.dtype)
        self._all_reduce_sum_(new)
        self.codebook[dead_idx] = new
        self.embed_avg[dead_idx] = new
        self.cluster_size[dead_idx] = 1.0
        self.steps_unused[dead_idx] = 0
        self.num_restarts.add_(num)

    def _maybe_warn(self) -> None:
        if self.warn_every == 0 or self._steps_seen % self.warn_every != 0:
            return
        if self._steps_seen < math.ceil(1.0 / (1.0 - self.decay)) or self._rank() != 0:
            return
        running = self.running_usage()
        if running < 0.5:
            warnings.warn(
                f"NormEMAQuantizer: running codebook usage {running:.3f} < 0.5 "
                f"(effective {running * self.num_codes:.0f} of {self.num_codes} codes in use); "
                + ("consider dead_code_steps > 0" if self.dead_code_steps == 0 else "codes are being restarted"),
                stacklevel=3,
            )
