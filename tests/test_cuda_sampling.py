"""The sampling prefilter (candidates instead of a whole-row sort), its unsorted fallback, and the GPU
penalties, against the whole-row sort and plain torch. Small odd vocabularies with small capacities and
blocks so that every path (candidates exact, candidates too few, ties overflowing) runs under the
interpreter in seconds."""

import os
import random

import pytest
import torch

from ingot.backends.cuda import sampling
from ingot.engine.sampler import REPEAT_WINDOW, Sampler, SamplingParams, penalize
from ingot.errors import IngotError

SEED = int(os.environ.get("INGOT_TEST_SEED", random.randrange(2**31)))


@pytest.fixture
def g():
    print(f"INGOT_TEST_SEED={SEED}")
    return torch.Generator().manual_seed(SEED)


def _params(M, dev, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    def col(v, dt):
        return torch.as_tensor(v, dtype=dt).expand(M).contiguous().to(dev)

    return dict(temperature=col(temperature, torch.float32), top_k=col(top_k, torch.int32),
                top_p=col(top_p, torch.float32), min_p=col(min_p, torch.float32),
                seed_offset=torch.arange(M, dtype=torch.int64, device=dev))


def _chain_probs(x, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0):
    """llama.cpp's chain in float64 torch; ties at the top-k / top-p cut all kept, like the fallback."""
    x = x.double().clone()
    if top_k:
        x[x < x.topk(min(top_k, x.numel())).values[-1]] = float("-inf")
    if top_p < 1.0:
        p = x.softmax(-1)
        above = (p[None, :] > p[:, None]).double() @ p  # mass strictly above each token
        drop = above >= top_p
        drop[x.argmax()] = False
        x[drop] = float("-inf")
    if min_p:
        p = x.softmax(-1)
        x[p < min_p * p.max()] = float("-inf")
    return (x / temperature).softmax(-1)


def _grid(N):
    return ((torch.arange(N, dtype=torch.float64) + 0.5) / N).float()


def test_candidates_are_the_sorted_head(g, kernel_device):
    """The compacted candidates are exactly the first n of the stable whole-row sort, and n fits."""
    M, V, cap = 3, 997, 40
    x = (torch.randn(M, V, generator=g) * 2).to(kernel_device)
    x[1, 5] = x[1, 600] = x[1].max()  # a tie at the top: the lower index first
    ws = sampling.sample_workspace(M, V, kernel_device, candidates=cap, block=128)
    sampling.sample(x, **_params(M, kernel_device, temperature=0.0), workspace=ws, prefilter_block=128)
    order = x.cpu().sort(dim=-1, descending=True, stable=True).indices
    for r in range(M):
        n = int(ws["row"][r, 2])
        assert 1 <= n <= cap
        ids = ws["cand_ids"][r].cpu()[ws["order"][r].cpu()[:n]]
        assert ids.tolist() == order[r, :n].tolist()
        assert torch.equal(ws["vals"][r, :n].cpu(), x[r].cpu()[ids])
        assert float(ws["row"][r, 0]) == float(x[r].max())


CHAINS = [dict(top_k=9, temperature=0.8), dict(top_p=0.6, temperature=1.2), dict(min_p=0.2, temperature=1.0),
          dict(top_k=20, top_p=0.8, min_p=0.05), dict(temperature=0.0, top_p=0.3)]


def test_prefilter_draws_what_the_sort_draws(g, kernel_device):
    """Where the kept prefix lies inside the candidates, the same uniforms pick the same tokens as the old
    whole-row sort: same prefix, same order, same inverse CDF. One launch, R rows per chain."""
    V, R = 1001, 8
    N = R * len(CHAINS)
    x = torch.randn(V, generator=g) * 3
    # a head of 8 near-equal logits above the rest, so the draws spread whatever the random tail
    head = torch.randperm(V, generator=g)[:8]
    x[head] = x.max() + 1.0 - 0.2 * torch.arange(8.0)
    x = x.expand(N, V).contiguous().to(kernel_device)
    u = _grid(R).repeat(len(CHAINS)).to(kernel_device)
    cols = [_params(R, "cpu", **c) for c in CHAINS]
    p = {k: torch.cat([c[k] for c in cols]).to(kernel_device) for k in cols[0]}
    new = sampling.sample(x, **p, workspace=sampling.sample_workspace(N, V, kernel_device, candidates=200,
                                                                      block=256), uniforms=u, prefilter_block=256)
    old = sampling.sample(x, **p, workspace=sampling.sample_workspace(N, V, kernel_device, candidates=None), uniforms=u)
    assert new.tolist() == old.tolist()
    assert len(set(new.tolist())) >= 3  # the draws do spread over the head


def _fallback_configs(x):
    s = x.double().sort(descending=True).values
    cum = s.softmax(-1).cumsum(-1)
    return [dict(temperature=1.0),  # the whole distribution
            dict(top_k=6, temperature=0.7),  # top-k above the capacity
            dict(top_p=float((cum[7] + cum[8]) / 2), temperature=1.3),  # nucleus of 9 past 3 candidates
            dict(top_k=12, top_p=float((cum[4] + cum[5]) / 2), min_p=0.01, temperature=0.9)]


def test_fallback_inverse_cdf_is_exact(g, kernel_device):
    """With 3 candidates for a 37-token row the prefix runs past them: the unsorted path must still give
    each token its quantile share of a stratified grid of uniforms (within 1.5 of N p), 0 when filtered."""
    V, N = 37, 10
    x = torch.randn(V, generator=g) * 1.5
    x[11] = float("-inf")
    configs = _fallback_configs(x)
    for c in configs:
        ws = sampling.sample_workspace(N, V, kernel_device, candidates=3, block=16)
        out = sampling.sample(x.expand(N, V).contiguous().to(kernel_device), **_params(N, kernel_device, **c),
                              workspace=ws, uniforms=_grid(N).to(kernel_device), block=32, prefilter_block=16).cpu()
        assert (ws["row"][:, 2].cpu() <= 3).all()
        probs = _chain_probs(x, **c)
        counts = torch.bincount(out, minlength=V).double()
        assert ((counts - N * probs).abs() <= 1.5).all(), (c, counts.tolist(), (N * probs).tolist())
        assert (counts[probs == 0] == 0).all(), c


def test_fallback_philox_distribution_and_ties(kernel_device):
    """Real Philox draws on rows whose ties at the max overflow the candidates (none fit): a flat row is
    sampled uniformly, and greedy still picks the lowest index. Fixed counters, so it cannot flake; the
    bound is 5 sigma."""
    V, N = 13, 48
    x = torch.zeros(N, V, device=kernel_device)
    ws = sampling.sample_workspace(N, V, kernel_device, candidates=4, block=16)
    out = sampling.sample(x, **_params(N, kernel_device, temperature=1.0), workspace=ws, block=8,
                          prefilter_block=16).cpu()
    assert (ws["row"][:, 2].cpu() == 0).all()
    freq = torch.bincount(out, minlength=V).double() / N
    p = 1 / V
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / N) ** 0.5).all(), freq.tolist()
    x, ws = x[:2].contiguous(), sampling.sample_workspace(2, V, kernel_device, candidates=4, block=16)
    greedy = sampling.sample(x, **_params(2, kernel_device, temperature=0.0), workspace=ws, block=8,
                             prefilter_block=16)
    assert (greedy == 0).all()
    x[:, 4] = float("-inf")
    x[:, 7] = 1.0  # one winner again: candidates fit, greedy finds it
    greedy = sampling.sample(x, **_params(2, kernel_device, temperature=0.0), workspace=ws, block=8,
                             prefilter_block=16)
    assert (greedy == 7).all()


