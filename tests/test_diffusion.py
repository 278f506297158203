"""Masked diffusion: AdaLN-Zero, the noise, the ELBO weights, generate(), and the stage end to end."""
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY, read_log, run_script
from model import ConceptConfig, ConceptDiffusion, DecoderLayer, Packing, gather_and_pack

SPECIAL = dict(eod_id=96, pad_id=97, mask_id=98, cls_id=99, sep_id=95)


def tiny_model(**kw):
    base = dict(vocab_size=100, block_size=128, n_layer=2, n_head=2, n_embd=32, n_concepts=8, ffn_size=64,
                n_dec_layer=2, **SPECIAL)
    base.update(kw)
    torch.manual_seed(0)
    return ConceptDiffusion(ConceptConfig(**base))


def text_batch(B=16, N=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(95, (B, N), generator=g)
    idx[:, ::10] = SPECIAL['eod_id']
    attn_mask = torch.ones_like(idx, dtype=torch.bool)
    attn_mask[:, -20:] = False
    idx[~attn_mask] = SPECIAL['pad_id']
    return idx, attn_mask


def test_adaln_zero_layers_start_as_identity():
    model = tiny_model()
    q, concepts, cond = torch.randn(3, 7, 32), torch.randn(3, 8, 32), torch.randn(3, 32)
    for layer in model.decoder.layers:
        assert isinstance(layer, DecoderLayer) and layer.time_cond
        torch.testing.assert_close(layer(q, concepts, cond), q)


def test_noise_never_touches_padding_or_specials_and_follows_t():
    model = tiny_model()
    idx, attn_mask = text_batch(B=64, N=400)
    t = torch.linspace(0.05, 1.0, 64)
    noisy, masked, maskable = model.add_noise(idx, t, attn_mask, torch.Generator().manual_seed(0))
    special = torch.isin(idx, torch.tensor(list(SPECIAL.values())))
    assert not masked[~attn_mask].any() and not masked[special].any()
    assert torch.equal(noisy[~masked], idx[~masked]) and (noisy[masked] == SPECIAL['mask_id']).all()
    frac = masked.sum(1) / maskable.sum(1)
    assert (frac - t).abs().max() < 0.12 and abs((frac - t).mean()) < 0.02
    # at least one target per sample, even at a t where the draw alone would mask nothing
    _, masked, maskable = model.add_noise(idx, torch.full((64,), 1e-6), attn_mask, torch.Generator().manual_seed(0))
    assert (masked.sum(1) == 1).all() and not (masked & ~maskable).any()


def test_stratified_t_covers_every_stratum():
    model = tiny_model(t_min=0.2)
    t = model.sample_t(10, torch.Generator().manual_seed(0), 'cpu')
    u = (t - 0.2) / 0.8
    assert ((u * 10).floor() == torch.arange(10)).all()


def test_prefix_condition_keeps_a_clean_prefix():
    model = tiny_model(condition='prefix')
    idx, attn_mask = text_batch(B=32)
    _, masked, maskable = model.add_noise(idx, torch.ones(32), attn_mask, torch.Generator().manual_seed(0))
    first_masked = masked.float().argmax(1)
    for row in range(32):  # everything maskable after the first masked position is masked at t=1
        after = torch.arange(idx.shape[1]) >= first_masked[row]
        assert torch.equal(masked[row] & after, maskable[row] & after)
    assert (first_masked > 0).float().mean() > 0.8  # prefixes have random, mostly non-zero length


def test_nll_bound_per_token_counts_only_the_scored_tokens():
    """At init the model predicts about uniformly, so the bound is about ln(V) nats per scored token
    whatever the condition; with 'prefix' only the tokens after the prefix are scored."""
    idx, attn_mask = text_batch(B=16)
    per_token = {}
    for condition in ('noisy', 'prefix'):
        model = tiny_model(condition=condition).eval()
        total, n_tokens = model.nll_bound(idx, attn_mask, n_grid=4, generator=torch.Generator().manual_seed(0))
        per_token[condition] = total / n_tokens
        n_maskable = int(model.maskable(idx, attn_mask).sum())
        if condition == 'noisy':
            assert n_tokens == n_maskable
        else:
            assert 0.3 * n_maskable < n_tokens < 0.7 * n_maskable  # prefixes take half on average
    for value in per_token.values():
        assert abs(value - math.log(100)) < 0.3
    assert per_token['prefix'] == pytest.approx(per_token['noisy'], rel=0.05)


@pytest.mark.parametrize('local_window', [0, 2])
def test_packed_decoding_equals_padded_decoding(local_window):
    """With the Packing of gather_and_pack's valid the decoder runs on the masked positions only (packed);
    each packed row must get its own sample's concepts and timestep modulation, exactly as in the
    padded layout. AdaLN weights are randomised: at their zero init the modulation is zero for
    every sample and a row mix-up would not show."""
    model = tiny_model(local_window=local_window)
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.adaLN.weight.normal_(0.0, 0.2)
            layer.adaLN.bias.normal_(0.0, 0.2)
        if local_window:
            model.decoder.local.weight.normal_(0.0, 0.2)
    idx, attn_mask = text_batch(B=4)
    t = torch.tensor([0.2, 0.9, 0.5, 0.7])  # very different masked counts per row: padding slots
    noisy, masked, _ = model.add_noise(idx, t, attn_mask, torch.Generator().manual_seed(0))
    concepts = model.encoder(noisy, attn_mask)
    pos, valid, _ = gather_and_pack(masked)
    assert (~valid).sum() > 50
    packed = model.denoise(concepts, noisy, pos, t, Packing.of(valid))
    assert packed.shape == (int(masked.sum()), 32)
    torch.testing.assert_close(packed, model.denoise(concepts, noisy, pos, t)[valid], rtol=1e-5, atol=1e-5)


def test_local_window_reads_exactly_the_neighbours_and_starts_closed():
    """A decoded position reads the noisy tokens up to local_window away on either side, none
    further, no padding, and nothing across the sequence's edges; the window's map starts at zero,
    so that a warm start from a model without it starts as that model."""
    model = tiny_model(local_window=2, time_cond=False).eval()
    idx = torch.randint(95, (2, 30), generator=torch.Generator().manual_seed(0))
    idx[:, 20:] = SPECIAL['pad_id']  # padding from position 20 on
    concepts = torch.randn(2, 8, 32)  # fixed: only the decoder's own reading of the tokens may change
    pos = torch.tensor([[0, 10, 19], [0, 10, 19]])

    def out(x):
        return model.denoise(concepts, x, pos, torch.full((2,), 0.5))

    def with_token(at, value=5):
        x = idx.clone()
        x[:, at] = value
        return x
    closed = out(idx)
    torch.testing.assert_close(out(with_token(11)), closed)  # a zero map reads nothing
    with torch.no_grad():
        model.decoder.local.weight.normal_(0.0, 0.2)
    base = out(idx)
    for at in (8, 9, 11, 12):  # the neighbours of position 10 change its output, and only its
        changed = (out(with_token(at)) - base).abs().amax(-1) > 1e-6
        assert changed[:, 1].all() and not changed[:, 0].any() and not changed[:, 2].any()
    for at in (7, 13):  # beyond the window
        torch.testing.assert_close(out(with_token(at)), base)
    ids, inside = model.neighbours(idx, pos)
    assert inside[:, 0].tolist() == [[False, False, True, True]] * 2  # nothing left of position 0
    assert inside[:, 2].tolist() == [[True, True, False, False]] * 2  # padding right of position 19
    assert torch.equal(ids[:, 1], idx[:, [8, 9, 11, 12]])


def test_local_window_learns_what_concepts_pooled_over_the_window_blur():
    """Sequences that count (each token the one before it plus one, mod 90) from a random start: a
    decoder that reads its neighbours predicts a masked token from them; one that reads only 8
    concepts of the 64-token window must recover each position's number through them. After the
    same short training the window's loss must be well under the concepts-only loss."""
    data = (torch.randint(90, (32, 1), generator=torch.Generator().manual_seed(0)) + torch.arange(64)) % 90
    losses = {}
    for w in (0, 1):
        model = tiny_model(local_window=w, time_cond=False, label_smoothing=0.0, t_min=0.1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(100):
            _, loss, _ = model(data, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            losses[w] = sum(model(data, t=torch.full((32,), 0.5), generator=torch.Generator().manual_seed(k))[1].item()
                            for k in range(4)) / 4
    assert losses[1] < 0.6 * losses[0], losses


def test_elbo_weighting_is_one_over_t_normalised_by_maskable_tokens():
    model = tiny_model(label_smoothing=0.0)
    idx, attn_mask = text_batch(B=4)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9])
    _, loss, _ = model(idx, attn_mask, t=t, generator=torch.Generator().manual_seed(0))
    # recompute by hand from the same noise
    noisy, masked, maskable = model.add_noise(idx, t, attn_mask, torch.Generator().manual_seed(0))
    concepts = model.encoder(noisy, attn_mask)
    total = 0.0
    for b in range(4):
        pos = masked[b].nonzero().squeeze(1)
        h = model.denoise(concepts[b:b + 1], noisy[b:b + 1], pos[None], t[b:b + 1])[0]
        ce = F.cross_entropy(model.lm_head(h), idx[b, pos], reduction='sum')
        total += ce / t[b]
    torch.testing.assert_close(loss, total / maskable.sum(), rtol=1e-5, atol=1e-5)
    unweighted = tiny_model(label_smoothing=0.0, elbo_weight=False).eval()  # stats['ce'] is an eval metric
    _, loss_plain, stats = unweighted(idx, attn_mask, t=t, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss_plain, stats['ce'])


@pytest.mark.parametrize('remasking', ['random', 'confidence'])
def test_generate_fills_every_mask_keeps_given_tokens_and_padding_and_is_seeded(remasking):
    model = tiny_model()
    idx, attn_mask = text_batch(B=3, N=40)
    x = idx.clone()
    fill = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.6) & attn_mask
    x[fill] = SPECIAL['mask_id']
    x[:, :5] = idx[:, :5]  # a prompt
    run = lambda seed: model.generate(x, steps=7, attn_mask=attn_mask, remasking=remasking,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed))
    out = run(3)
    assert not (out[attn_mask] == SPECIAL['mask_id']).any()
    assert torch.equal(out[~fill], x[~fill])  # prompt, given tokens and padding unchanged
    assert torch.equal(out, run(3)) and not torch.equal(out, run(4))


