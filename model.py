"""
The Concept Encoder, every module and loss in one file: C learned concepts read N tokens through
cross-attention, O(C·N) per layer, and decoders read them back out where a loss needs them.
Shapes: B batch, N tokens, C concepts, H n_embd, nh heads, hs head size, M decoded positions,
V vocabulary. No [N, N] tensor exists anywhere in this file.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

IGNORE_INDEX = -100  # label value of positions that carry no loss (as in PyTorch's cross_entropy)


@dataclass
class ConceptConfig:
    encoder: str = 'concept'    # 'concept' (tokens -> C concepts) | 'standard' (the O(N²) peer, StandardEncoder)
    vocab_size: int = 8192      # the data directory's vocab_size (every id < vocab_size)
    block_size: int = 512       # the training window; positions are fixed sinusoids, so any length can be read
    n_layer: int = 2            # encoder layers (or, with recursive_iters, the default iteration count)
    n_head: int = 8
    n_embd: int = 512           # H: token, concept and attention width
    n_concepts: int = 128       # C
    ffn_size: int = 1024        # inner width of the gated FFN (GeGLU): H -> 2*ffn_size -> H
    dropout: float = 0.0
    bias: bool = False          # biases in Linear layers (LayerNorms always have one)
    bixt: bool = False          # bidirectional cross-attention (Hiller et al. 2024): tokens are updated too
    recursive_iters: int = 0    # >0: one shared encoder layer applied this many times
    decoder: str = 'perceiver'  # MLM/TSDAE decoder: 'perceiver' | 'posonly'; 'diffusion'
    n_dec_layer: int = 1        # decoder layers
    tie_weights: bool = True    # lm_head shares the token embedding matrix
    # diffusion only (ConceptDiffusion)
    time_cond: bool = True      # AdaLN-Zero conditioning on t (MDLM and LLaDA work without it)
    local_window: int = 0       # >0: each decoded position also reads the noisy tokens this many to each side
    condition: str = 'noisy'    # what the encoder sees: 'noisy' | 'clean' | 'prefix' (see ConceptDiffusion)
    t_min: float = 0.3          # training draws t ~ U(t_min, 1)
    stratified_t: bool = True   # one t per stratum [i/B, (i+1)/B) of the batch (MDLM's antithetic sampler)
    label_smoothing: float = 0.1
    elbo_weight: bool = True    # weight each masked token's loss by 1/t (the MDLM bound)
    # concept geometry regularisers, in every stage (see add_concept_losses)
    concept_losses: str = ''          # e.g. 'vicreg,t_regs_mst'; '' = none
    concept_loss_weight: float = 0.02  # total regulariser weight, split evenly among them
    concept_loss_warmup: int = 0      # iterations of linear warmup of the regularisers
    # special token ids, copied from the data directory's meta.json
    pad_id: int = -1
    mask_id: int = -1
    eod_id: int = -1
    cls_id: int = -1
    sep_id: int = -1

    @property
    def special_ids(self):
        return [i for i in (self.pad_id, self.mask_id, self.eod_id, self.cls_id, self.sep_id) if i >= 0]


DECODERS = ('perceiver', 'posonly', 'diffusion')
ENCODERS = ('concept', 'standard')
# options that older checkpoints' model_args hold, at the only value this model.py has (build_model drops them)
RETIRED_ARGS = {'shared_token_kv': False, 'loss_weighting': 'fixed', 'concept_loss_pooled': False}


# ----------------------------------------------------------------------------------------------
# building blocks

SHORT_SIDE = 1024  # CPU training: attentions with at most this many queries or keys use the math kernel
# the process's setting of the math-SDPA precision flag, which attention() restores after its CPU calls
_MATH_SDP_REDUCTION_DEFAULT = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()


def attention(q, k, v, key_mask=None, dropout_p=0.0):
    """SDPA over (B, nh, T, hs) queries and (B, nh, S, hs) keys/values; key_mask (B, S) bool, True =
    may be attended. Every attention goes through here. CPU training sends short-sided attentions
    (C x N, C x C, M x C) to the math kernel, whose backward beats the flash kernel's for so few
    queries; its (T, S) scores grow with the long side only."""
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
    if q.device.type == 'cpu' and q.requires_grad and min(q.shape[-2], k.shape[-2]) <= SHORT_SIDE:
        # kept in bf16 (the kernel would upcast to float32: half-speed matmuls); the flag is
        # process-wide, so it is set for this call only (torch.compile traces the set and restore)
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        finally:
            torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(_MATH_SDP_REDUCTION_DEFAULT)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class CrossAttention(nn.Module):
    """Queries from one stream attend to keys/values of another. project_kv is separate so that a
    static context (the recursive encoder's tokens) is projected once and reused."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_kv = nn.Linear(cfg.n_embd, 2 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def project_kv(self, context):
        B, N, H = context.shape
        k, v = self.c_kv(context).view(B, N, 2, self.n_head, H // self.n_head).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)  # 2 x (B, nh, N, hs)

    def forward(self, x, kv, key_mask=None, packing=None):
        """x (B, T, H) queries, or (M', H) packed rows given a Packing of (B, T): then only the
        attention sees the padded layout; kv from project_kv; key_mask (B, N), True = attend."""
        q = self.c_q(x)
        if packing is not None:
            q = packing.unpack(q)  # (B, T, H), zeros at padding
        B, T, H = q.shape
        q = q.view(B, T, self.n_head, H // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = attention(q, kv[0], kv[1], key_mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, H)
        return self.c_proj(y if packing is None else packing.pack(y))


class SelfAttention(nn.Module):
    """Bidirectional self-attention: among the C concepts, or among the tokens in the standard arm."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, key_mask=None):
        B, T, H = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, H // self.n_head).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, key_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H))  # (B, T, H)


class GatedMLP(nn.Module):
    """GeGLU feed-forward (Shazeer 2020): GELU(a) * g with a, g from one fused projection."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 2 * cfg.ffn_size, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.ffn_size, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        a, g = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.gelu(a) * g))


class ConceptLayer(nn.Module):
    """Pre-LN layer on the concepts: read the (static) tokens, attend among concepts, FFN."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.cross_attn = CrossAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.self_attn = SelfAttention(cfg)
        self.ln_3 = nn.LayerNorm(cfg.n_embd)
        self.mlp = GatedMLP(cfg)

    def forward(self, c, token_kv, key_mask):
        c = c + self.cross_attn(self.ln_1(c), token_kv, key_mask)  # (B, C, H), cost O(C·N)
        c = c + self.self_attn(self.ln_2(c))                       # O(C²)
        return c + self.mlp(self.ln_3(c))


class BiXTLayer(nn.Module):
    """Bidirectional cross-attention (BiXT, Hiller et al. 2024): one similarity A = R_c R_tᵀ / sqrt(hs)
    of shared references, read row-wise (concepts <- tokens) and column-wise (tokens <- concepts),
    both through SDPA. Padding tokens are never updated and never read; tokens get their own FFN."""

    def __init__(self, cfg, has_token_update=True):
        super().__init__()
        H = cfg.n_embd
        self.n_head = cfg.n_head
        self.has_token_update = has_token_update
        self.ln_c = nn.LayerNorm(H)
        self.ln_t = nn.LayerNorm(H)
        self.c_ref_val = nn.Linear(H, 2 * H, bias=cfg.bias)   # concepts -> R_c, V_c
        self.t_ref_val = nn.Linear(H, 2 * H, bias=cfg.bias)   # tokens   -> R_t, V_t
        self.c_proj = nn.Linear(H, H, bias=cfg.bias)
        if has_token_update:  # the last layer's token update would never be read: it has none (as in BiXT)
            self.t_proj = nn.Linear(H, H, bias=cfg.bias)
            self.ln_tm = nn.LayerNorm(H)
            self.token_mlp = GatedMLP(cfg)
        self.ln_2 = nn.LayerNorm(H)
        self.self_attn = SelfAttention(cfg)
        self.ln_3 = nn.LayerNorm(H)
        self.mlp = GatedMLP(cfg)
        self.dropout = cfg.dropout

    def _heads(self, x):
        B, T, H2 = x.shape  # H2 = 2 * n_embd: reference and value side by side
        r, v = x.view(B, T, 2, self.n_head, H2 // (2 * self.n_head)).unbind(2)
        return r.transpose(1, 2), v.transpose(1, 2)  # 2 x (B, nh, T, hs)

    def forward(self, c, x, key_mask, update_tokens=True):
        """c (B, C, H) concepts, x (B, N, H) tokens, key_mask (B, N) -> updated (c, x)."""
        B, C, H = c.shape
        N = x.shape[1]
        update_tokens = update_tokens and self.has_token_update
        r_c, v_c = self._heads(self.c_ref_val(self.ln_c(c)))
        r_t, v_t = self._heads(self.t_ref_val(self.ln_t(x)))
        p = self.dropout if self.training else 0.0
        dc = attention(r_c, r_t, v_t, key_mask, p)  # rows of A
        if update_tokens:
            dx = attention(r_t, r_c, v_c, dropout_p=p)  # rows of Aᵀ
            dx = self.t_proj(dx.transpose(1, 2).reshape(B, N, H))
            dx = dx + self.token_mlp(self.ln_tm(x + dx))
            if key_mask is not None:
                dx = dx * key_mask[..., None].to(dx.dtype)  # padding tokens stay as they are
            x = x + dx
        c = c + self.c_proj(dc.transpose(1, 2).reshape(B, C, H))
        c = c + self.self_attn(self.ln_2(c))
        c = c + self.mlp(self.ln_3(c))
        return c, x


# ----------------------------------------------------------------------------------------------
# positions: fixed sinusoids (Vaswani et al. 2017) read through a learned linear map (Perceiver IO's
# Fourier features), in the encoders of both arms and in every decoder query. No parameter grows with
# N, so a model trained on windows of block_size tokens reads and writes any length; the map lets it
# shape its own position codes within the window as a learned table would (docs/design.md).

def sinusoids(pos, dim):
    """Positions pos (...) -> (..., dim) float32 features sin(p·f_i), cos(p·f_i), f_i = 10000^(-2i/dim)."""
    freqs = torch.exp(torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = pos.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Positions(nn.Module):
    """pos (...) -> (..., dim): a learned linear map of the fixed sinusoids of each position, scaled by
    1/dim so that an Adam step moves a position's code about as much as it moves a row of a learned
    table (the map pools the gradient of every position: unscaled, the codes outgrow the token
    embeddings within a hundred steps and the concepts collapse). Starts at a table's rms of 0.02."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(dim, dim) * 0.02 * math.sqrt(2 * dim))  # (out, in)

    def forward(self, pos):
        return sinusoids(pos, self.proj.shape[1]) @ self.proj.T / self.proj.shape[1]


# ----------------------------------------------------------------------------------------------
# the encoder

class Encoder(nn.Module):
    """What both arms share: token embeddings plus positions, dropout on their sum."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = Positions(cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def embed(self, idx, pos=None):
        """idx (..., N) ids at pos (N,), by default 0 .. N-1 -> (..., N, H)."""
        pos = torch.arange(idx.shape[-1], device=idx.device) if pos is None else pos
        return self.drop(self.wte(idx) + self.wpe(pos))


class ConceptEncoder(Encoder):
    """tokens (B, N) -> concepts (B, C, H). Cost and memory are linear in N."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ln_tok = nn.LayerNorm(cfg.n_embd)  # one norm on the token stream, shared by all layers
        self.concepts = nn.Parameter(torch.randn(cfg.n_concepts, cfg.n_embd) * 0.02)
        n_distinct = 1 if cfg.recursive_iters > 0 else cfg.n_layer
        if cfg.bixt:  # a layer updates tokens only if a layer runs after it: never the last one, nor a
            # recursive layer applied once (its token update would be parameters DDP never sees used)
            self.layers = nn.ModuleList([BiXTLayer(cfg, has_token_update=(i < n_distinct - 1 or cfg.recursive_iters > 1))
                                         for i in range(n_distinct)])
        else:
            self.layers = nn.ModuleList([ConceptLayer(cfg) for _ in range(n_distinct)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    @property
    def n_iters(self):
        return self.cfg.recursive_iters if self.cfg.recursive_iters > 0 else self.cfg.n_layer

    def forward(self, idx, attn_mask=None, n_iters=None, token_kv=None):
        """idx (B, N); attn_mask (B, N) bool, False for padding and TSDAE-deleted tokens; n_iters
        overrides recursive_iters at inference; token_kv: this idx's token_kv(), if already at hand."""
        B, N = idx.shape
        c = self.concepts.expand(B, -1, -1)  # (B, C, H)
        if self.cfg.recursive_iters > 0:
            layer_seq = [self.layers[0]] * (n_iters or self.cfg.recursive_iters)
        else:
            layer_seq = self.layers
        if self.cfg.bixt:
            x = self.ln_tok(self.embed(idx))
            for i, layer in enumerate(layer_seq):
                c, x = layer(c, x, attn_mask, update_tokens=(i < len(layer_seq) - 1))
        else:  # static tokens: the recursive layer's keys/values are projected once, not per iteration
            token_kv = self.token_kv(idx) if token_kv is None else token_kv
            for i, layer in enumerate(layer_seq):
                c = layer(c, token_kv[i % len(token_kv)], attn_mask)
        return self.ln_f(c)

    def token_kv(self, idx, cache=None, changed=None):
        """Each distinct layer's token keys and values, [2 x (B, nh, N, hs)], for static tokens (no BiXT).
        A token's keys/values depend on its id and position alone, so given the cache of an earlier
        call and the (rows, cols) of the ids that changed since, only those are projected and written
        into it: generate() commits N / steps tokens a step and pays 2·H²·N MACs per layer once."""
        if cache is None:
            x = self.ln_tok(self.embed(idx))  # (B, N, H)
            return [layer.cross_attn.project_kv(x) for layer in self.layers]
        rows, cols = changed  # (M,) each
        x = self.ln_tok(self.embed(idx[rows, cols], cols))[None]  # (1, M, H)
        for (k, v), layer in zip(cache, self.layers):
            k_new, v_new = layer.cross_attn.project_kv(x)  # 2 x (1, nh, M, hs)
            k[rows, :, cols] = k_new[0].transpose(0, 1).to(k.dtype)  # (M, nh, hs)
            v[rows, :, cols] = v_new[0].transpose(0, 1).to(v.dtype)
        return cache


def adaln_modulation(adaLN, cond, packing=None):
    """AdaLN-Zero (DiT): cond (B, H) -> shift, scale, gate of two sub-blocks, each (B, 1, H), or
    (M', H) for the packed rows of a Packing."""
    m = adaLN(F.silu(cond))  # (B, 6H)
    m = m[:, None, :] if packing is None else m[packing.rows()]
    return m.chunk(6, dim=-1)


class TokenLayer(nn.Module):
    """The standard arm's pre-LN transformer layer, O(N²); with time_cond (MDLM's denoiser) both
    sub-blocks are AdaLN-Zero-modulated, as in DecoderLayer."""

    def __init__(self, cfg, time_cond=False):
        super().__init__()
        self.time_cond = time_cond
        self.ln_1 = nn.LayerNorm(cfg.n_embd, elementwise_affine=not time_cond)
        self.self_attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, elementwise_affine=not time_cond)
        self.mlp = GatedMLP(cfg)
        if time_cond:
            self.adaLN = nn.Linear(cfg.n_embd, 6 * cfg.n_embd)

    def forward(self, x, key_mask=None, cond=None):
        """x (B, N, H); key_mask (B, N) True = may be attended; cond (B, H) with time_cond."""
        if not self.time_cond:
            x = x + self.self_attn(self.ln_1(x), key_mask)
            return x + self.mlp(self.ln_2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = adaln_modulation(self.adaLN, cond)
        x = x + gate1 * self.self_attn(self.ln_1(x) * (1 + scale1) + shift1, key_mask)
        return x + gate2 * self.mlp(self.ln_2(x) * (1 + scale2) + shift2)


class StandardEncoder(Encoder):
    """tokens (B, N) -> states (B, N, H): the O(N²) peer (encoder='standard'). A token attn_mask
    hides is masked as a key and replaced by [MASK]; with time_cond it reads the noise level t."""

    def __init__(self, cfg, time_cond=False):
        super().__init__(cfg)
        self.time_emb = TimestepEmbedding(cfg) if time_cond else None
        self.layers = nn.ModuleList([TokenLayer(cfg, time_cond) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, idx, attn_mask=None, n_iters=None, t=None):
        """idx (B, N); attn_mask (B, N) bool; t (B,) noise level; n_iters: the concept arm's, unused."""
        if attn_mask is not None:
            idx = torch.where(attn_mask, idx, self.cfg.mask_id)
        cond = None
        if self.time_emb is not None:
            cond = self.time_emb(t if t is not None else idx.new_zeros(idx.shape[0], dtype=torch.float))
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, attn_mask, cond)
        return self.ln_f(x)  # (B, N, H)


# ----------------------------------------------------------------------------------------------
# decoders: concepts -> hidden states at the positions that need them

def gather_and_pack(select):
    """select (B, N) bool -> pos, valid (B, Mmax): each row's selected positions first, padded with
    unselected ones (valid False; exact, since decoded positions never attend to each other), and
    the Packing of the valid slots; one host sync for the two data-dependent sizes (max and total)."""
    counts = select.sum(1)                                       # (B,)
    if select.numel() == 0:
        m_max = m_total = 0
    else:
        m_max, m_total = torch.stack([counts.max(), counts.sum()]).tolist()  # the one sync
    order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :m_max]
    valid = torch.arange(m_max, device=select.device)[None, :] < counts[:, None]
    return order, valid, Packing.of(valid, counts, m_total)


class Packing(NamedTuple):
    """The valid slots of gather_and_pack's (B, T) layout as the rows of a packed (M', ...) tensor:
    pack(x) == x[valid]. An index built once per batch, not the boolean mask (whose backward has a
    data-dependent shape), keeps the compiled decoder one graph."""
    valid: torch.Tensor  # (B, T) bool
    index: torch.Tensor  # (M',) long: b·T + t of each valid slot, in order

    @classmethod
    def of(cls, valid, counts=None, n_valid=None):
        """valid (B, T) bool, True slots first in each row; given the row counts (B,) and their
        total n_valid (int), no host synchronisation."""
        if counts is None or n_valid is None:
            return cls(valid, valid.flatten().nonzero().squeeze(1))
        T = valid.shape[1]
        ends = counts.cumsum(0)                                               # (B,)
        r = torch.arange(n_valid, device=valid.device)                        # (M',) packed row
        row = torch.searchsorted(ends, r, right=True)                         # (M',) its sample
        return cls(valid, row * T + r - (ends - counts)[row])

    def pack(self, x):
        """(B, T, ...) -> (M', ...)"""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x):
        """(M', ...) -> (B, T, ...), zeros at the padding slots"""
        B, T = self.valid.shape
        return x.new_zeros(B * T, *x.shape[1:]).index_copy(0, self.index, x).view(B, T, *x.shape[1:])

    def rows(self):
        """(M',) the batch row of each packed row"""
        return self.index // self.valid.shape[1]


class DecoderLayer(nn.Module):
    """Perceiver-IO decoder layer: queries read the concepts, then an FFN, O(M·C); no query-query
    attention. With time_cond (diffusion), AdaLN-Zero: a zero-initialised map from t to shift, scale
    and gate, so the layer starts as the identity."""

    def __init__(self, cfg, time_cond=False):
        super().__init__()
        self.time_cond = time_cond
        self.ln_1 = nn.LayerNorm(cfg.n_embd, elementwise_affine=not time_cond)
        self.cross_attn = CrossAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, elementwise_affine=not time_cond)
        self.mlp = GatedMLP(cfg)
        if time_cond:
            self.adaLN = nn.Linear(cfg.n_embd, 6 * cfg.n_embd)

    def forward(self, q, concepts, cond=None, packing=None):
        """q (B, M, H), or packed (M', H) with a Packing (see CrossAttention); concepts (B, C, H); cond (B, H)."""
        kv = self.cross_attn.project_kv(concepts)
        if not self.time_cond:
            q = q + self.cross_attn(self.ln_1(q), kv, packing=packing)
            return q + self.mlp(self.ln_2(q))
        shift1, scale1, gate1, shift2, scale2, gate2 = adaln_modulation(self.adaLN, cond, packing)
        q = q + gate1 * self.cross_attn(self.ln_1(q) * (1 + scale1) + shift1, kv, packing=packing)
        return q + gate2 * self.mlp(self.ln_2(q) * (1 + scale2) + shift2)


class TimestepEmbedding(nn.Module):
    """t in [0, 1] -> (B, H): sinusoidal features of 1000·t (spread over the frequencies), then an MLP (DiT)."""

    def __init__(self, cfg, n_freq=256):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, cfg.n_embd), nn.SiLU(), nn.Linear(cfg.n_embd, cfg.n_embd))

    def forward(self, t):
        half = self.n_freq // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None, :]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (B, H)