def test_bad_workspace(kernel_device):
    x = torch.zeros(2, 50, device=kernel_device)
    with pytest.raises(ValueError, match="workspace"):
        sampling.sample(x, **_params(2, kernel_device), workspace=sampling.sample_workspace(2, 60, kernel_device))
    with pytest.raises(ValueError, match="candidates"):
        sampling.sample_workspace(2, 50, kernel_device, candidates=0)


# --- penalties ----------------------------------------------------------------------------------------

def test_penalties_match_torch(g, kernel_device):
    M, V, W = 3, 301, 16
    x = torch.randn(M, V, generator=g) * 2
    win = torch.randint(0, 20, (M, W), generator=g)  # repeats within the window
    win[1, 10:] = -1  # not yet full
    win[2, :] = 7  # one token W times
    rep, pres, freq = [1.3, 0.8, 1.1], [0.5, 0.0, -0.2], [0.25, 1.0, 0.1]
    got = sampling.apply_penalties(x.clone().to(kernel_device), win.to(kernel_device),
                                   repeat_penalty=torch.tensor(rep, device=kernel_device),
                                   presence_penalty=torch.tensor(pres, device=kernel_device),
                                   frequency_penalty=torch.tensor(freq, device=kernel_device)).cpu()
    for r in range(M):
        want = x[r].clone()
        penalize(want, [t for t in win[r].tolist() if t >= 0],
                 SamplingParams(repeat_penalty=rep[r], presence_penalty=pres[r], frequency_penalty=freq[r]))
        torch.testing.assert_close(got[r], want, rtol=1e-6, atol=1e-6)


