"""Tests of models.quantizer.NormEMAQuantizer (BEiT v2 VQ-KD codebook)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dist_helpers import run_distributed
from models.quantizer import NormEMAQuantizer, spherical_kmeans


def _clustered(n, d, k, seed, noise=0.15):
    """``n`` vectors around ``k`` random directions (un-normalised)."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, d, generator=g), dim=1)
    labels = torch.randint(0, k, (n,), generator=g)
    return (centers[labels] + noise * torch.randn(n, d, generator=g)) * 3.0


def _set_codebook(q, codes, embed_avg=None, cluster_size=None):
    with torch.no_grad():
        q.codebook.copy_(codes)
        q.embed_avg.copy_(codes if embed_avg is None else embed_avg)
        q.cluster_size.copy_(torch.ones(len(codes)) if cluster_size is None else cluster_size)
        q.initted.fill_(True)


def test_lookup_is_argmax_cosine_brute_force():
    g = torch.Generator().manual_seed(3)
    q = NormEMAQuantizer(num_codes=13, code_dim=5, kmeans_init=False, seed=1).eval()
    z = torch.randn(4, 7, 5, generator=g) * torch.rand(4, 7, 1, generator=g) * 5  # varied norms
    _, idx, _ = q(z)
    assert idx.shape == (4, 7) and idx.dtype == torch.long
    assert torch.equal(q.lookup(z), idx)
    flat, cb = z.reshape(-1, 5), q.codebook
    for i in range(flat.shape[0]):
        best, best_cos = -1, -2.0
        for k in range(cb.shape[0]):
            cos = float(torch.dot(flat[i], cb[k]) / (flat[i].norm() * cb[k].norm()))
            if cos > best_cos:
                best, best_cos = k, cos
        assert idx.reshape(-1)[i].item() == best


def test_straight_through_value_and_gradient():
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(3, 6, 8, generator=g)
    w = torch.randn(3, 6, 8, generator=g)

    q = NormEMAQuantizer(num_codes=10, code_dim=8, kmeans_init=False, grad_through_norm=False).eval()
    z = z0.clone().requires_grad_(True)
    z_q, idx, info = q(z)
    assert torch.allclose(z_q, q.codebook[idx], atol=1e-6)  # forward value = the selected code
    (gz,) = torch.autograd.grad((z_q * w).sum(), z)
    assert torch.allclose(gz, w, atol=1e-6)  # identity gradient to the input
    assert info["commit_loss"].requires_grad

    # Default (reference): identity to the normalised vectors, then through the normalisation.
    q.grad_through_norm = True
    z = z0.clone().requires_grad_(True)
    z_q, idx, _ = q(z)
    assert torch.allclose(z_q, q.codebook[idx], atol=1e-6)
    (gz,) = torch.autograd.grad((z_q * w).sum(), z)
    z2 = z0.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((F.normalize(z2, dim=-1, eps=q.eps) * w).sum(), z2)
    assert torch.allclose(gz, expected, atol=1e-6)


def test_commit_loss_matches_reference_form():
    g = torch.Generator().manual_seed(5)
    q = NormEMAQuantizer(num_codes=6, code_dim=4, kmeans_init=False).eval()
    z = torch.randn(11, 4, generator=g, requires_grad=True)
    _, idx, info = q(z)
    zn = F.normalize(z.detach(), dim=-1)
    expected = ((q.codebook[idx] - zn) ** 2).mean()  # mean over all elements, weight 1
    assert torch.allclose(info["commit_loss"], expected, atol=1e-6)
    info["commit_loss"].backward()
    assert z.grad is not None and q.codebook.grad is None