class Decoder(nn.Module):
    """Queries at positions pos (B, M) read the concepts (Perceiver IO). MLM: the query is the
    position plus the input token ('perceiver'), or the position only ('posonly': all content must
    come through the concepts, as TSDAE needs). Diffusion: the noisy token and its position, t
    through AdaLN-Zero, and with local_window its neighbours' noisy tokens, which tell a masked
    position what is written next to it (concepts pooled over the whole window blur that); the
    window costs O(M·w) and its map starts at zero, so a warm start from MLM starts as that model."""

    def __init__(self, cfg):
        super().__init__()
        diffusion = cfg.decoder == 'diffusion'
        time_cond = diffusion and cfg.time_cond
        self.wpe = Positions(cfg.n_embd)
        self.local = (nn.Linear(2 * cfg.local_window * cfg.n_embd, cfg.n_embd, bias=False)
                      if diffusion and cfg.local_window else None)
        self.time_emb = TimestepEmbedding(cfg) if time_cond else None
        self.layers = nn.ModuleList([DecoderLayer(cfg, time_cond) for _ in range(cfg.n_dec_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, concepts, pos, query_tok_emb=None, t=None, neighbour_emb=None, packing=None):
        """concepts (B, C, H); pos (B, M); query_tok_emb (B, M, H) or None (posonly); t (B,) and
        neighbour_emb (B, M, 2w, H) for diffusion -> (B, M, H), or (M', H) given a Packing of (B, M)."""
        q = self.wpe(pos)
        if query_tok_emb is not None:
            q = q + query_tok_emb
        if self.local is not None:
            q = q + self.local(neighbour_emb.flatten(2))  # (B, M, 2w·H) -> (B, M, H)
        if packing is not None:
            q = packing.pack(q)  # (M', H)
        cond = self.time_emb(t) if self.time_emb is not None else None
        for layer in self.layers:
            q = layer(q, concepts, cond, packing)
        return self.ln_f(q)  # (B, M, H) or (M', H)


# ----------------------------------------------------------------------------------------------
# classification heads: a stage model read out for a downstream task (eval_glue.py)

def pair_features(a, b):
    """[a; b; |a - b|; a ⊙ b] (B, 4H): SentEval's features for a pair encoded apart."""
    return torch.cat([a, b, (a - b).abs(), a * b], dim=-1)


def pooled(model, idx, mask, scorer=None):
    """(B, H): the encoder's states, the C concepts or the standard arm's real tokens, weighted by
    a softmax of scorer's (H -> 1) scores; without one, or at its zero init, their mean."""
    states = model.encoder(idx, mask)                                          # (B, S, H)
    logits = (scorer(states).squeeze(-1).float() if scorer is not None
              else states.new_zeros(states.shape[:2], dtype=torch.float32))   # (B, S)
    if getattr(model.cfg, 'encoder', 'concept') == 'standard':  # only its real tokens count
        logits = logits.masked_fill(~mask, float('-inf'))
    alpha = F.softmax(logits, dim=-1).to(states.dtype)
    return torch.einsum('bs,bsh->bh', alpha, states)


class Classifier(nn.Module):
    """A stage model plus a new head for classification (n_out classes) or regression (n_out = 1);
    head 'pool' | 'pair' | 'decoder'; pair=True pools the two texts apart."""

    def __init__(self, model, head, n_out, pair, dropout):
        super().__init__()
        H = model.cfg.n_embd
        self.model, self.head, self.pair = model, head, pair
        if head in ('pool', 'pair'):
            # weighted pooling: score_i = w·s_i, softmax over the states. Zero init: it starts
            # as the plain mean, the embedding that encode(), the probe and the cosine head use
            self.score = nn.Linear(H, 1)
            nn.init.zeros_(self.score.weight)
            nn.init.zeros_(self.score.bias)
        self.ln = nn.LayerNorm(H)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(4 * H if pair else H, n_out)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def head_parameters(self):
        """The parameters this class adds to the pretrained model (a learning rate of their own)."""
        return [p for name, p in self.named_parameters() if not name.startswith('model.')]

    def pool(self, idx, mask):
        return self.ln(pooled(self.model, idx, mask, self.score))             # (B, H)

    def read_decoder(self, idx, mask):
        """The decoder's mean over the real tokens (diffusion: the denoiser at t = 0 on clean text)."""
        c = self.model.encoder(idx, mask)
        B, N = idx.shape
        pos = torch.arange(N, device=idx.device).expand(B, N)
        if isinstance(self.model, ConceptDiffusion):
            h = self.model.denoise(c, idx, pos, torch.zeros(B, device=idx.device))
        else:
            h = self.model.decode(c, idx, pos)                                  # (B, N, H)
        m = mask[..., None].to(h.dtype)
        return self.ln((h * m).sum(1) / m.sum(1))

    def features(self, idx, mask, idx_b=None, mask_b=None):
        """What the output layer reads: (B, H), or (B, 4H) for a pair."""
        if self.head == 'decoder':
            return self.read_decoder(idx, mask)
        if self.pair:
            return pair_features(self.pool(idx, mask), self.pool(idx_b, mask_b))
        return self.pool(idx, mask)

    def forward(self, idx, mask, idx_b=None, mask_b=None):
        return self.out(self.drop(self.features(idx, mask, idx_b, mask_b)))  # (B, n_out)


# ----------------------------------------------------------------------------------------------
# full models

def lm_cross_entropy(lm_head, h, labels, label_smoothing=0.0):
    """h (M, H) -> logits (M, V), detached (read only for accuracy), and the float32 cross-entropy
    (M,), equal to F.cross_entropy(..., reduction='none', label_smoothing=...). Head and loss in one
    function so that inductor fuses them; the label's logit is picked by comparison with the
    vocabulary index, whose backward is elementwise, not a scatter into (M, V) zeros."""
    logits = lm_head(h)                                                       # (M, V)
    z = logits.float()
    is_label = torch.arange(z.shape[-1], device=z.device) == labels[:, None]  # (M, V) bool
    label_logit = torch.where(is_label, z, 0.0).sum(-1)                      # (M,)
    # label smoothing: (1 - s)·(-log p_label) + s·mean over the vocabulary of (-log p)
    ce = torch.logsumexp(z, -1) - (1 - label_smoothing) * label_logit
    if label_smoothing:
        ce = ce - label_smoothing * z.mean(-1)
    return logits.detach(), ce


class StageModel(nn.Module):
    """What every objective shares: the encoder, the lm_head, init, optimizer and FLOP count. With
    encoder='standard' there is no decoder: the encoder's token states feed the lm_head."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder '{cfg.encoder}'; choose one of {', '.join(ENCODERS)}")
        if cfg.decoder not in DECODERS:
            raise ValueError(f"unknown decoder '{cfg.decoder}'; choose one of {', '.join(DECODERS)}")
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.cfg = cfg
        self.standard = cfg.encoder == 'standard'
        if self.standard:
            concept_only = [k for k in ('bixt', 'recursive_iters', 'concept_losses', 'local_window') if getattr(cfg, k)]
            if concept_only:
                raise ValueError(f"encoder='standard' has no concepts: {', '.join(concept_only)} apply to the concept "
                                  f"arm only; leave them unset or use encoder='concept'")
            if cfg.mask_id < 0:
                raise ValueError("encoder='standard' needs mask_id (from the data directory's meta.json)")
            self.encoder = StandardEncoder(cfg, time_cond=cfg.decoder == 'diffusion' and cfg.time_cond)
        else:
            self.encoder = ConceptEncoder(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.reg_names = parse_concept_losses(cfg.concept_losses)

    def maskable(self, idx, attn_mask=None):
        """(B, N) bool: the ordinary tokens (not special, not padding) that a stage's noise may touch."""
        ok = torch.ones_like(idx, dtype=torch.bool)
        for special in self.cfg.special_ids:  # against Python ints: no host-to-device copy (a CUDA sync)
            ok &= idx != special
        return ok if attn_mask is None else ok & attn_mask

    @staticmethod
    def read_states(states, pos, packing=None):
        """The standard arm's decoding: states (B, N, H) at pos (B, M), packed given a Packing."""
        h = torch.gather(states, 1, pos[..., None].expand(-1, -1, states.shape[-1]))  # (B, M, H)
        return h if packing is None else packing.pack(h)

    def add_concept_losses(self, task_loss, concepts, step, stats):
        """In training with concept_losses: task + Σ_k warm·(concept_loss_weight / K)·L_k, warm =
        min(1, step / concept_loss_warmup) phasing the K regularisers in; stats['task_loss'] keeps
        the task's own loss for the log."""
        if not self.reg_names or not self.training:
            return task_loss
        cfg, K = self.cfg, len(self.reg_names)
        warm = 1.0 if cfg.concept_loss_warmup <= 0 else min(1.0, max(step, 0) / cfg.concept_loss_warmup)
        losses = torch.stack([task_loss.float()] + [CONCEPT_LOSSES[n](concepts).float() for n in self.reg_names])
        one = torch.ones(1, device=losses.device)  # built on the device: a tensor from a list is a host copy
        w = (torch.cat([one, torch.full((K,), warm, device=losses.device)])
             * torch.cat([one, torch.full((K,), cfg.concept_loss_weight / K, device=losses.device)]))  # (1+K,)
        stats['task_loss'] = task_loss.detach()
        return (w * losses).sum()

    def _finish_init(self):
        self.apply(self._init_weights)
        # scaled init of the residual projections (GPT-2): keeps the residual stream's variance
        # independent of depth
        n_res = 2 * max(self.cfg.n_layer, self.cfg.recursive_iters) + (0 if self.standard else 2 * self.cfg.n_dec_layer)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight') or name.endswith('t_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(n_res))

        # Identity value/output paths through every cross-attention: token content crosses the
        # bottleneck in the embedding basis from the first step, where the tied lm_head reads it;
        # from random projections the loss finds the unigram solution first and the concepts
        # collapse to an input-independent state.
        H = self.cfg.n_embd
        eye = torch.eye(H)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, CrossAttention):
                    m.c_kv.weight[H:] = eye
                    m.c_proj.weight.copy_(eye)
                elif isinstance(m, BiXTLayer):
                    m.c_ref_val.weight[H:] = eye
                    m.t_ref_val.weight[H:] = eye
                    m.c_proj.weight.copy_(eye)
                    if m.has_token_update:
                        m.t_proj.weight.copy_(eye)
        if self.cfg.tie_weights:
            self.lm_head.weight = self.encoder.wte.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self):
        """Parameter count (a tied lm_head counted once); none of them grows with the sequence length."""
        return sum(p.numel() for p in self.parameters())

    def logits_and_ce(self, h, labels, label_smoothing=0.0):
        """lm_cross_entropy through this model's head (a method, so that it can be compiled)."""
        return lm_cross_entropy(self.lm_head, h, labels, label_smoothing)

    def compile_for_training(self, device_type):
        """Compile encoder, decoder and logits_and_ce, only the decoded count dynamic. CPU: no pattern
        matcher (it would undo attention()'s kernel choice), eager embedding (its backward is atomic)."""
        options = {'pattern_matcher': False} if device_type == 'cpu' else None
        if device_type == 'cpu':
            self.encoder.embed = torch.compiler.disable(self.encoder.embed)
        self.encoder.compile(options=options)
        logits_and_ce = torch.compile(self.logits_and_ce, options=options)

        def loss(h, labels, label_smoothing=0.0):  # h (M', H), labels (M',)
            _mark_decoded_dim(h, 0)
            _mark_decoded_dim(labels, 0)
            return logits_and_ce(h, labels, label_smoothing)
        self.logits_and_ce = loss
        if self.decoder is None:  # the standard arm: the encoder's states feed the loss directly
            return
        decoder = torch.compile(self.decoder.forward, options=options)

        def decode(concepts, pos, *args):  # args: the decoder's own (query embeddings, t, packing)
            _mark_decoded_dim(pos, 1)
            for a in args:
                if isinstance(a, Packing):
                    _mark_decoded_dim(a.valid, 1)
                    _mark_decoded_dim(a.index, 0)
                elif isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[:2] == pos.shape:
                    _mark_decoded_dim(a, 1)  # (B, M, H) query embeddings
            return decoder(concepts, pos, *args)
        self.decoder.forward = decode  # the module (its parameters, state_dict) stays as it was

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW, weight decay on matrices only; fused on CUDA and the CPU (one pass per tensor)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ('cuda', 'cpu'))

    # --- FLOPs, for MFU. Counted as 2 FLOPs per multiply-accumulate of every matmul; the
    # backward pass costs twice the forward (Kaplan et al. 2020; PaLM appendix B).
    def encoder_flops(self, n_tokens):
        """Forward FLOPs of the encoder for one sequence of n_tokens: linear in n_tokens."""
        cfg, N = self.cfg, n_tokens
        H, C, I = cfg.n_embd, cfg.n_concepts, cfg.ffn_size
        if self.standard:  # QKV and out projections, QKᵀ and AV over N x N, FFN; AdaLN per sequence
            per_layer = N * (4 * H * H + 3 * H * I) + 2 * N * N * H + (6 * H * H if self.encoder.layers[0].time_cond else 0)
            return 2 * per_layer * cfg.n_layer
        concept_core = C * 4 * H * H + 2 * C * C * H + C * 3 * H * I  # self-attention, FFN
        if cfg.bixt:
            macs = C * 2 * H * H + N * 2 * H * H + 2 * C * N * H + C * H * H  # R, V; A; A V_t; out
            token_side = 2 * C * N * H + N * H * H + N * 3 * H * I           # Aᵀ again; Aᵀ V_c; out; FFN
            macs += token_side * (self.encoder.n_iters - 1) / self.encoder.n_iters  # none in the last layer
        else:
            macs = C * 2 * H * H + 2 * C * N * H  # concept Q and out projections; QKᵀ and AV
            macs += N * 2 * H * H * len(self.encoder.layers) / self.encoder.n_iters  # token K/V: once per distinct layer
        return 2 * (macs + concept_core) * self.encoder.n_iters

    def decoder_flops(self, n_decoded):
        """Forward FLOPs of decoding n_decoded positions of one sequence, lm_head included."""
        cfg, M = self.cfg, n_decoded
        H, C, I = cfg.n_embd, cfg.n_concepts, cfg.ffn_size
        if self.standard:  # no decoder: the lm_head reads the token states
            macs = 0
        else:
            per_layer = M * (2 * H * H + 2 * C * H + 3 * H * I) + C * 2 * H * H
            if cfg.decoder == 'diffusion' and cfg.time_cond:
                per_layer += 6 * H * H  # adaLN modulation (per sequence)
            macs = per_layer * cfg.n_dec_layer
            if cfg.decoder == 'diffusion':
                macs += M * 2 * cfg.local_window * H * H  # the local window's map
        return 2 * (macs + M * H * cfg.vocab_size)

    def estimate_flops(self, n_sequences, n_tokens, n_decoded):
        """Training FLOPs (forward + backward) of n_sequences of n_tokens, n_decoded positions decoded in all."""
        return 3 * n_sequences * (self.encoder_flops(n_tokens) + self.decoder_flops(n_decoded / n_sequences))


