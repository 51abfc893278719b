"""The RQ-VAE of the SID tokenizer: its quantiser's straight-through gradients, k-means initialisation and the
state shapes a saved model is checked against (fitting: test_tokenizer.py)."""
import pytest
import torch

from plumrec.sid.rqvae import RQVAE, _sq_dists, kmeans, mlp, nearest


def test_straight_through_gradients():
    """Reconstruction gradients reach the encoder through the quantiser;
    codebooks are trained only by the codebook loss."""
    torch.manual_seed(0)
    m = RQVAE([12], 8, [16], (4, 4))
    x = torch.randn(32, 12)
    z = m.encode_latent([x])
    codes, q, r = m.quantize(z)
    # residual bookkeeping: z = sum_l q_l + r_L
    torch.testing.assert_close((q.sum(0) + (r[-1] - q[-1])).double(), z.double(), rtol=1e-5, atol=1e-5)
    z_in = z + (q.detach().sum(0) - z).detach()
    torch.nn.functional.mse_loss(m.decode(z_in)[0], x).backward()
    assert m.encoders[0][0].weight.grad.abs().sum() > 0
    assert all(cb.grad is None for cb in m.codebooks)


def test_kmeans():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    c = kmeans(x, 3, iters=10, generator=g)
    d = torch.cdist(centres, c).min(1).values
    assert (d < 0.1).all()
    few = kmeans(x[:4], 8, iters=5, generator=g)  # more clusters than points
    assert few.shape == (8, 2) and torch.isfinite(few).all()
    with pytest.raises(ValueError, match="kmeans needs at least one point"):
        kmeans(x[:0], 3, iters=1, generator=g)
    with pytest.raises(ValueError, match="max_points must be >= k=3"):
        kmeans(x, 3, iters=1, generator=g, max_points=2)


def test_nearest_in_chunks_is_the_whole_argmin():
    """Chunked nearest-centroid search == the argmin over the whole distance matrix (indices and
    distances), for the squared distances and for a given ``dist`` (cdist), including a last partial chunk."""
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(103, 5, generator=g), torch.randn(17, 5, generator=g)
    manhattan = lambda a, b: torch.cdist(a, b, p=1)  # noqa: E731  (another dist: the chunked path)
    for dist in (_sq_dists, torch.cdist, manhattan):
        whole = dist(x, c)
        for chunk in (10, 103):  # blocked (or chunked) above chunk, one matrix at or below it
            i, d = nearest(x, c, dist=dist, chunk=chunk)
            assert torch.equal(i, whole.argmin(1)) and torch.allclose(d, whole.min(1).values, rtol=1e-5, atol=1e-5)
    big = torch.randn(3000, 5, generator=g)  # more than BLOCK_ROWS rows: several blocks, the last partial
    i, d = nearest(big, c, chunk=100)
    assert torch.equal(i, _sq_dists(big, c).argmin(1))
    i, d = nearest(x[:0], c)
    assert i.shape == d.shape == (0,)


def test_kmeans_fits_a_sample_above_the_cap():
    """Above ``max_points`` the centroids are fitted on a uniform sample and still find the clusters of
    the whole set; at or below it the sample is the set itself (the same centroids as without a cap)."""
    g = torch.Generator().manual_seed(2)
    centres = 20.0 * torch.randn(8, 4, generator=g)
    x = torch.cat([c + 0.2 * torch.randn(500, 4, generator=g) for c in centres])
    c = kmeans(x, 8, iters=10, generator=torch.Generator().manual_seed(0), max_points=200)
    assert (torch.cdist(centres, c).min(1).values < 0.3).all()
    a = kmeans(x[:300], 8, iters=5, generator=torch.Generator().manual_seed(0))
    b = kmeans(x[:300], 8, iters=5, generator=torch.Generator().manual_seed(0), max_points=300)
    assert torch.equal(a, b)


def test_sampled_seeding_above_the_seed_cap(monkeypatch):
    """Above ``max(SEED_POINTS, SEED_POINTS_PER_CENTROID * k)`` points the k-means++ seeding draws its
    centroids from a uniform sample (inverse-CDF draws): every seed is a data point, the seeds of well
    separated clusters land one per cluster, and k-means still finds the clusters."""
    import plumrec.sid.rqvae as rq

    monkeypatch.setattr(rq, "SEED_POINTS", 64)
    monkeypatch.setattr(rq, "SEED_POINTS_PER_CENTROID", 8)
    g = torch.Generator().manual_seed(3)
    centres = 50.0 * torch.randn(6, 3, generator=g)
    x = torch.cat([c + 0.1 * torch.randn(400, 3, generator=g) for c in centres])
    seeds = rq._kmeanspp_sampled(x, 6, torch.Generator().manual_seed(0), 64)
    assert (seeds[:, None] == x[None]).all(-1).any(1).all()
    assert len(set(torch.cdist(seeds, centres).argmin(1).tolist())) == 6
    calls = []
    monkeypatch.setattr(rq, "_kmeanspp", lambda *a: calls.append(a) or seeds)
    c = kmeans(x, 6, iters=5, generator=torch.Generator().manual_seed(0), max_points=2400)
    assert not calls  # 2,400 points > max(64, 8 * 6): the sampled seeding ran
    assert (torch.cdist(centres, c).min(1).values < 0.1).all()
    kmeans(x[:40], 6, iters=1, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1  # 40 points <= 64: the seeding over all points


@pytest.mark.parametrize("dims", [(12,), (12, 5, 7)])
def test_state_shapes_are_the_built_models(dims):
    """The shapes a saved state is checked against before anything is built."""
    real = {k: tuple(v.shape) for k, v in RQVAE(dims, 6, (10, 8), (5, 3)).state_dict().items()}
    assert RQVAE.state_shapes(dims, 6, (10, 8), (5, 3)) == real


def test_mlp_puts_silu_between_linear_layers():
    net = mlp([4, 8, 2])
    assert [type(m).__name__ for m in net] == ["Linear", "SiLU", "Linear"]
    assert net(torch.zeros(3, 4)).shape == (3, 2)


def test_quantize_picks_the_nearest_codeword_of_each_residual():
    m = RQVAE([4], 2, [8], (3, 2))
    with torch.no_grad():
        m.codebooks[0].copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        m.codebooks[1].copy_(torch.tensor([[0.1, 0.0], [0.0, -0.1]]))
    z = torch.tensor([[0.9, 0.05], [0.1, 0.85]])
    codes = m.quantize(z)[0]
    assert codes.tolist() == [[1, 1], [2, 1]] and m.num_levels == 2