def test_ema_update_against_hand_step():
    decay = 0.9
    q = NormEMAQuantizer(num_codes=4, code_dim=3, decay=decay, kmeans_init=False).train()
    codes = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, -1.0, 0]]), dim=1)
    old_avg = codes * torch.tensor([[2.0], [3.0], [0.5], [4.0]])
    # Break the codebook == normalize(embed_avg) invariant on the unassigned rows (an underflowed
    # zero row, a non-parallel row) so that rewriting them would be caught.
    old_avg[2] = 0.0
    old_avg[3] = torch.tensor([0.0, 1.0, 1.0])
    old_size = torch.tensor([2.0, 3.0, 0.5, 4.0])
    _set_codebook(q, codes, old_avg, old_size)
    # Two vectors near code 0, one near code 1, none near codes 2 and 3.
    z = torch.tensor([[2.0, 0.3, 0.1], [1.0, -0.2, 0.0], [0.1, 5.0, 0.5]])
    _, idx, info = q(z)
    assert idx.tolist() == [0, 0, 1]

    zn = F.normalize(z, dim=1)
    sums = torch.zeros(4, 3)
    sums[0] = zn[0] + zn[1]
    sums[1] = zn[2]
    counts = torch.tensor([2.0, 1.0, 0.0, 0.0])
    exp_avg = decay * old_avg + (1 - decay) * sums
    assert torch.allclose(q.embed_avg, exp_avg, atol=1e-6)
    assert torch.allclose(q.cluster_size, decay * old_size + (1 - decay) * counts, atol=1e-6)
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.equal(q.codebook[2:], codes[2:])  # unassigned rows: bit-for-bit unchanged
    assert torch.allclose(q.codebook[:2], F.normalize(exp_avg[:2], dim=1), atol=1e-6)
    assert q.steps_unused.tolist() == [0, 0, 1, 1]
    assert math.isclose(float(info["usage"]), 0.5)
    p = torch.tensor([2 / 3, 1 / 3])
    assert math.isclose(float(info["perplexity"]), float(torch.exp(-(p * p.log()).sum())), rel_tol=1e-6)

    # Eval mode changes nothing.
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()
    q(z)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_kmeans_init_unit_norm_and_better_than_random():
    data = _clustered(400, 8, 16, seed=6)
    q = NormEMAQuantizer(num_codes=16, code_dim=8, kmeans_init=True, kmeans_iters=10, seed=0)
    assert not bool(q.initted)
    q.train()
    q(data)
    assert bool(q.initted)
    zn = F.normalize(data, dim=1)
    # The update after the init keeps rows unit-norm; check the init itself too.
    means, counts, _ = spherical_kmeans(zn, 16, 10, torch.Generator().manual_seed(1))
    assert torch.allclose(means.norm(dim=1), torch.ones(16), atol=1e-5)
    assert counts.sum() == 400
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(16), atol=1e-5)
    rand = F.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(7)), dim=1)
    fit_km = (zn @ q.codebook.t()).max(1).values.mean()
    fit_rand = (zn @ rand.t()).max(1).values.mean()
    assert fit_km > fit_rand + 0.1, (fit_km, fit_rand)
    assert fit_km > 0.9

    # A loaded checkpoint is not re-initialised: the next forward is a plain EMA step.
    q2 = NormEMAQuantizer(num_codes=16, code_dim=8, kmeans_init=True, seed=123)
    q2.load_state_dict(q.state_dict())
    batch = _clustered(64, 8, 16, seed=8)
    q.train()(batch)
    q2.train()(batch)
    assert torch.equal(q.codebook, q2.codebook)


def test_kmeans_init_small_batch_samples_with_replacement():
    zn = F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(2)), dim=1)
    means, counts, sums = spherical_kmeans(zn, 32, 0, torch.Generator().manual_seed(0))
    # Fewer vectors than codes: the initial means are batch vectors drawn with replacement.
    assert ((means[:, None] - zn[None]).norm(dim=2).min(dim=1).values < 1e-7).all()
    assert len({tuple(r.tolist()) for r in means}) <= 5
    means, counts, sums = spherical_kmeans(zn, 32, 3, torch.Generator().manual_seed(0))
    assert torch.allclose(means.norm(dim=1), torch.ones(32), atol=1e-6) and counts.sum() == 5
    q = NormEMAQuantizer(num_codes=32, code_dim=4, kmeans_init=True, seed=2).train()
    q(zn * 3)  # through the module: must not fail, rows stay unit-norm
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(32), atol=1e-6)


def test_deterministic_given_seed():
    data = [_clustered(50, 6, 5, seed=s) for s in range(4)]

    def run(seed):
        q = NormEMAQuantizer(num_codes=12, code_dim=6, dead_code_steps=2, seed=seed).train()
        for x in data:
            q(x)
        return q.codebook.clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_dead_code_restart_replaces_exactly_stale_codes():
    k, d = 8, 4
    codes = F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(9)), dim=1)
    qs = {}
    for steps in (0, 2):
        q = NormEMAQuantizer(num_codes=k, code_dim=d, decay=0.8, kmeans_init=False, dead_code_steps=steps, seed=3)
        _set_codebook(q, codes)
        qs[steps] = q.train()
    g = torch.Generator().manual_seed(10)
    batches = [codes[torch.arange(12) % 4] + 0.05 * torch.randn(12, d, generator=g) for _ in range(3)]

    # Step 1: codes 4..7 unused once: nothing restarted yet.
    for q in qs.values():
        _, idx, _ = q(batches[0])
        assert set(idx.tolist()) == {0, 1, 2, 3}
    assert torch.equal(qs[0].codebook, qs[2].codebook)
    assert qs[2].steps_unused.tolist() == [0] * 4 + [1] * 4

    # Step 2: codes 4..7 reach 2 unused steps and are replaced by vectors of the batch.
    for q in qs.values():
        q(batches[1])
    ref, q = qs[0], qs[2]
    assert torch.equal(q.codebook[:4], ref.codebook[:4])  # used codes: the plain EMA step
    assert torch.equal(ref.codebook[4:], codes[4:])
    zn = F.normalize(batches[1], dim=1)
    for j in range(4, 8):
        assert not torch.allclose(q.codebook[j], codes[j])
        assert (q.codebook[j] - zn).norm(dim=1).min() < 1e-6  # one of the normalised outputs
        assert torch.equal(q.embed_avg[j], q.codebook[j])
    assert q.steps_unused.tolist() == [0] * 8
    assert q.cluster_size[4:].tolist() == [1.0] * 4
    assert int(q.num_restarts) == 4
    assert q.stats()["dead_codes"] == 0
    assert ref.steps_unused.tolist() == [0] * 4 + [2] * 4