class ConceptMLM(StageModel):
    """Encoder + MLM decoder + lm_head, for MLM (labels at masked positions) and TSDAE (labels at
    every real token, deleted ones hidden from the encoder)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.decoder == 'diffusion':
            raise ValueError("decoder='diffusion' belongs to ConceptDiffusion (train_diffusion.py)")
        self.decoder = None if self.standard else Decoder(cfg)
        self._finish_init()

    # --- the two stages' noise (diffusion's is ConceptDiffusion.add_noise)
    def mlm_noise(self, idx, generator, mask_prob):
        """BERT masking: mask_prob of the ordinary tokens picked; 80% -> [MASK], 10% -> a random
        ordinary token, 10% kept. Returns (inputs, targets (B, N), IGNORE_INDEX where no loss)."""
        u = torch.rand(idx.shape, generator=generator, device=idx.device)
        picked = (u < mask_prob) & self.maskable(idx)
        action = torch.rand(idx.shape, generator=generator, device=idx.device)
        n_ordinary = min(self.cfg.special_ids)  # the specials sit on top of the vocabulary
        random_ids = torch.randint(n_ordinary, idx.shape, generator=generator, device=idx.device)
        inputs = torch.where(picked & (action < 0.8), self.cfg.mask_id, idx)
        inputs = torch.where(picked & (action >= 0.8) & (action < 0.9), random_ids, inputs)
        return inputs, torch.where(picked, idx, IGNORE_INDEX)

    def tsdae_noise(self, idx, generator, deletion_rate, deletion_mode='hide', attn_mask=None):
        """TSDAE deletion (Wang et al. 2021) of deletion_rate of each row's ordinary tokens, at least
        one kept -> (encoder ids, encoder attn_mask, targets: every real token, IGNORE_INDEX at
        padding). hide: deleted tokens masked out; drop: removed and the rest shifted left."""
        real = torch.ones_like(idx, dtype=torch.bool) if attn_mask is None else attn_mask
        deletable = self.maskable(idx, real)
        u = torch.rand(idx.shape, generator=generator, device=idx.device)
        deleted = (u < deletion_rate) & deletable
        keep_one = torch.where(deletable, u, -1.0).argmax(1, keepdim=True)  # the deletable token least likely deleted
        deleted.scatter_(1, keep_one, False)
        visible = real & ~deleted
        targets = torch.where(real, idx, IGNORE_INDEX)
        if deletion_mode == 'hide':
            return idx, visible, targets
        order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)  # survivors first, in order
        n_left = visible.sum(1, keepdim=True)
        packed_mask = torch.arange(idx.shape[1], device=idx.device)[None, :] < n_left
        return torch.where(packed_mask, torch.gather(idx, 1, order), self.cfg.pad_id), packed_mask, targets

    def decode(self, memory, idx, pos, packing=None):
        """Hidden states (B, M, H) at pos (B, M) of idx, or (M', H) given a Packing; memory: the
        concepts (B, C, H) or the standard arm's token states (B, N, H)."""
        if self.standard:
            return self.read_states(memory, pos, packing)
        tok = self.encoder.wte(torch.gather(idx, 1, pos)) if self.cfg.decoder == 'perceiver' else None
        return self.decoder(memory, pos, tok, None, None, packing)

    def forward(self, idx, targets=None, attn_mask=None, n_iters=None, step=0):
        """idx, targets (B, N), IGNORE_INDEX where no loss; attn_mask (B, N). With targets ->
        (None, loss, stats), decoded only at the labelled positions; without -> (logits (B, N, V),
        None, {})."""
        concepts = self.encoder(idx, attn_mask, n_iters)
        if targets is None:
            B, N = idx.shape
            pos = torch.arange(N, device=idx.device).expand(B, N)
            return self.lm_head(self.decode(concepts, idx, pos)), None, {}
        pos, valid, packing = gather_and_pack(targets != IGNORE_INDEX)
        if pos.shape[1] == 0:  # nothing to predict: a zero that still has a graph
            return None, self.lm_head.weight.sum() * 0.0, {'n_pred': 0, 'n_correct': 0, **({} if self.standard else {'concepts': concepts})}
        h = self.decode(concepts, idx, pos, packing)           # (M, H)
        labels = packing.pack(torch.gather(targets, 1, pos))  # (M,)
        logits, ce = self.logits_and_ce(h, labels)            # (M, V): never (B, N, V); (M,)
        loss = ce.mean()
        stats = {'n_pred': labels.numel(), **({} if self.standard else {'concepts': concepts})}
        if not self.training:  # accuracy, for evaluation
            with torch.no_grad():
                stats['n_correct'] = (logits.argmax(-1) == labels).sum()
        return None, self.add_concept_losses(loss, concepts, step, stats), stats


def _mark_decoded_dim(x, dim):
    """Tell torch.compile that x's size along dim (the number of decoded positions) varies."""
    torch._dynamo.maybe_mark_dynamic(x, dim)


def widest_float(device):
    """float64 where the device has it; MPS has no float64, so float32 there."""
    return torch.float32 if torch.device(device).type == 'mps' else torch.float64


# ----------------------------------------------------------------------------------------------
# masked discrete diffusion (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025) through the concepts

CONDITIONS = ('noisy', 'clean', 'prefix')


class ConceptDiffusion(StageModel):
    """Masked discrete diffusion (MDLM, LLaDA) whose denoiser reads the text through the concepts:
    each ordinary token is masked with probability t and predicted at masked positions only. The
    encoder sees `condition`: noisy, the noisy text, as generate() gives it; clean, the clean text
    (an autoencoder, no likelihood bound); prefix, noisy with a random-length clean prefix, for
    continuation. encoder='standard' is MDLM's denoiser over the noisy text ('clean' refused)."""

    def __init__(self, cfg):
        cfg.decoder = 'diffusion'
        super().__init__(cfg)
        if cfg.condition not in CONDITIONS:
            raise ValueError(f"unknown condition '{cfg.condition}'; choose one of {', '.join(CONDITIONS)}")
        if cfg.mask_id < 0:
            raise ValueError("ConceptDiffusion needs mask_id (from the data directory's meta.json)")
        if self.standard and cfg.condition == 'clean':
            raise ValueError("condition='clean' shows the clean text to the denoiser itself with encoder='standard'; "
                              "use condition='noisy' or 'prefix'")
        if cfg.local_window < 0:
            raise ValueError(f"local_window={cfg.local_window} is out of range: 0 (off) or a positive number of positions")
        self.decoder = None if self.standard else Decoder(cfg)
        self._finish_init()
        for m in self.modules():  # AdaLN-Zero: every modulated layer starts as the identity
            if getattr(m, 'adaLN', None) is not None:
                nn.init.zeros_(m.adaLN.weight)
                nn.init.zeros_(m.adaLN.bias)
        if self.decoder is not None and self.decoder.local is not None:
            nn.init.zeros_(self.decoder.local.weight)  # the window starts closed

    # --- the forward (noising) process
    def sample_t(self, B, generator, device):
        """Per-sample t ~ U(t_min, 1); stratified: one draw in each of B equal strata."""
        u = torch.rand(B, generator=generator, device=device)
        if self.cfg.stratified_t:
            u = (u + torch.arange(B, device=device)) / B
        return self.cfg.t_min + (1.0 - self.cfg.t_min) * u

    def add_noise(self, idx, t, attn_mask=None, generator=None):
        """Mask each maskable token with probability t (B,), at least one per sample; prefix: the
        first L ~ U[0, n_real - 1] stay clean. -> (noisy ids, masked, maskable), each (B, N)."""
        B, N = idx.shape
        maskable = self.maskable(idx, attn_mask)
        if self.cfg.condition == 'prefix':
            n_real = maskable.sum(1, keepdim=True)
            prefix_len = (torch.rand(B, 1, generator=generator, device=idx.device) * n_real).floor()
            maskable = maskable & (maskable.cumsum(1) > prefix_len)
        u = torch.rand(B, N, generator=generator, device=idx.device)
        masked = (u < t[:, None]) & maskable
        # the maskable position with the smallest u is masked anyway: every sample has a target
        first = torch.where(maskable, u, 2.0).argmin(1, keepdim=True)
        masked.scatter_(1, first, maskable.gather(1, first) | masked.gather(1, first))
        return torch.where(masked, self.cfg.mask_id, idx), masked, maskable

    # --- the reverse model
    def encode(self, idx, noisy, t, attn_mask=None):
        """The concepts (B, C, H) of the condition's input, or the standard arm's states (B, N, H)."""
        if self.standard:
            return self.encoder(noisy, attn_mask, t=t)
        return self.encoder(idx if self.cfg.condition == 'clean' else noisy, attn_mask)

    def denoise(self, memory, noisy, pos, t, packing=None):
        """Hidden states (B, M, H) at pos of the noisy ids at level t (B,), or (M', H) given a
        Packing; memory: encode()'s output."""
        if self.standard:
            return self.read_states(memory, pos, packing)
        wte = self.encoder.wte
        neighbour_emb = None
        if self.cfg.local_window:
            ids, inside = self.neighbours(noisy, pos)
            neighbour_emb = wte(ids).masked_fill(~inside[..., None], 0.0)  # (B, M, 2w, H), zero outside
        return self.decoder(memory, pos, wte(torch.gather(noisy, 1, pos)), t, neighbour_emb, packing)

    def neighbours(self, noisy, pos):
        """The noisy ids (B, M, 2w) at pos-w .. pos-1, pos+1 .. pos+w of each position pos (B, M), and
        where they lie inside the window and are not padding (bool, the same shape)."""
        w, N = self.cfg.local_window, noisy.shape[1]
        offsets = torch.cat([torch.arange(-w, 0, device=pos.device), torch.arange(1, w + 1, device=pos.device)])
        at = pos[..., None] + offsets                                              # (B, M, 2w)
        inside = (at >= 0) & (at < N)
        ids = torch.gather(noisy, 1, at.clamp(0, N - 1).flatten(1)).view_as(at)
        if self.cfg.pad_id >= 0:
            inside &= ids != self.cfg.pad_id
        return ids, inside

    def forward(self, idx, attn_mask=None, t=None, generator=None, step=0):
        """Clean ids (B, N) -> (None, loss, stats); loss = Σ_masked CE / t / #maskable (elbo_weight:
        the mean MDLM integrand over t in [t_min, 1], a cross-entropy's scale), else the mean CE."""
        B = idx.shape[0]
        if t is None:
            t = self.sample_t(B, generator, idx.device)
        noisy, masked, maskable = self.add_noise(idx, t, attn_mask, generator)
        concepts = self.encode(idx, noisy, t, attn_mask)
        pos, valid, packing = gather_and_pack(masked)
        h = self.denoise(concepts, noisy, pos, t, packing)                        # (M, H)
        labels = packing.pack(torch.gather(idx, 1, pos))
        logits, ce = self.logits_and_ce(h, labels, self.cfg.label_smoothing)      # (M, V), (M,)
        row = packing.rows()  # the batch row of each target
        if self.cfg.elbo_weight:
            loss = (ce / t[row]).sum() / maskable.sum().clamp(min=1)
        else:
            loss = ce.mean()
        stats = {'n_pred': labels.numel(), **({} if self.standard else {'concepts': concepts})}
        if not self.training:  # evaluation metrics: the plain cross-entropy and the accuracy
            with torch.no_grad():
                stats['ce'] = F.cross_entropy(logits.float(), labels)
                stats['n_correct'] = (logits.argmax(-1) == labels).sum()
        return None, self.add_concept_losses(loss, concepts, step, stats), stats

    @torch.no_grad()
    def nll_bound(self, idx, attn_mask=None, n_grid=8, generator=None, swap_concepts=False):
        """MDLM's NLL bound, midpoint rule on n_grid levels of t -> (sum over sequences, tokens it
        covers: for prefix, those after the prefix, averaged over levels). Not for 'clean'.
        swap_concepts: each sequence is decoded from the batch's previous one's concepts (a control: how many
        nats the concepts carry beyond what the decoder reads from the noisy tokens themselves)."""
        B = idx.shape[0]
        wide = widest_float(idx.device)
        total = torch.zeros((), device=idx.device, dtype=wide)
        n_scored = 0.0
        for k in range(n_grid):
            t = torch.full((B,), (k + 0.5) / n_grid, device=idx.device)
            noisy, masked, maskable = self.add_noise(idx, t, attn_mask, generator)
            concepts = self.encode(idx, noisy, t, attn_mask)
            if swap_concepts:
                concepts = concepts.roll(1, dims=0)
            pos, valid, packing = gather_and_pack(masked)
            logits = self.lm_head(self.denoise(concepts, noisy, pos, t, packing))
            nll = F.cross_entropy(logits.float(), packing.pack(torch.gather(idx, 1, pos)), reduction='sum')
            total += nll.to(wide) / t[0].to(wide) / n_grid
            n_scored += maskable.sum().item() / n_grid
        return total.item(), n_scored

    # --- sampling
    @torch.no_grad()
    def generate(self, idx, steps=32, temperature=1.0, top_k=0, block_len=0, remasking='random', attn_mask=None,
                 generator=None, trajectory=None):
        """Fill every [MASK] of idx (B, N) in `steps` steps. Each step re-encodes the sequence (the concept
        encoder's token keys/values only where the last step committed) and commits
        remaining / steps-left of the masked positions of the current block. remasking='random' picks
        them uniformly (MDLM's ancestral sampler): logits are computed there only, so a step costs the
        encoder and the committed positions, linear in N; 'confidence' (LLaDA) samples every candidate
        and keeps those whose token is most probable, at the cost of their logits. Tokens are drawn in
        float32 (sample_tokens). block_len > 0: blocks of masked positions, left to right. Padding is
        never filled nor seen; `trajectory` (a list) gets the sequence after every step."""
        if remasking not in REMASKING:
            raise ValueError(f"remasking={remasking!r}: choose one of {', '.join(REMASKING)}")
        was_training = self.training
        self.eval()
        x = idx.clone()
        B, N = x.shape
        attn_mask = torch.ones_like(x, dtype=torch.bool) if attn_mask is None else attn_mask
        to_fill = (x == self.cfg.mask_id) & attn_mask
        n_real = attn_mask.sum(1).clamp(min=1)
        n_blocks = max(1, math.ceil(int(to_fill.sum(1).max()) / block_len)) if block_len > 0 else 1
        block_of = torch.where(to_fill, (to_fill.cumsum(1) - 1) // block_len if block_len > 0 else 0, -1)
        steps_per_block = [max(1, steps // n_blocks + (b < steps % n_blocks)) for b in range(n_blocks)]  # >= 1 each
        token_kv = None  # the concept encoder's static tokens: their keys/values, updated where committed
        rows = cols = None
        for block, block_steps in enumerate(steps_per_block):
            for s in range(block_steps):
                masked = x == self.cfg.mask_id
                eligible = masked & (block_of == block)
                if not eligible.any():
                    break
                t = masked.sum(1) / n_real  # the model's noise level: the masked fraction
                if self.standard or self.cfg.bixt:
                    memory = self.encode(x, x, t, attn_mask)
                else:
                    token_kv = self.encoder.token_kv(x, token_kv, (rows, cols))
                    memory = self.encoder(x, attn_mask, token_kv=token_kv)
                quota = -(-eligible.sum(1) // (block_steps - s))  # (B,) ceil(eligible / steps left)
                candidates = eligible
                if remasking == 'random':
                    candidates = top_per_row(torch.rand(B, N, generator=generator, device=x.device), eligible, quota)
                pos, valid, packing = gather_and_pack(candidates)
                logits = self.lm_head(self.denoise(memory, x, pos, t, packing)).float()  # (M', V): only candidates
                tokens, confidence = sample_tokens(logits, temperature, top_k, self.cfg.special_ids, generator)
                rows, cols = packing.rows(), pos[valid]
                if remasking == 'confidence':
                    score = torch.full((B, N), -math.inf, device=x.device).index_put_((rows, cols), confidence)
                    keep = top_per_row(score, eligible, quota)[rows, cols]
                    rows, cols, tokens = rows[keep], cols[keep], tokens[keep]
                x[rows, cols] = tokens
                if trajectory is not None:
                    trajectory.append(x.clone())
        self.train(was_training)
        return x


REMASKING = ('random', 'confidence')


def top_per_row(score, allowed, quota):
    """(B, N) bool: in each row b the quota[b] highest-scoring allowed positions."""
    order = score.masked_fill(~allowed, -math.inf).argsort(dim=1, descending=True)
    ranks = torch.arange(score.shape[1], device=score.device)[None, :] < quota[:, None]
    return torch.zeros_like(allowed).scatter(1, order, ranks) & allowed


def sample_tokens(logits, temperature, top_k, never, generator=None):
    """logits (M, V) float32 -> tokens (M,) drawn from softmax(logits / temperature) (the argmax at 0)
    after top_k filtering, never an id of `never`; and each token's probability at temperature 1."""
    logits[:, never] = -math.inf
    if top_k > 0:
        logits = logits.masked_fill(logits < torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:],
                                    -math.inf)
    probs = F.softmax(logits, dim=-1)
    if temperature > 0:
        tokens = inverse_cdf_draw(probs if temperature == 1 else F.softmax(logits / temperature, dim=-1), generator)
    else:
        tokens = logits.argmax(-1)
    return tokens, probs.gather(1, tokens[:, None]).squeeze(1)


def inverse_cdf_draw(probs, generator=None, block=128):
    """One id per row of probs (M, V), by one uniform against running sums in two levels: the
    float64 running sum of the masses of blocks of `block` ids, then within the chosen block the float64
    running sum of its probabilities. Each block's mass is a float32 sum of its own ids, so a rare id
    keeps its chance to float32's relative precision wherever it lies (a float32 running sum over V
    would round the tail away; float32 Gumbel noise cuts it; docs/LOG.md checks the draws against the
    exact distribution), and no (M, V) float64 tensor is made: the draw reads the probabilities once."""
    M, V = probs.shape
    wide = widest_float(probs.device)  # float64, but float32 on MPS, which has none
    blocks = (F.pad(probs, (0, -V % block)) if V % block else probs).view(M, -1, block)  # (M, V / block, block)
    cdf = blocks.sum(-1).to(wide).cumsum(-1)                   # (M, V / block)
    u = torch.rand(M, 1, generator=generator, device=probs.device, dtype=wide) * cdf[:, -1:]
    # right=True: a block or id of probability 0 never wins; u rounded up to a total takes the last that can
    b = torch.minimum(torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, cdf[:, -1:].contiguous()))  # (M, 1)
    u = u - torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, b[..., None].expand(M, 1, block))[:, 0].to(wide).cumsum(-1)  # (M, block)
    i = torch.minimum(torch.searchsorted(inner, u, right=True), torch.searchsorted(inner, inner[:, -1:].contiguous()))
    return (b * block + i).squeeze(1)


# ----------------------------------------------------------------------------------------------
# concept geometry: regularisers against concept collapse, and diagnostics. Each regulariser maps
# concepts (B, C, H) to a float32 scalar computed within each sample across its C concepts:
# statistics pooled over the batch cannot see concepts that are identical within a sample.

SOFT_ORTHOGONALITY_THRESHOLD = 0.1  # |cos| tolerated by soft_orthogonality
UNIFORMITY_TEMPERATURE = 2.0        # T of uniformity's Gaussian potential


def concept_cosines(concepts):
    """(B, C, H) -> (B, C, C) cosine similarities within each sample, float32 (autocast off)."""
    with torch.autocast(concepts.device.type, enabled=False):
        u = F.normalize(concepts.float(), dim=-1)
        return u @ u.transpose(1, 2)


def mean_off_diagonal(m):
    """Mean of the off-diagonal entries of (B, C, C) over the pairs and the batch."""
    B, C, _ = m.shape
    return (m * (1.0 - torch.eye(C, device=m.device, dtype=m.dtype))).sum() / (B * max(C * (C - 1), 1))


def variance_loss(concepts):
    """VICReg variance hinge (Bardes et al. 2022) over each sample's C concepts: mean_d relu(1 − sqrt(Var_d + 1e-4))."""
    x = concepts.float()                                                      # (B, C, H)
    return F.relu(1.0 - torch.sqrt(x.var(dim=1, correction=min(1, x.shape[1] - 1)) + 1e-4)).mean()


def covariance_loss(concepts):
    """VICReg covariance Σ_{d≠e} Cov_de² / H. Within a sample Cov has rank <= C−1, so for C <= H it
    cannot vanish at unit variance: it trades off against variance_loss. For C < H through
    ‖XcᵀXc‖_F = ‖XcXcᵀ‖_F, in (C, C) memory instead of (H, H)."""
    x = concepts.float()
    B, n, H = x.shape
    xc = x - x.mean(dim=1, keepdim=True)
    with torch.autocast(x.device.type, enabled=False):
        if n < H:
            off2 = ((xc @ xc.transpose(1, 2)).pow(2).sum((1, 2)) - xc.pow(2).sum(1).pow(2).sum(1)).clamp_min(0.0)
        else:
            off2 = ((xc.transpose(1, 2) @ xc).pow(2) * (1.0 - torch.eye(H, device=x.device))).sum((1, 2))
    return (off2 / max(n - 1, 1) ** 2 / H).mean()


def t_regs_mst_loss(concepts):
    """Minus the mean chordal distance from each unit concept to its nearest neighbour in the sample
    (a cheap proxy for the minimum spanning tree's length); 0 when the concepts coincide."""
    S = concept_cosines(concepts)                                   # (B, C, C)
    C = S.shape[-1]
    if C < 2:
        return S.sum() * 0.0
    d = torch.sqrt((2.0 - 2.0 * S).clamp_min(1e-8))                 # (B, C, C) ‖û_i − û_j‖
    return -d.masked_fill(torch.eye(C, dtype=torch.bool, device=S.device), float('inf')).min(dim=-1).values.mean()


# name (as written in the concept_losses setting) -> loss(concepts) -> scalar
CONCEPT_LOSSES = {
    'orthogonality': lambda c: mean_off_diagonal(concept_cosines(c).pow(2)),  # 0 iff pairwise orthogonal
    'soft_orthogonality': lambda c: mean_off_diagonal(  # tolerates |cos| <= the threshold, room for C > H
        F.relu(concept_cosines(c).abs() - SOFT_ORTHOGONALITY_THRESHOLD).pow(2)),
    # mean Gaussian potential between unit concepts (Wang & Isola 2020, without the log): 1 when they coincide
    'uniformity': lambda c: mean_off_diagonal(torch.exp(-UNIFORMITY_TEMPERATURE * (2.0 - 2.0 * concept_cosines(c)))),
    'variance': variance_loss,
    'covariance': covariance_loss,
    'vicreg': lambda c: variance_loss(c) + covariance_loss(c),
    'combined': lambda c: variance_loss(c) + CONCEPT_LOSSES['uniformity'](c),
    't_regs_mst': t_regs_mst_loss,
}


def parse_concept_losses(spec):
    """'vicreg,t_regs_mst' -> ['vicreg', 't_regs_mst']; '' or 'none' -> []; ValueError otherwise."""
    names = [] if spec.strip().lower() in ('', 'none') else [s.strip() for s in spec.split(',') if s.strip()]
    unknown = [n for n in names if n not in CONCEPT_LOSSES]
    if unknown or len(set(names)) != len(names):
        problem = f"unknown concept loss '{unknown[0]}'" if unknown else "a loss listed twice"
        raise ValueError(f"{problem} in concept_losses='{spec}'; choose a comma-separated subset of: "
                         f"{', '.join(CONCEPT_LOSSES)} (or 'none')")
    return names


@torch.no_grad()
def concept_diagnostics(concepts):
    """Collapse diagnostics of concepts (B, C, H), floats averaged over the batch: erank, the entropy
    effective rank exp(−Σ p log p), p = σ/Σσ, of each sample's C×H matrix (Roy & Vetterli 2007);
    erank_batchmean, Σσ/σ_max of the batch-mean matrix; concept_cos_mean/max over a sample's distinct
    pairs; participation_ratio (Σσ²)²/Σσ⁴. 1 for parallel concepts, C for orthogonal ones of equal
    norm; nan for non-finite concepts."""
    keys = ('erank', 'erank_batchmean', 'concept_cos_mean', 'concept_cos_max', 'participation_ratio')
    with torch.autocast(concepts.device.type, enabled=False):
        c = concepts.detach().float()
        B, C, H = c.shape
        if not bool(torch.isfinite(c).all()):
            return dict.fromkeys(keys, float('nan'))
        sv = torch.linalg.svdvals(c)                                    # (B, min(C, H))
        p = sv / sv.sum(-1, keepdim=True).clamp_min(1e-30)
        erank = torch.exp(-(torch.special.xlogy(p, p)).sum(-1))         # (B,)
        sv_mean = torch.linalg.svdvals(c.mean(0))                      # (min(C, H),)
        lam = sv.pow(2)                                                 # ∝ eigenvalues of cᵀc/C
        pr = lam.sum(-1).pow(2) / lam.pow(2).sum(-1).clamp_min(1e-30)  # (B,)
        S = concept_cosines(c)                                          # (B, C, C)
        eye = torch.eye(C, dtype=torch.bool, device=c.device)
        cos_max = S.masked_fill(eye, float('-inf')).amax(dim=(1, 2)) if C > 1 else S.new_zeros(B)
        values = torch.stack([erank.mean(), sv_mean.sum() / sv_mean.max().clamp_min(1e-30), mean_off_diagonal(S),
                              cos_max.mean(), pr.mean()]).tolist()
    return dict(zip(keys, values))