def test_penalize_by_hand():
    x = torch.tensor([2.0, -2.0, 1.0, 0.5])
    penalize(x, [0, 1, 1, 3, 0, 0], SamplingParams(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.1))
    torch.testing.assert_close(x, torch.tensor([1.0 - 0.3 - 0.5, -4.0 - 0.2 - 0.5, 1.0, 0.25 - 0.1 - 0.5]))


def test_push_window_is_a_ring(kernel_device):
    W = 4
    win = torch.full((2, W), -1, dtype=torch.int64, device=kernel_device)
    pos = torch.tensor([0, 2], dtype=torch.int64, device=kernel_device)
    for t in range(6):
        sampling.push_window(win, pos, torch.tensor([t, 10 + t], device=kernel_device))
    assert win.cpu().tolist() == [[4, 5, 2, 3], [12, 13, 14, 15]]
    assert pos.cpu().tolist() == [6, 8]


def test_sampling_params_validate_penalties():
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3.0), dict(repeat_penalty=0.0)):
        with pytest.raises(IngotError, match="penalty"):
            SamplingParams(**bad).validate()
    assert SamplingParams(presence_penalty=0.1).penalised and not SamplingParams(repeat_penalty=1.0).penalised


def test_cpu_sampler_applies_presence_and_frequency():
    """Greedy with penalties on the CPU: the penalised favourite loses to the next token."""
    x = torch.tensor([3.0, 2.5, 0.0, -1.0])
    assert Sampler(SamplingParams())(x.clone(), [0]) == 0
    assert Sampler(SamplingParams(presence_penalty=0.6))(x.clone(), [0]) == 1
    assert Sampler(SamplingParams(frequency_penalty=0.2))(x.clone(), [0, 0]) == 0
    assert Sampler(SamplingParams(frequency_penalty=0.2))(x.clone(), [0, 0, 0]) == 1
    far = [0] + [2] * REPEAT_WINDOW  # token 0 left the window
    assert Sampler(SamplingParams(presence_penalty=2.0))(x.clone(), far) == 0


def test_device_sampler_penalties_follow_the_history(g, kernel_device):
    """The Sampler's device path (run here on the kernel device) against its CPU path over a few steps of
    greedy with penalties: appended tokens are pushed from the device output, any other history is copied
    over again; and the same seed reproduces a sampled run."""
    V = 41
    params = SamplingParams(repeat_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.4)
    dev, cpu = Sampler(params), Sampler(params)
    history = [3, 3, 9]
    for step in range(6):
        x = torch.randn(V, generator=g)
        x[history[-1]] += 1.0  # tempt a repeat
        want = cpu(x.clone(), history)
        assert dev._on_gpu(x.clone().to(kernel_device), history) == want, step
        history = history + [want] if step != 3 else [5] + history  # step 3: a history that did not grow by one
    runs = []
    for _ in range(2):
        s = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=11, presence_penalty=0.2))
        runs.append([s._on_gpu(torch.linspace(0, 2, V).to(kernel_device), [1, 2]) for _ in range(4)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("params", [dict(temperature=1e-30), dict(temperature=5e-324, top_k=3),
                                    dict(temperature=1.0, top_p=0.0), dict(temperature=2.0, min_p=1.0)])
def test_cpu_sampler_limits_pick_the_most_likely_token(params):
    """A vanishing temperature, top_p = 0 or min_p = 1 leave only the top token: never a nan draw."""
    x = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 8
    assert Sampler(SamplingParams(seed=1, **params))(x, [1, 2]) == int(x.argmax())