def test_perplexity_of_uniform_assignment_equals_codes_used():
    k = 10
    codes = torch.eye(k)
    q = NormEMAQuantizer(num_codes=k, code_dim=k, kmeans_init=False)
    _set_codebook(q, codes)
    z = codes[torch.tensor([1, 3, 5, 7] * 3)] * 2.0  # 4 codes, 3 vectors each
    for mode in ("eval", "train"):
        getattr(q, mode)()
        _, idx, info = q(z)
        assert math.isclose(float(info["perplexity"]), 4.0, rel_tol=1e-5)
        assert math.isclose(float(info["usage"]), 0.4, rel_tol=1e-6)
    s = q.stats()
    assert math.isclose(s["perplexity"], 4.0, rel_tol=1e-5) and math.isclose(s["usage"], 0.4, rel_tol=1e-6)
    assert math.isclose(s["running_usage"], 0.4, rel_tol=1e-5)


def test_low_running_usage_warns():
    q = NormEMAQuantizer(num_codes=16, code_dim=16, decay=0.5, kmeans_init=False, warn_every=2)
    _set_codebook(q, torch.eye(16))
    q.train()
    z = torch.eye(16)[:3]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(4):
            q(z)
    msgs = [str(w.message) for w in rec if "running codebook usage" in str(w.message)]
    assert len(msgs) == 2  # steps 2 and 4 (warm-up of 2 steps, every 2 steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(torch.eye(16))  # step 5: not a check step
        q.warn_every = 0
        q(z)


# ----------------------------------------------------------------------------- distributed
_K, _D = 16, 6
_SPLITS = [(20, 20), (17, 23), (20, 20), (25, 15), (20, 20)]


def _dist_batches():
    g = torch.Generator().manual_seed(11)
    centers = F.normalize(torch.randn(6, _D, generator=g), dim=1)  # 6 clusters for 16 codes: dead codes
    return [centers[torch.randint(0, 6, (40,), generator=g)] + 0.2 * torch.randn(40, _D, generator=g)
            for _ in _SPLITS]


def _run(batches, rank, world):
    q = NormEMAQuantizer(num_codes=_K, code_dim=_D, decay=0.9, kmeans_init=True, kmeans_iters=5,
                         dead_code_steps=2, seed=0).train()
    first_codebook, idx_all = None, []
    for x, split in zip(batches, _SPLITS):
        if world > 1:
            x = x.split(list(split))[rank]
        _, idx, _ = q(x)
        idx_all.append(idx)
        if first_codebook is None:
            first_codebook = q.codebook.clone()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    return {"state": state, "first": first_codebook, "idx": idx_all}


def _dist_worker(rank, world, batches):
    return _run(batches, rank, world)


def test_two_ranks_match_one_process_with_whole_batch():
    batches = _dist_batches()
    single = _run(batches, 0, 1)
    res = run_distributed(_dist_worker, world_size=2, args=(batches,))
    assert int(single["state"]["num_restarts"]) > 0  # the restart path is exercised
    for rank, r in enumerate(res):
        for t, split in enumerate(_SPLITS):  # same codes for the same vectors at every step
            assert torch.equal(r["idx"][t], single["idx"][t].split(list(split))[rank])
        assert torch.allclose(r["first"], single["first"], atol=1e-6)  # k-means init broadcast
        for key, v in single["state"].items():
            assert torch.allclose(r["state"][key].double(), v.double(), atol=1e-6), key
    assert torch.equal(res[0]["state"]["codebook"], res[1]["state"]["codebook"])