@pytest.mark.parametrize('arch', [{}, {'recursive_iters': 3}, {'bixt': True}])
def test_generate_reencodes_only_the_committed_tokens_and_gets_what_a_full_encode_gets(arch):
    """Static tokens: generate() keeps their keys/values and projects only the tokens each step
    commits; the concepts it decodes from must be those of encoding the whole sequence afresh.
    BiXT updates its tokens, so it re-encodes everything every step."""
    model = tiny_model(**arch)
    idx, attn_mask = text_batch(B=3, N=40)
    x = idx.clone()
    x[attn_mask & (torch.arange(40) >= 4)] = SPECIAL['mask_id']  # a 4-token prompt, 16 to fill per row
    seen, projected = [], []
    denoise = model.denoise
    model.denoise = lambda memory, noisy, *a: seen.append((memory, noisy.clone())) or denoise(memory, noisy, *a)
    project = model.encoder.layers[0].cross_attn.project_kv if not arch.get('bixt') else None
    if project:
        model.encoder.layers[0].cross_attn.project_kv = lambda ctx: projected.append(ctx.shape[:2]) or project(ctx)
    model.generate(x, steps=4, attn_mask=attn_mask, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 4
    for memory, noisy in seen:
        torch.testing.assert_close(memory, model.encoder(noisy, attn_mask), rtol=1e-5, atol=1e-5)
    if project:  # the whole sequence once, then the 3 rows x 4 tokens each step committed, from the generate call
        assert projected[:4] == [(3, 40), (1, 12), (1, 12), (1, 12)]


def stub_head(model, vocab=100):
    """The denoiser's hidden state at a position is the position itself, and the head puts the peak
    p/4 on token p: every prediction and its confidence is known. Records the rows decoded per step."""
    decoded = []
    model.denoise = lambda memory, x, pos, t, packing: decoded.append(packing.pack(pos)) or decoded[-1]
    model.lm_head.forward = lambda pos: torch.zeros(*pos.shape, vocab).scatter(-1, pos[..., None], pos[..., None] / 4)
    return decoded


def test_confidence_remasking_commits_the_most_confident_prediction_first():
    """Confidence rises with the position: one commit per step, so the positions are filled from the
    last to the first (LLaDA's low-confidence remasking), each from the logits of every candidate."""
    model, N = tiny_model(), 12
    decoded = stub_head(model)
    trajectory = []
    x = model.generate(torch.full((1, N), SPECIAL['mask_id']), steps=N, temperature=0.0, remasking='confidence',
                       trajectory=trajectory)
    assert x[0].tolist() == list(range(N))
    filled = [int((b != a).nonzero()[0, 1]) for a, b in zip([torch.full((1, N), SPECIAL['mask_id'])] + trajectory,
                                                              trajectory)]
    assert filled == list(range(N - 1, -1, -1))
    assert [len(d) for d in decoded] == list(range(N, 0, -1))


def test_random_remasking_decodes_only_the_positions_it_commits():
    """MDLM's ancestral sampler: each step commits a uniform random ceil(left / steps left) of the masked
    positions and computes logits there only, so the whole run decodes each position once."""
    model, N = tiny_model(), 40
    decoded = stub_head(model)
    x = model.generate(torch.full((2, N), SPECIAL['mask_id']), steps=8, temperature=0.0,
                       generator=torch.Generator().manual_seed(0))
    assert x.tolist() == [list(range(N))] * 2
    assert [len(d) for d in decoded] == [2 * 5] * 8  # 2 rows x 40 / 8 per step
    assert sorted(torch.cat(decoded).tolist()) == sorted(list(range(N)) * 2)  # each position of each row once
    first = decoded[0].tolist()  # row 0's positions, then row 1's: random, not left to right, not alike
    assert first[:5] != list(range(5)) and first[:5] != first[5:]


@pytest.mark.parametrize('V', [1024, 1000])  # 1,000: the last block of ids is padded
def test_sampled_tokens_follow_the_exact_distribution(V):
    """sample_tokens' float32 probabilities and two-level running sums: a chi-square test of 200,000 draws
    against a Zipf distribution whose tail holds 15% of the mass; ids of probability 0 (the specials,
    the top_k cut) are never drawn; temperature 0 is the argmax."""
    from model import sample_tokens
    n = 200_000
    p = 1.0 / torch.arange(1, V + 1).double() ** 1.1
    p[-5:] = 0
    p /= p.sum()
    logits = p.log().float().expand(n, V).clone()
    tokens, confidence = sample_tokens(logits, 1.0, 0, list(range(V - 5, V)), torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=V).double()
    keep = p > 0
    chi2 = ((counts[keep] - n * p[keep]) ** 2 / (n * p[keep])).sum().item()
    dof = int(keep.sum()) - 1
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), chi2  # a wrong tail would be hundreds of sigmas off
    assert counts[~keep].sum() == 0
    torch.testing.assert_close(confidence, p[tokens].float())
    top, _ = sample_tokens(p.log().float().expand(1000, V).clone(), 1.0, 3, [], torch.Generator().manual_seed(1))
    assert set(top.tolist()) == {0, 1, 2}
    assert sample_tokens(p.log().float()[None].clone(), 0.0, 0, [], None)[0].item() == 0


def test_the_two_level_draw_is_the_inverse_cdf_of_one_float64_running_sum():
    """The same uniforms give the same ids as one float64 running sum over the whole row, but where a
    uniform falls within rounding of a block's edge; mass only at either end of a row, or in one id."""
    from model import inverse_cdf_draw
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(torch.randn(5000, 1000, generator=g) * 4, dim=-1)
    probs[:3] = 0
    probs[0, 0] = probs[1, -1] = 1.0
    probs[2, 990:] = 0.1
    cdf = probs.double().cumsum(-1)
    u = torch.rand(5000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * cdf[:, -1:]
    exact = torch.searchsorted(cdf, u, right=True).squeeze(1)
    drawn = inverse_cdf_draw(probs, torch.Generator().manual_seed(1))
    assert (drawn == exact).float().mean() > 0.999
    assert drawn[0] == 0 and drawn[1] == 999 and 990 <= drawn[2] <= 999
    assert (probs.gather(1, drawn[:, None]) > 0).all()


@pytest.mark.parametrize('remasking', ['random', 'confidence'])
@pytest.mark.parametrize('block_len,steps', [(0, 1), (0, 40), (8, 10), (5, 3)])
def test_generate_schedules(block_len, steps, remasking):
    model = tiny_model()
    x = torch.full((2, 30), SPECIAL['mask_id'])
    trajectory = []
    out = model.generate(x, steps=steps, block_len=block_len, temperature=0.0, top_k=5, remasking=remasking,
                         trajectory=trajectory, generator=torch.Generator().manual_seed(0))
    assert not (out == SPECIAL['mask_id']).any()
    assert not torch.isin(out, torch.tensor(list(SPECIAL.values()))).any()
    n_masked = [int((frame == SPECIAL['mask_id']).sum()) for frame in trajectory]
    assert n_masked == sorted(n_masked, reverse=True) and n_masked[-1] == 0
    assert len(trajectory) <= max(steps, -(-30 // block_len) if block_len else 1)  # steps, at least one per block
    if block_len:  # semi-autoregressive: a block is filled only once every block left of it is complete
        block = torch.arange(30) // block_len
        for frame in trajectory:
            filled = frame[0] != SPECIAL['mask_id']
            if filled.any():
                current = int(block[filled].max())
                assert filled[block < current].all()


def test_decoder_memory_is_linear_in_sequence_length():
    """Denoise a 32k-token sequence with most positions masked: no N x N tensor may appear."""
    code = """
import resource, torch
from model import ConceptConfig, ConceptDiffusion
cfg = ConceptConfig(vocab_size=512, block_size=32768, n_layer=1, n_head=4, n_embd=64, n_concepts=32,
                    ffn_size=128, n_dec_layer=2, mask_id=511, pad_id=510)
model = ConceptDiffusion(cfg).eval()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    _, loss, _ = model(torch.randint(500, (1, 32768)), t=torch.tensor([0.9]))
assert torch.isfinite(loss)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 1024


@pytest.mark.parametrize('arm', ['concept', 'standard'])
def test_stage_lowers_the_bound(data_dir, tmp_path, arm):
    out_dir = str(tmp_path / 'diff')
    run_script('train_diffusion.py', *TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=60',
               '--eval_interval=30', '--bound_levels=4', f'--encoder={arm}')
    records = read_log(out_dir)
    assert records[-1]['val_nll_bound'] < records[0]['val_nll_bound'] - 0.3
    assert records[-1]['val_ppl_bound'] == pytest.approx(math.exp(records[-1]['val_nll_bound']))


def test_swapped_concepts_decode_each_sequence_from_the_previous_ones():
    """nll_bound(swap_concepts=True) decodes row b from row b-1's concepts, with the same noise."""
    model = tiny_model().eval()
    idx, attn_mask = text_batch(B=3)
    seen, encode, denoise = [], model.encode, model.denoise
    model.encode = lambda *a: seen.append(('encoded', encode(*a))) or seen[-1][1]
    model.denoise = lambda memory, *a: seen.append(('decoded', memory)) or denoise(memory, *a)
    model.nll_bound(idx, attn_mask, n_grid=2, generator=torch.Generator().manual_seed(0), swap_concepts=True)
    assert [kind for kind, _ in seen] == ['encoded', 'decoded'] * 2
    for (_, encoded), (_, decoded) in zip(seen[::2], seen[1::2]):
        torch.testing.assert_close(decoded, encoded.roll(1, dims=0))
        assert not torch.equal(decoded, encoded)
