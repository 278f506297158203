"""
The Concept Encoder: every module and every loss of the project, in one file.

A text of N tokens is read by C learned *concept* vectors through cross-attention, so a layer costs
O(C·N) instead of the O(N²) of a standard encoder: tokens never attend to each other. Decoders then
read the C concepts back out at the positions where a loss needs them.

    ConceptEncoder      tokens [B, N] -> concepts [B, C, H]  (standard, BiXT or recursive layers)
    MLMDecoder          concepts -> hidden states at chosen positions (weighted | perceiver | posonly)
    DiffusionDecoder    concepts + noisy tokens + t -> hidden states (cross-attention + AdaLN-Zero)
    ConceptMLM          encoder + MLMDecoder + lm_head: the MLM and TSDAE objectives
    ConceptDiffusion    encoder + DiffusionDecoder + lm_head: masked discrete diffusion, generate()

Shapes: B batch, N tokens, C concepts, H n_embd, nh heads, hs head size, M decoded positions,
V vocabulary. No tensor of shape [N, N] exists anywhere in this file.
"""
import math
from dataclasses import dataclass, asdict
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

IGNORE_INDEX = -100  # label value of positions that carry no loss (as in PyTorch's cross_entropy)


class ConfigError(ValueError):
    """A model setting that cannot work; the message says which values are allowed."""


@dataclass
class ConceptConfig:
    encoder: str = 'concept'    # 'concept' (tokens -> C concepts) | 'standard' (the O(N²) peer, StandardEncoder)
    vocab_size: int = 8192      # the data directory's vocab_size (every id < vocab_size)
    block_size: int = 512       # the longest sequence; sizes the learned position tables
    n_layer: int = 2            # encoder layers (or, with recursive_iters, the default iteration count)
    n_head: int = 8
    n_embd: int = 512           # H: token, concept and attention width
    n_concepts: int = 128       # C
    ffn_size: int = 1024        # inner width of the gated FFN (GeGLU): H -> 2*ffn_size -> H
    dropout: float = 0.0
    bias: bool = False          # biases in Linear layers (LayerNorms always have one)
    bixt: bool = False          # bidirectional cross-attention (Hiller et al. 2024): tokens are updated too
    recursive_iters: int = 0    # >0: one shared encoder layer applied this many times
    shared_token_kv: bool = False  # one token K/V projection for all layers (not with bixt; see ConceptEncoder)
    decoder: str = 'perceiver'  # MLM/TSDAE decoder: 'weighted' | 'perceiver' | 'posonly'; 'diffusion'
    n_dec_layer: int = 1        # decoder layers (ignored by 'weighted', which has none)
    tie_weights: bool = True    # lm_head shares the token embedding matrix
    # diffusion only (ConceptDiffusion)
    time_cond: bool = True      # AdaLN-Zero conditioning on t (MDLM and LLaDA work without it)
    condition: str = 'noisy'    # what the encoder sees: 'noisy' | 'clean' | 'prefix' (see ConceptDiffusion)
    t_min: float = 0.3          # training draws t ~ U(t_min, 1)
    stratified_t: bool = True   # one t per stratum [i/B, (i+1)/B) of the batch (MDLM's antithetic sampler)
    label_smoothing: float = 0.1
    elbo_weight: bool = True    # weight each masked token's loss by 1/t (the MDLM bound)
    # concept geometry regularisers, in every stage (see ConceptLossWeighting)
    concept_losses: str = ''          # e.g. 'vicreg,t_regs_mst'; '' = none
    concept_loss_weight: float = 0.02  # fixed: total regulariser weight, split evenly among them
    concept_loss_warmup: int = 0      # iterations of linear warmup of the regularisers
    loss_weighting: str = 'fixed'     # 'fixed' | 'learnable' | 'kendall_gal'
    concept_loss_pooled: bool = False  # the original's batch-pooled VICReg statistics
    # special token ids, copied from the data directory's meta.json
    pad_id: int = -1
    mask_id: int = -1
    eod_id: int = -1
    cls_id: int = -1
    sep_id: int = -1

    @property
    def special_ids(self):
        return [i for i in (self.pad_id, self.mask_id, self.eod_id, self.cls_id, self.sep_id) if i >= 0]


DECODERS = ('weighted', 'perceiver', 'posonly', 'diffusion')
ENCODERS = ('concept', 'standard')


# ----------------------------------------------------------------------------------------------
# building blocks

SHORT_SIDE = 1024  # CPU training: attentions with at most this many queries or keys use the math kernel
# the process's setting of the math-SDPA precision flag, which attention() restores after its CPU calls
_MATH_SDP_REDUCTION_DEFAULT = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()


def attention(q, k, v, key_mask=None, dropout_p=0.0):
    """SDPA over (B, nh, T, hs) queries and (B, nh, S, hs) keys/values; key_mask (B, S) bool,
    True = may be attended. Every attention in this project goes through here.

    On the CPU, with gradients, attentions with a short side (the concepts reading the tokens,
    C x N; C x C; decoded positions reading the concepts) go to SDPA's math kernel, kept in bf16
    under autocast: bf16 matmuls and a softmax (fused by inductor when compiled), which beat the
    flash kernel, whose CPU backward is slow for so few queries. Measured on this project's
    2-core CPU, h512l2 MLM step in bf16: compiled, N = 2048, 485 vs 590 ms; eager, N = 512 / 2048,
    760 vs 810 and 585 vs 615 ms; float32 eager on config/tiny.py: a tie. The (T, S) scores it
    materialises grow linearly with the long side. Inductor's attention pattern matcher would turn
    it back into the flash kernel, so ConceptLM.compile_for_training turns that pass off on the
    CPU. Inference keeps the flash kernel (faster there: encoding at N = 512, 205 vs 225 ms), as
    do long-by-long attentions (the standard encoder's N x N beyond N = 1024). CUDA keeps SDPA's
    own choice."""
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
    if q.device.type == 'cpu' and q.requires_grad and min(q.shape[-2], k.shape[-2]) <= SHORT_SIDE:
        # The math kernel would upcast bf16 inputs to float32 (half-speed matmuls); kept in bf16,
        # its matmuls accumulate in float32 like every other bf16 matmul of the model. The flag is
        # process-wide, so it is set for this call only: CUDA's and MPS's math fallbacks keep the
        # default. (torch.compile traces the set and the restore, and compiles this call with it.)
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        finally:
            torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(_MATH_SDP_REDUCTION_DEFAULT)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class CrossAttention(nn.Module):
    """Queries from one stream attend to keys/values of another, through SDPA. The key/value
    projection is a separate method so that a caller can project a static context once and
    reuse it (the recursive encoder projects the tokens once for all K iterations)."""

    def __init__(self, cfg, project_context=True):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        if project_context:  # else the caller passes keys/values projected elsewhere (shared_token_kv)
            self.c_kv = nn.Linear(cfg.n_embd, 2 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def project_kv(self, context):
        B, N, H = context.shape
        k, v = self.c_kv(context).view(B, N, 2, self.n_head, H // self.n_head).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)  # 2 x (B, nh, N, hs)

    def forward(self, x, kv, key_mask=None, packing=None):
        """x: (B, T, H) queries; kv: from project_kv; key_mask: (B, N) bool, True = may be attended.
        With a Packing of the (B, T) layout, x is packed instead: (M', H), the rows of its valid
        slots; only the attention itself sees the padded (B, T) layout, the projections see M' rows."""
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
    """Pre-LN layer on the concepts: read the tokens, talk among concepts, think (FFN).
    The tokens are the static embeddings and are not updated (origin_spec §1.3)."""

    def __init__(self, cfg, project_tokens=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.cross_attn = CrossAttention(cfg, project_context=project_tokens)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.self_attn = SelfAttention(cfg)
        self.ln_3 = nn.LayerNorm(cfg.n_embd)
        self.mlp = GatedMLP(cfg)

    def forward(self, c, token_kv, key_mask):
        c = c + self.cross_attn(self.ln_1(c), token_kv, key_mask)  # (B, C, H), cost O(C·N)
        c = c + self.self_attn(self.ln_2(c))                       # O(C²)
        return c + self.mlp(self.ln_3(c))


class BiXTLayer(nn.Module):
    """Bidirectional cross-attention (BiXT, Hiller et al. NeurIPS 2024, arXiv 2402.12138).

    Concepts and tokens are each projected to a shared "reference" R and a value V. The one
    similarity matrix A = R_c R_tᵀ / sqrt(hs) serves both directions: softmax over tokens updates
    the concepts, softmax of Aᵀ over concepts updates the tokens. Both products run through SDPA
    (so A is never materialised; it is the same matrix read row-wise and column-wise). Padding
    tokens are masked as keys before the token-axis softmax; their rows of the concept-axis
    softmax are computed but their update is zeroed, so a padding token never changes and never
    influences a concept. Tokens get their own FFN and never attend to each other.

    The original project's "BiXT" (origin_spec §1.4) differs: it ran two independent attentions
    in sequence (concepts <- tokens, then tokens <- the already updated concepts) with separate
    Q/K/V weights, no padding mask on the reverse direction and no token FFN.
    """

    def __init__(self, cfg, token_update=True):
        super().__init__()
        H = cfg.n_embd
        self.n_head = cfg.n_head
        self.token_update = token_update
        self.ln_c = nn.LayerNorm(H)
        self.ln_t = nn.LayerNorm(H)
        self.c_ref_val = nn.Linear(H, 2 * H, bias=cfg.bias)   # concepts -> R_c, V_c
        self.t_ref_val = nn.Linear(H, 2 * H, bias=cfg.bias)   # tokens   -> R_t, V_t
        self.c_proj = nn.Linear(H, H, bias=cfg.bias)
        if token_update:  # the last layer's token update would never be read: it has none (as in BiXT)
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
        update_tokens = update_tokens and self.token_update
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
# the encoder

class Encoder(nn.Module):
    """What both arms share: token and learned position embeddings, dropout on their sum."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def embed(self, idx):
        B, N = idx.shape
        if N > self.cfg.block_size:
            raise ValueError(f"sequence of {N} tokens exceeds block_size={self.cfg.block_size}")
        pos = torch.arange(N, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, N, H)


class ConceptEncoder(Encoder):
    """tokens (B, N) -> concepts (B, C, H). Cost and memory are linear in N."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ln_tok = nn.LayerNorm(cfg.n_embd)  # one norm on the token stream, shared by all layers
        self.concepts = nn.Parameter(torch.randn(cfg.n_concepts, cfg.n_embd) * 0.02)
        n_distinct = 1 if cfg.recursive_iters > 0 else cfg.n_layer
        if cfg.bixt:  # a layer updates tokens only if a layer runs after it: never the last one, nor a
            # recursive layer applied once (its token update would be parameters DDP never sees used)
            self.layers = nn.ModuleList([BiXTLayer(cfg, token_update=(i < n_distinct - 1 or cfg.recursive_iters > 1))
                                         for i in range(n_distinct)])
        else:  # with shared_token_kv only the first layer owns a token K/V projection
            self.layers = nn.ModuleList([ConceptLayer(cfg, project_tokens=(i == 0 or not cfg.shared_token_kv))
                                         for i in range(n_distinct)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    @property
    def n_iters(self):
        return self.cfg.recursive_iters if self.cfg.recursive_iters > 0 else self.cfg.n_layer

    def forward(self, idx, attn_mask=None, n_iters=None):
        """idx: (B, N) token ids; attn_mask: (B, N) bool, True where the encoder may look (False
        for padding and for TSDAE-deleted tokens); n_iters overrides recursive_iters at inference."""
        B, N = idx.shape
        x = self.ln_tok(self.embed(idx))
        c = self.concepts.expand(B, -1, -1)  # (B, C, H)
        if self.cfg.recursive_iters > 0:
            layer_seq = [self.layers[0]] * (n_iters or self.cfg.recursive_iters)
        else:
            layer_seq = self.layers
        if self.cfg.bixt:
            for i, layer in enumerate(layer_seq):
                c, x = layer(c, x, attn_mask, update_tokens=(i < len(layer_seq) - 1))
        else:
            # The tokens are static here, so a recursive encoder (one layer) and shared_token_kv
            # project them to keys/values once, saving 2·H²·N MACs per further layer: the bulk
            # of a layer's cost at N >> C. Otherwise every layer reads them through its own K/V.
            once = self.cfg.recursive_iters > 0 or self.cfg.shared_token_kv
            token_kv = None
            for layer in layer_seq:
                if token_kv is None or not once:
                    token_kv = layer.cross_attn.project_kv(x)
                c = layer(c, token_kv, attn_mask)
        return self.ln_f(c)


def adaln_modulation(adaLN, cond, packing=None):
    """AdaLN-Zero (DiT): the timestep embedding cond (B, H) -> shift, scale and gate of two
    sub-blocks, six tensors broadcast over each sample's rows: (B, 1, H), or (M', H) for the
    packed rows of a Packing."""
    m = adaLN(F.silu(cond))  # (B, 6H)
    m = m[:, None, :] if packing is None else m[packing.sample()]
    return m.chunk(6, dim=-1)


class TokenLayer(nn.Module):
    """Pre-LN transformer layer over the tokens, the standard arm's: every token attends to every
    real token, O(N²), then the FFN. With time_cond (the standard diffusion denoiser, MDLM's
    design) both sub-blocks are modulated by AdaLN-Zero, as in DiffusionLayer."""

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
    """tokens (B, N) -> token states (B, N, H): the standard bidirectional transformer encoder,
    the peer the concept arm is measured against (encoder='standard'). Same embeddings, FFN,
    norms and widths as the concept arm; its attention is O(N²) in compute (SDPA's fused kernels
    keep its memory linear). What attn_mask hides (padding, TSDAE-deleted tokens) is masked as a
    key and replaced by [MASK] at its own position, so no position sees a hidden token. As the
    diffusion denoiser (time_cond) it reads the noise level t; without one it encodes clean text
    (t = 0), which is what encode() and the evaluation heads ask of it."""

    def __init__(self, cfg, time_cond=False):
        super().__init__(cfg)
        self.time_emb = TimestepEmbedding(cfg) if time_cond else None
        self.layers = nn.ModuleList([TokenLayer(cfg, time_cond) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, idx, attn_mask=None, n_iters=None, t=None):
        """idx (B, N); attn_mask (B, N) bool, True where the encoder may look; t (B,) the noise
        level, for the diffusion denoiser. n_iters is the concept arm's (recursion)."""
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

def gather_states(states, pos):
    """states (B, N, H) at positions pos (B, M) -> (B, M, H)"""
    return torch.gather(states, 1, pos[..., None].expand(-1, -1, states.shape[-1]))


def gather_positions(select):
    """select: (B, N) bool -> pos (B, Mmax) long, valid (B, Mmax) bool.

    The selected positions of each row come first, in order; rows with fewer than Mmax selected
    positions are padded with unselected positions that `valid` marks False. This ragged-to-
    padded layout lets every decoded position attend to its own sample's concepts in one SDPA
    call, and it is exact because decoder positions never attend to each other."""
    pos, valid, _ = gather_and_pack(select)
    return pos, valid


def gather_and_pack(select):
    """gather_positions and the Packing of its valid slots, -> (pos, valid, packing), with one
    host synchronisation: the largest and the total count of selected positions, read together
    (the two shapes that depend on the data)."""
    counts = select.sum(1)                                       # (B,)
    if select.numel() == 0:
        m_max = m_total = 0
    else:
        m_max, m_total = torch.stack([counts.max(), counts.sum()]).tolist()  # the one sync
    order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :m_max]
    valid = torch.arange(m_max, device=select.device)[None, :] < counts[:, None]
    return order, valid, Packing.of(valid, counts, m_total)


class Packing(NamedTuple):
    """The valid slots of gather_positions' padded (B, T) layout as the rows of a packed (M', ...)
    tensor: pack(x) equals x[valid]. The decoders run on packed rows; their attention alone needs
    the padded layout. The index is built once per batch, outside the compiled decoder: indexing
    with it, rather than with the boolean mask (whose backward has a data-dependent shape), keeps
    the compiled decoder one graph (a mask there cost two failed compile attempts per process)."""
    valid: torch.Tensor  # (B, T) bool
    index: torch.Tensor  # (M',) long: b·T + t of each valid slot, in order

    @classmethod
    def of(cls, valid, counts=None, n_valid=None):
        """valid (B, T) bool whose True slots come first in each row (gather_positions' layout).
        Given its row counts (B,) and their total n_valid (an int), the index is built without a
        host synchronisation; otherwise with one (nonzero)."""
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

    def sample(self):
        """(M',) the sample (row of the batch) of each packed row"""
        return self.index // self.valid.shape[1]


class DecoderLayer(nn.Module):
    """Perceiver-IO decoder layer: each query reads the concepts, then an FFN. No query-query
    attention, so the output at one position does not depend on which others are decoded."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.cross_attn = CrossAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = GatedMLP(cfg)

    def forward(self, q, concepts, packing=None):
        """q (B, M, H), or packed (M', H) with a Packing: see CrossAttention."""
        q = q + self.cross_attn(self.ln_1(q), self.cross_attn.project_kv(concepts), packing=packing)
        return q + self.mlp(self.ln_2(q))


class MLMDecoder(nn.Module):
    """Reads concepts back out at positions pos (B, M) of the input.

    weighted:  h = softmax(W[pos]) @ concepts, a per-position mixture whose weights depend only on
               the position, as in the original weighted_mlm (origin_spec §2.1); then LN-Linear (the
               original's GELU after the Linear is dropped, see ConceptLM._finish_init).
    perceiver: queries = token embedding of the (corrupted) input + decoder position embedding.
    posonly:   queries = decoder position embedding only, so every bit of content must come
               through the concepts (TSDAE's decoder; Perceiver IO's MLM decoder)."""

    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.decoder
        if self.kind == 'weighted':
            self.mix = nn.Parameter(torch.randn(cfg.block_size, cfg.n_concepts) / math.sqrt(cfg.n_concepts))
            self.ln = nn.LayerNorm(cfg.n_embd)
            self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=True)
        else:
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
            self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.n_dec_layer)])
            self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, concepts, pos, query_tok_emb=None, packing=None):
        """concepts (B, C, H); pos (B, M) positions; query_tok_emb (B, M, H) for 'perceiver'.
        Returns (B, M, H); with a Packing of gather_positions' valid (B, M) only the valid slots
        are decoded, packed: (M', H). Padding slots then cost nothing beyond the attention itself
        (diffusion's per-sample masking rate leaves a third of a padded batch empty)."""
        if self.kind == 'weighted':
            h = torch.bmm(F.softmax(self.mix[pos].float(), dim=-1).to(concepts.dtype), concepts)
            h = h if packing is None else packing.pack(h)
            return self.proj(self.ln(h))  # no GELU: it would cut the identity-initialised path in half
        q = self.wpe(pos)
        if self.kind == 'perceiver':
            q = q + query_tok_emb
        if packing is not None:
            q = packing.pack(q)  # (M', H)
        for layer in self.layers:
            q = layer(q, concepts, packing)
        return self.ln_f(q)  # (B, M, H) or (M', H)


# ----------------------------------------------------------------------------------------------
# concept geometry: regularisers against concept collapse, their weighting, and diagnostics
#
# The original project's L6 MLM encoder collapsed to an effective rank of 5 of its 128 concepts
# (origin_spec §10.3, §11.1). Its regularisers (origin_spec §3) pooled VICReg's statistics over
# batch and concepts together, which cannot see concepts that are identical *within* a sample;
# its Kendall–Gal weighting then let the nearly-zero regularisers inflate their own weight until
# the total loss was negative and the MLM loss was muted (§10.3, §11.2). Here every regulariser
# works within each sample, across its C concepts (the original's pooled form is an option), and
# the Kendall–Gal weights are bounded so that no regulariser can outweigh the task.
#
# Shapes: B batch, C concepts, H width. Every regulariser maps concepts (B, C, H) to a scalar
# loss computed in float32, whatever the input dtype or autocast.


def _no_autocast(x):
    """A context in which matmuls on x's device run in the dtype of their inputs."""
    return torch.autocast(x.device.type, enabled=False)


def _concept_cosines(concepts):
    """Cosine similarity between the concepts of each sample: (B, C, H) -> (B, C, C), float32."""
    with _no_autocast(concepts):
        u = F.normalize(concepts.float(), dim=-1)
        return u @ u.transpose(1, 2)


def _mean_off_diagonal(m):
    """Mean of the off-diagonal entries of (B, C, C) over the pairs and the batch."""
    B, C, _ = m.shape
    off = 1.0 - torch.eye(C, device=m.device, dtype=m.dtype)
    return (m * off).sum() / (B * max(C * (C - 1), 1))


def _vicreg_rows(concepts, pooled):
    """The sets of vectors whose statistics VICReg takes: (B, C, H) -> (G, n, H).
    Within-sample: G = B sets of the n = C concepts of one sample. Pooled (the original's):
    one set of n = B·C vectors, which a batch of diverse samples satisfies even when every
    sample's concepts are identical."""
    x = concepts.float()
    return x.reshape(1, -1, x.shape[-1]) if pooled else x


def _off_diagonal_cov_sq(x):
    """Σ_{d≠e} Cov_de² per set, with Cov the (H, H) covariance of the n rows: (G, n, H) -> (G,).
    For n < H it uses ‖XcᵀXc‖_F = ‖XcXcᵀ‖_F, which costs (n, n) instead of (H, H) memory
    (within-sample, C = 128 concepts of width 512)."""
    G, n, H = x.shape
    xc = x - x.mean(dim=1, keepdim=True)
    with _no_autocast(x):
        if n < H:
            fro2 = (xc @ xc.transpose(1, 2)).pow(2).sum((1, 2))          # (G,) = ‖XcᵀXc‖_F²
            diag2 = xc.pow(2).sum(1).pow(2).sum(1)                        # (G,) = Σ_d (XcᵀXc)_dd²
            off2 = (fro2 - diag2).clamp_min(0.0)
        else:
            cov = xc.transpose(1, 2) @ xc                                 # (G, H, H), unnormalised
            off2 = (cov.pow(2) * (1.0 - torch.eye(H, device=x.device))).sum((1, 2))
    return off2 / max(n - 1, 1) ** 2


def orthogonality_loss(concepts):
    """Mean squared cosine between distinct concepts of a sample (origin_spec §3): 0 iff the
    concepts of every sample are pairwise orthogonal (possible only for C <= H)."""
    return _mean_off_diagonal(_concept_cosines(concepts).pow(2))


def soft_orthogonality_loss(concepts, threshold=0.1):
    """Orthogonality that tolerates |cos| <= threshold (origin_spec §3): leaves room for C > H,
    where exact orthogonality is impossible."""
    return _mean_off_diagonal(F.relu(_concept_cosines(concepts).abs() - threshold).pow(2))


def uniformity_loss(concepts, temperature=2.0):
    """Mean Gaussian potential exp(-T·‖û_i − û_j‖²) = exp(-T·(2 − 2cos)) between distinct unit
    concepts of a sample (origin_spec §3; Wang & Isola, ICML 2020, without their log). 1 when a
    sample's concepts coincide, exp(-2T) when orthogonal; minimised by spreading them on the sphere."""
    return _mean_off_diagonal(torch.exp(-temperature * (2.0 - 2.0 * _concept_cosines(concepts))))


def variance_loss(concepts, pooled=False):
    """VICReg variance hinge (Bardes et al., ICLR 2022): mean_d relu(1 − sqrt(Var_d + 1e-4)).
    Within-sample (default) the variance of each dimension is taken over the C concepts of a
    sample and the hinge averaged over the batch, so identical concepts cost ~1 even when the
    samples differ; pooled=True is the original's flatten-to-(B·C)×H form."""
    x = _vicreg_rows(concepts, pooled)                                       # (G, n, H)
    std = torch.sqrt(x.var(dim=1, correction=min(1, x.shape[1] - 1)) + 1e-4)  # (G, H)
    return F.relu(1.0 - std).mean()


def covariance_loss(concepts, pooled=False):
    """VICReg covariance term: Σ_{d≠e} Cov_de² / H, decorrelating the H dimensions (within-sample
    over the C concepts, averaged over the batch; pooled=True: over all B·C concepts). Within a
    sample Cov has rank <= C−1, so for C <= H it cannot vanish at unit variance (it is at least
    H/(C−1) − 1 there): it trades off against variance_loss, with which vicreg pairs it."""
    x = _vicreg_rows(concepts, pooled)
    return (_off_diagonal_cov_sq(x) / x.shape[-1]).mean()


def vicreg_loss(concepts, pooled=False):
    """VICReg variance + covariance with unit weights (origin_spec §3)."""
    return variance_loss(concepts, pooled) + covariance_loss(concepts, pooled)


def combined_loss(concepts, pooled=False, temperature=2.0):
    """Variance + uniformity with unit weights (origin_spec §3: the original's 'combined')."""
    return variance_loss(concepts, pooled) + uniformity_loss(concepts, temperature)


def t_regs_mst_loss(concepts):
    """Minus the mean distance from each unit concept to its nearest neighbour in the same sample:
    maximising it lengthens the minimum spanning tree, of which the nearest-neighbour distances
    are a cheap proxy (origin_spec §3, 't_regs_mst'). 0 when a sample's concepts coincide.
    Chordal distances come from the cosines; the diagonal is masked with +inf (safe in any dtype,
    unlike the original's +1e9)."""
    S = _concept_cosines(concepts)                                  # (B, C, C)
    C = S.shape[-1]
    if C < 2:
        return S.sum() * 0.0
    d = torch.sqrt((2.0 - 2.0 * S).clamp_min(1e-8))                 # (B, C, C) ‖û_i − û_j‖
    eye = torch.eye(C, dtype=torch.bool, device=S.device)
    nearest = d.masked_fill(eye, float('inf')).min(dim=-1).values   # (B, C)
    return -nearest.mean()


# name (as written in the concept_losses setting) -> loss function(concepts) -> scalar
CONCEPT_LOSSES = {
    'orthogonality': orthogonality_loss,
    'soft_orthogonality': soft_orthogonality_loss,
    'uniformity': uniformity_loss,
    'variance': variance_loss,
    'covariance': covariance_loss,
    'vicreg': vicreg_loss,
    'combined': combined_loss,
    't_regs_mst': t_regs_mst_loss,
}


def parse_concept_losses(spec):
    """'vicreg,t_regs_mst' -> ['vicreg', 't_regs_mst']; '' or 'none' -> []. An unknown or repeated
    name raises ConfigError listing the valid names."""
    spec = spec.strip()
    if spec.lower() in ('', 'none'):
        return []
    names = [s.strip() for s in spec.split(',') if s.strip()]
    valid = ', '.join(CONCEPT_LOSSES)
    for name in names:
        if name not in CONCEPT_LOSSES:
            raise ConfigError(f"unknown concept loss '{name}' in concept_losses='{spec}'; "
                             f"choose a comma-separated subset of: {valid} (or 'none')")
    if len(set(names)) != len(names):
        raise ConfigError(f"concept_losses='{spec}' lists a loss twice; valid names: {valid}")
    return names


def concept_reg_losses(concepts, names, pooled=False, threshold=0.1, temperature=2.0):
    """{name: scalar loss} of the named regularisers on concepts (B, C, H), each given the options
    it takes: pooled (VICReg statistics over the batch too), the soft-orthogonality threshold and
    the uniformity temperature."""
    options = {'soft_orthogonality': {'threshold': threshold},
               'uniformity': {'temperature': temperature},
               'variance': {'pooled': pooled}, 'covariance': {'pooled': pooled},
               'vicreg': {'pooled': pooled},
               'combined': {'pooled': pooled, 'temperature': temperature}}
    return {name: CONCEPT_LOSSES[name](concepts, **options.get(name, {})) for name in names}


class ConceptLossWeighting(nn.Module):
    """Combines the task loss with the concept regularisers: forward(task_loss, reg_losses, step)
    -> (total, info), info holding plain floats for logging: 'warm', 'w_task', and per regulariser
    '<name>' (its value) and 'w_<name>' (the multiplier of that loss in the total).

    warm = min(1, step / warmup_iters) (1 when warmup_iters <= 0) phases the regularisers in
    (origin_spec §3, added by the original on 02-27); each strategy applies it as noted below.

    - 'fixed': total = task + Σ_k (weight / K)·warm·L_k, K = len(names) (the original CLI's
      split of --loss_weight; its run plan was 0.02 over vicreg + t_regs_mst).
    - 'learnable' (the original's): softmax weights p over [task, regs...] from logits initialised
      at 0, total = Σ_i p_i·L_i. The optimiser can lower the total by moving weight from the task
      to a regulariser that is already near 0, i.e. it can shrink the task weight: kept only to
      reproduce the original. Warmup multiplies each regulariser's exp(logit) by warm before
      normalising, so at warm = 0 the total is exactly the task loss and the logits get no gradient.
    - 'kendall_gal' (Kendall, Gal & Cipolla, CVPR 2018): learned s_i = log σ_i², initialised at 0,
      total = Σ_i 0.5·exp(−s_i)·L_i + 0.5·s_i, where warm multiplies each regulariser's whole
      term (so its s_k does not move while warm = 0). Bounded as follows, against the original's
      failure (origin_spec §10.3): a regulariser's Kendall–Gal optimum is exp(−s_k) = 1/L_k, so
      as L_k -> 0 its weight grew without bound, its 0.5·s_k drove the total negative (−0.26)
      and the task's share of the gradient vanished.
        1. Box: s_i = s_bound·tanh(raw_i / s_bound) lies in (−s_bound, s_bound) (a smooth clamp,
           so a parameter at the edge is never stuck with zero gradient; the identity near 0).
           Each weight is thus within [0.5·e^−b, 0.5·e^b] and each 0.5·s_i > −b/2, so with L_i >= 0 the total
           is bounded below by −(K+1)·b/2 (b = s_bound = 5, the range suggested in
           methods.md §6).
        2. Ratio cap: s_k >= s_task − log(max_reg_ratio), i.e. exp(−s_k) <= max_reg_ratio·exp(−s_task):
           no regulariser ever weighs more than max_reg_ratio (default 1) times the task. s_task
           enters the cap detached, so regulariser pressure never moves the task's weight: the
           task's s follows its own Kendall–Gal gradient 0.5·(1 − e^−s·L_task), whose optimum is
           weight 0.5/L_task and beyond which raising s_task (shrinking the task weight) only
           raises the total, as it also raises every capped regulariser's 0.5·s_k. The task
           weight can never fall below 0.5·e^−b. While a regulariser sits at the cap its own
           parameter gets no gradient; at worst it then acts as a fixed weight of ratio
           max_reg_ratio to the task.
      Kendall–Gal assumes L_i >= 0: t_regs_mst is <= 0, so under kendall_gal (and learnable)
      it always wants the largest weight it can get, and sits at the cap.
      The parameters are float32 and the arithmetic is float32 (losses are cast; no matmul, so
      autocast does not touch it).

    All parameters are 1-D, so a `p.dim() >= 2` weight-decay rule (ConceptLM.configure_optimizers)
    leaves them undecayed, as Kendall–Gal's log-variances must be.
    """

    STRATEGIES = ('fixed', 'learnable', 'kendall_gal')

    def __init__(self, names, strategy='fixed', weight=0.02, warmup_iters=0, s_bound=5.0,
                 max_reg_ratio=1.0):
        super().__init__()
        if strategy not in self.STRATEGIES:
            raise ConfigError(f"unknown concept loss weighting '{strategy}'; "
                             f"choose one of {', '.join(self.STRATEGIES)}")
        if s_bound <= 0 or max_reg_ratio <= 0:
            raise ConfigError(f"s_bound={s_bound} and max_reg_ratio={max_reg_ratio} must be > 0")
        self.names = list(names)
        self.strategy = strategy
        self.weight = weight
        self.warmup_iters = warmup_iters
        self.s_bound = s_bound
        self.max_reg_ratio = max_reg_ratio
        n = 1 + len(self.names)  # index 0 is the task
        if strategy == 'learnable' and self.names:
            self.logits = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        elif strategy == 'kendall_gal' and self.names:
            self.log_var = nn.Parameter(torch.zeros(n, dtype=torch.float32))  # raw, before the box

    def warm(self, step):
        """Warmup factor of the regularisers at this step, in [0, 1]."""
        return 1.0 if self.warmup_iters <= 0 else min(1.0, max(step, 0) / self.warmup_iters)

    def log_variances(self):
        """Kendall–Gal s = (s_task, s_reg...) after the box and the ratio cap: (1 + K,) float32."""
        b = self.s_bound
        s = b * torch.tanh(self.log_var.float() / b)
        cap = s[:1].detach() - math.log(self.max_reg_ratio)
        return torch.cat([s[:1], torch.maximum(s[1:], cap)])

    def forward(self, task_loss, reg_losses, step, as_floats=True):
        """as_floats=False leaves the info values as 0-d tensors on the device: a training step
        then reads nothing back to the host (the float() happens when something is logged)."""
        warm = self.warm(step)
        losses = torch.stack([task_loss.float()] + [reg_losses[n].float() for n in self.names])  # (1+K,)
        K = len(self.names)
        # filled on the device: a tensor built from a Python list is a host-to-device copy, which
        # waits for the device on CUDA
        one = torch.ones(1, device=losses.device)
        gate = torch.cat([one, torch.full((K,), float(warm), device=losses.device)])  # (1+K,) warm on the regs
        if self.strategy == 'fixed' or K == 0:
            w = gate * torch.cat([one, torch.full((K,), self.weight / max(K, 1), device=losses.device)])
            total = (w * losses).sum()
        elif self.strategy == 'learnable':
            logits = self.logits.float() + torch.log(gate)  # log 0 = -inf: weight 0, no gradient
            w = torch.softmax(logits, dim=0)
            total = (w * losses).sum()
        else:
            s = self.log_variances()
            w = gate * 0.5 * torch.exp(-s)
            total = (w * losses).sum() + (gate * 0.5 * s).sum()
        values = torch.cat([w.detach(), losses.detach()])
        values = values.tolist() if as_floats else values.unbind()  # tolist: one device sync
        info = {'warm': warm, 'w_task': values[0]}
        for k, name in enumerate(self.names):
            info[f'w_{name}'] = values[1 + k]
            info[name] = values[2 + K + k]
        return total, info


@torch.no_grad()
def concept_diagnostics(concepts):
    """Collapse diagnostics of concepts (B, C, H), as plain floats (float32 arithmetic):

    - erank: entropy effective rank (Roy & Vetterli, EUSIPCO 2007) of each sample's C×H concept
      matrix (uncentred): exp(−Σ p_k log p_k) with p = σ/Σσ its singular values; averaged over
      the batch. 1 when a sample's concepts are parallel, C when orthogonal with equal norms.
    - erank_batchmean: the original's 'effective rank' (origin_spec §3), Σσ/σ_max of the batch-MEAN
      C×H matrix. It measures the mean concept configuration, not per-sample diversity; kept to
      compare with the reported numbers (5/128 for the collapsed L6 MLM).
    - concept_cos_mean: mean cosine between distinct concepts of a sample, over pairs and batch.
    - concept_cos_max: the largest such cosine in each sample, averaged over the batch (the
      typical worst duplicate; a global max reads 1.0 as soon as one sample has one duplicate).
    - participation_ratio: (Σλ)²/Σλ² of the eigenvalues λ of each sample's uncentred second-moment
      matrix cᵀc/C (H×H; λ = σ²/C), averaged over the batch: the number of directions carrying
      the concepts' energy, weighted by σ² where erank weights by σ. Uncentred, so it agrees
      with erank at the extremes (1 parallel, C orthogonal with equal norms) and is not 0/0 for
      identical concepts. The original's PR (÷H) was pooled over B·C concepts: not comparable.

    Concepts that hold a nan or an inf (a diverged model) give nan for every key: svdvals cannot
    factor them, and a number would hide the divergence.
    """
    keys = ('erank', 'erank_batchmean', 'concept_cos_mean', 'concept_cos_max', 'participation_ratio')
    with _no_autocast(concepts):
        c = concepts.detach().float()
        B, C, H = c.shape
        if not bool(torch.isfinite(c).all()):
            return dict.fromkeys(keys, float('nan'))
        sv = torch.linalg.svdvals(c)                                    # (B, min(C, H))
        p = sv / sv.sum(-1, keepdim=True).clamp_min(1e-30)
        erank = torch.exp(-(torch.special.xlogy(p, p)).sum(-1))         # (B,)
        sv_mean = torch.linalg.svdvals(c.mean(0))                      # (min(C, H),)
        erank_batchmean = sv_mean.sum() / sv_mean.max().clamp_min(1e-30)
        lam = sv.pow(2)                                                 # ∝ eigenvalues of cᵀc/C
        pr = lam.sum(-1).pow(2) / lam.pow(2).sum(-1).clamp_min(1e-30)  # (B,)
        S = _concept_cosines(c)                                         # (B, C, C)
        eye = torch.eye(C, dtype=torch.bool, device=c.device)
        cos_max = S.masked_fill(eye, float('-inf')).amax(dim=(1, 2)) if C > 1 else S.new_zeros(B)
        values = torch.stack([erank.mean(), erank_batchmean, _mean_off_diagonal(S),
                              cos_max.mean(), pr.mean()]).tolist()
    return dict(zip(keys, values))


def average_diagnostics(dicts):
    """Key-wise mean of a list of concept_diagnostics dicts (e.g. over validation batches)."""
    if not dicts:
        return {}
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


def lm_cross_entropy(lm_head, h, labels, label_smoothing=0.0):
    """h (M, H) at the decoded positions -> their logits (M, V) and the float32 cross-entropy
    (M,) against labels, equal to F.cross_entropy(logits.float(), labels, reduction='none',
    label_smoothing=...). One function with the head inside so that torch.compile hands it whole
    to inductor, which fuses the float32 upcast, log-sum-exp and loss over the vocabulary into one
    pass and their backward into another. The label's logit is picked by comparing with the
    vocabulary index, not by gather: its backward is then elementwise, where gather's (and
    F.cross_entropy's) scatters into an (M, V) float32 tensor of zeros first (fwd + bwd 90-93 vs
    101-110 ms at M = 1248, V = 8192 on the CPU). The logits come back detached (callers read them
    only for accuracy): a differentiable output would cost an (M, V) zero gradient in every
    backward. bench.py's standard encoder uses it too, so both models pay the same for the loss."""
    logits = lm_head(h)                                                       # (M, V)
    z = logits.float()
    is_label = torch.arange(z.shape[-1], device=z.device) == labels[:, None]  # (M, V) bool
    label_logit = torch.where(is_label, z, 0.0).sum(-1)                      # (M,)
    # label smoothing: (1 - s)·(-log p_label) + s·mean over the vocabulary of (-log p)
    ce = torch.logsumexp(z, -1) - (1 - label_smoothing) * label_logit
    if label_smoothing:
        ce = ce - label_smoothing * z.mean(-1)
    return logits.detach(), ce


# ----------------------------------------------------------------------------------------------
# full models

class ConceptLM(nn.Module):
    """What every objective shares: the encoder, the lm_head, init, optimizer and FLOP count.

    encoder='concept' reads the text into C concepts and a decoder reads them back out;
    encoder='standard' is the peer: a StandardEncoder whose own token states feed the lm_head at
    the positions that carry a loss (self.decoder is None), trained by the same objectives."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.encoder not in ENCODERS:
            raise ConfigError(f"unknown encoder '{cfg.encoder}'; choose one of {', '.join(ENCODERS)}")
        if cfg.decoder not in DECODERS:
            raise ConfigError(f"unknown decoder '{cfg.decoder}'; choose one of {', '.join(DECODERS)}")
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        if cfg.shared_token_kv and cfg.bixt:
            raise ConfigError("shared_token_kv=True needs static tokens, but bixt=True updates them; "
                              "set one of them False")
        self.cfg = cfg
        self.standard = cfg.encoder == 'standard'
        if self.standard:
            concept_only = [k for k in ('bixt', 'recursive_iters', 'shared_token_kv', 'concept_losses') if getattr(cfg, k)]
            if concept_only:
                raise ConfigError(f"encoder='standard' has no concepts: {', '.join(concept_only)} apply to the concept "
                                  f"arm only; leave them unset or use encoder='concept'")
            if cfg.decoder == 'weighted':
                raise ConfigError("decoder='weighted' mixes concepts, which encoder='standard' does not have; "
                                  "its lm_head reads the token states (decoder='perceiver' for MLM, 'posonly' for TSDAE)")
            if cfg.mask_id < 0:
                raise ConfigError("encoder='standard' needs mask_id (from the data directory's meta.json)")
            self.encoder = StandardEncoder(cfg, time_cond=cfg.decoder == 'diffusion' and cfg.time_cond)
        else:
            self.encoder = ConceptEncoder(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.reg_names = parse_concept_losses(cfg.concept_losses)
        self.loss_weighting = (ConceptLossWeighting(self.reg_names, cfg.loss_weighting, cfg.concept_loss_weight,
                                                    cfg.concept_loss_warmup) if self.reg_names else None)

    def maskable(self, idx, attn_mask=None):
        """(B, N) bool: the ordinary tokens (not special, not padding) that a stage's noise may touch."""
        ok = torch.ones_like(idx, dtype=torch.bool)
        for special in self.cfg.special_ids:  # against Python ints: no host-to-device copy (a CUDA sync)
            ok &= idx != special
        return ok if attn_mask is None else ok & attn_mask

    def concept_stats(self, memory):
        """{'concepts': memory} for the stats of the concept arm (the diagnostics read it); the
        standard arm's token states are not a fixed set of C vectors, so it has none."""
        return {} if self.standard else {'concepts': memory}

    @staticmethod
    def read_states(states, pos, packing=None):
        """The standard arm's decoding: its token states (B, N, H) read at pos (B, M) as they are;
        (M', H) at the valid slots only, given a Packing of (B, M)."""
        h = gather_states(states, pos)
        return h if packing is None else packing.pack(h)

    def add_concept_losses(self, task_loss, concepts, step, stats):
        """In training with concept_losses set: the weighted total of the task loss and the
        regularisers on the concepts; stats gets the task loss and every weight for the log (0-d
        tensors on the device, read when logged)."""
        if self.loss_weighting is None or not self.training:
            return task_loss
        regs = concept_reg_losses(concepts, self.reg_names, pooled=self.cfg.concept_loss_pooled)
        total, info = self.loss_weighting(task_loss, regs, step, as_floats=False)
        stats['task_loss'] = task_loss.detach()
        stats['weighting'] = info
        return total

    def _finish_init(self):
        self.apply(self._init_weights)
        # scaled init of the residual projections (GPT-2): keeps the residual stream's variance
        # independent of depth
        n_res = 2 * max(self.cfg.n_layer, self.cfg.recursive_iters) + (0 if self.standard else 2 * self.cfg.n_dec_layer)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight') or name.endswith('t_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(n_res))
        # Identity value/output paths through every cross-attention (and the weighted decoder's
        # projection): token content then crosses the bottleneck in the embedding basis from the
        # first step, where the tied lm_head can read it. With the usual small random init, the
        # content reaches the head through a chain of random projections, the loss finds the
        # unigram solution first and the concepts collapse to an input-independent state (on
        # config/tiny.py, 300 iterations of pydocs: posonly val loss 7.21 -> 6.86).
        H = self.cfg.n_embd
        eye = torch.eye(H)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, CrossAttention):
                    if hasattr(m, 'c_kv'):
                        m.c_kv.weight[H:] = eye
                    m.c_proj.weight.copy_(eye)
                elif isinstance(m, BiXTLayer):
                    m.c_ref_val.weight[H:] = eye
                    m.t_ref_val.weight[H:] = eye
                    m.c_proj.weight.copy_(eye)
                    if m.token_update:
                        m.t_proj.weight.copy_(eye)
                elif isinstance(m, MLMDecoder) and m.kind == 'weighted':
                    m.proj.weight.copy_(eye)
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

    def model_args(self):
        return asdict(self.cfg)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position tables (the encoder's and a decoder's) are left out by
        default (as in nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for name, m in self.named_modules() if name.split('.')[-1] == 'wpe')
        return n

    def lm_logits(self, h):
        return self.lm_head(h)

    def logits_and_ce(self, h, labels, label_smoothing=0.0):
        """h (M, H) at the decoded positions -> logits (M, V), detached, and the cross-entropy (M,):
        lm_cross_entropy through this model's head (a method, so compile_for_training can compile it)."""
        return lm_cross_entropy(self.lm_head, h, labels, label_smoothing)

    def compile_for_training(self, device_type):
        """torch.compile the parts of a training step: the encoder (fixed [B, N] shapes), the
        decoder and logits_and_ce, in which only the number of decoded positions (M, and the M'
        packed rows) varies per batch: that dimension alone is marked dynamic, so one graph
        serves every batch and every other size stays a constant for the compiler. On the
        CPU, inductor's pattern matcher is off: its attention patterns would turn the math-kernel
        attentions that attention() picks back into the slower flash kernel; and the token
        embedding stays eager: inductor's CPU backward of an embedding is one atomic add per
        element (~25 ms for 8192 tokens at H = 512), eager's is ~3 ms."""
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
        """AdamW; weight decay only on matrices (>= 2-D), never on norms, biases or gains.
        Fused kernels on CUDA and the CPU (one pass over each tensor instead of ~8: the CPU step
        of the 16M-parameter h512l2 model takes ~8 ms fused, ~22-32 ms unfused)."""
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
            # token K/V projection: once per distinct layer, or once in all (recursive, shared_token_kv)
            n_projections = 1 if cfg.shared_token_kv else len(self.encoder.layers)
            macs += N * 2 * H * H * n_projections / self.encoder.n_iters
        return 2 * (macs + concept_core) * self.encoder.n_iters

    def decoder_flops(self, n_decoded):
        """Forward FLOPs of decoding n_decoded positions of one sequence, lm_head included."""
        cfg, M = self.cfg, n_decoded
        H, C, I = cfg.n_embd, cfg.n_concepts, cfg.ffn_size
        if self.standard:  # no decoder: the lm_head reads the token states
            macs = 0
        elif cfg.decoder == 'weighted':
            macs = M * (C * H + H * H)
        else:
            per_layer = M * (2 * H * H + 2 * C * H + 3 * H * I) + C * 2 * H * H
            if cfg.decoder == 'diffusion' and cfg.time_cond:
                per_layer += 6 * H * H  # adaLN modulation (per sequence)
            macs = per_layer * cfg.n_dec_layer
        return 2 * (macs + M * H * cfg.vocab_size)

    def estimate_flops(self, n_tokens, n_decoded):
        """Training FLOPs (forward + backward) for one sequence."""
        return 3 * (self.encoder_flops(n_tokens) + self.decoder_flops(n_decoded))


class ConceptMLM(ConceptLM):
    """Encoder + MLM decoder + lm_head. Serves MLM (labels on masked positions) and TSDAE
    (labels on every real token, deleted tokens hidden from the encoder by attn_mask)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.decoder == 'diffusion':
            raise ConfigError("decoder='diffusion' belongs to ConceptDiffusion (train_diffusion.py)")
        self.decoder = None if self.standard else MLMDecoder(cfg)
        self._finish_init()

    # --- the two stages' noise (diffusion's is ConceptDiffusion.add_noise)
    def mlm_noise(self, idx, generator, mask_prob):
        """BERT masking (Devlin et al. 2019): pick mask_prob of the ordinary tokens; of those 80%
        become [MASK], 10% a random ordinary token, 10% stay. Returns (inputs, targets (B, N)),
        targets = IGNORE_INDEX where there is no loss."""
        u = torch.rand(idx.shape, generator=generator, device=idx.device)
        picked = (u < mask_prob) & self.maskable(idx)
        action = torch.rand(idx.shape, generator=generator, device=idx.device)
        n_ordinary = min(self.cfg.special_ids)  # the specials sit on top of the vocabulary
        random_ids = torch.randint(n_ordinary, idx.shape, generator=generator, device=idx.device)
        inputs = torch.where(picked & (action < 0.8), self.cfg.mask_id, idx)
        inputs = torch.where(picked & (action >= 0.8) & (action < 0.9), random_ids, inputs)
        return inputs, torch.where(picked, idx, IGNORE_INDEX)

    def tsdae_noise(self, idx, generator, deletion_rate, deletion_mode='hide', attn_mask=None):
        """TSDAE deletion (Wang et al. 2021): delete deletion_rate of each row's ordinary tokens,
        keeping at least one. Returns (encoder ids, encoder attn_mask, targets (B, N)): targets are
        the original ids at every real position and IGNORE_INDEX at padding, so the model is never
        trained to emit padding.
        hide: ids and positions unchanged, deleted tokens masked out of the encoder's keys.
        drop: deleted tokens removed and the rest shifted left (the paper's deletion); the decoder
              still rebuilds the original positions."""
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
        """Hidden states (B, M, H) at positions pos (B, M) of the input idx; (M', H) at the valid
        ones only, given the Packing of gather_positions' valid (B, M). memory: the concepts
        (B, C, H), or the standard arm's token states (B, N, H), read at pos as they are."""
        if self.standard:
            return self.read_states(memory, pos, packing)
        tok = self.encoder.wte(torch.gather(idx, 1, pos)) if self.cfg.decoder == 'perceiver' else None
        return self.decoder(memory, pos, tok, packing)

    def forward(self, idx, targets=None, attn_mask=None, n_iters=None, step=0):
        """idx (B, N) input ids; targets (B, N) with IGNORE_INDEX where there is no loss;
        attn_mask (B, N) bool, True where the encoder may look.

        With targets: returns (None, loss, stats) where the decoder and lm_head ran only at the
        labelled positions (sparse decoding; equal to dense cross-entropy with ignore_index).
        Without: returns (logits (B, N, V), None, {}) for every position."""
        concepts = self.encoder(idx, attn_mask, n_iters)
        if targets is None:
            B, N = idx.shape
            pos = torch.arange(N, device=idx.device).expand(B, N)
            return self.lm_logits(self.decode(concepts, idx, pos)), None, {}
        pos, valid, packing = gather_and_pack(targets != IGNORE_INDEX)
        if pos.shape[1] == 0:  # nothing to predict: a zero that still has a graph
            return None, self.lm_head.weight.sum() * 0.0, {'n_pred': 0, 'n_correct': 0, **self.concept_stats(concepts)}
        h = self.decode(concepts, idx, pos, packing)           # (M, H)
        labels = packing.pack(torch.gather(targets, 1, pos))  # (M,)
        logits, ce = self.logits_and_ce(h, labels)            # (M, V): never (B, N, V); (M,)
        loss = ce.mean()
        stats = {'n_pred': labels.numel(), **self.concept_stats(concepts)}
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


class TimestepEmbedding(nn.Module):
    """t in [0, 1] -> (B, H): sinusoidal features of 1000·t, then an MLP (DiT, Peebles & Xie 2023).
    The 1000x scale spreads t over the frequencies; with t in [0, 1] and period 10^4 the
    high-frequency features would be almost constant."""

    def __init__(self, cfg, n_freq=256):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, cfg.n_embd), nn.SiLU(), nn.Linear(cfg.n_embd, cfg.n_embd))

    def forward(self, t):
        half = self.n_freq // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None, :]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (B, H)


class DiffusionLayer(nn.Module):
    """Cross-attention from the noisy positions to the concepts, then an FFN; no attention among
    positions, so the cost is O(M·C). With time_cond, AdaLN-Zero: a zero-initialised linear maps
    the timestep embedding to shift, scale and gate for both sub-blocks, so the layer starts as
    the identity and the modulation is bounded at first (the original's unbounded AdaLN exploded,
    seed 2026-02-23)."""

    def __init__(self, cfg):
        super().__init__()
        self.time_cond = cfg.time_cond
        self.ln_1 = nn.LayerNorm(cfg.n_embd, elementwise_affine=not cfg.time_cond)
        self.cross_attn = CrossAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, elementwise_affine=not cfg.time_cond)
        self.mlp = GatedMLP(cfg)
        if cfg.time_cond:
            self.adaLN = nn.Linear(cfg.n_embd, 6 * cfg.n_embd)

    def forward(self, q, concepts, cond=None, packing=None):
        """q (B, M, H) queries, or packed (M', H) with a Packing (see CrossAttention);
        concepts (B, C, H); cond (B, H) timestep embedding."""
        kv = self.cross_attn.project_kv(concepts)
        if not self.time_cond:
            q = q + self.cross_attn(self.ln_1(q), kv, packing=packing)
            return q + self.mlp(self.ln_2(q))
        shift1, scale1, gate1, shift2, scale2, gate2 = adaln_modulation(self.adaLN, cond, packing)
        q = q + gate1 * self.cross_attn(self.ln_1(q) * (1 + scale1) + shift1, kv, packing=packing)
        return q + gate2 * self.mlp(self.ln_2(q) * (1 + scale2) + shift2)


class DiffusionDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.time_emb = TimestepEmbedding(cfg) if cfg.time_cond else None
        self.layers = nn.ModuleList([DiffusionLayer(cfg) for _ in range(cfg.n_dec_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, concepts, pos, query_tok_emb, t, packing=None):
        """concepts (B, C, H); pos (B, M); query_tok_emb (B, M, H) of the noisy ids; t (B,).
        Returns (B, M, H), or (M', H) at the valid slots only, given a Packing of (B, M)."""
        q = query_tok_emb + self.wpe(pos)
        if packing is not None:
            q = packing.pack(q)  # (M', H)
        cond = self.time_emb(t) if self.time_emb is not None else None
        for layer in self.layers:
            q = layer(q, concepts, cond, packing)
        return self.ln_f(q)  # (B, M, H) or (M', H)


class ConceptDiffusion(ConceptLM):
    """Masked discrete diffusion whose denoiser reads the text only through the C concepts.

    Forward process: each real token is replaced by [MASK] with probability t (linear schedule,
    alpha_t = 1 - t); padding and special tokens never are. The decoder predicts the original
    token at masked positions only. What the encoder sees is `condition`:
      noisy  - the noisy sequence itself, exactly what generate() gives it, so training and
               sampling match and the concepts must summarise the visible context (default);
      clean  - the clean text (the original project): an autoencoder through the concept
               bottleneck; its "likelihood" is not a bound on anything, and generate() can only
               give the encoder the partly masked sequence it has;
      prefix - like noisy, but a random-length prefix is never masked, as a prompt is never
               masked at sampling time (LLaDA's SFT recipe), so the model learns continuation.
    With encoder='standard' the denoiser is MDLM's: transformer layers over the noisy sequence,
    AdaLN-Zero-conditioned on t (time_cond), the lm_head on their states at the masked positions;
    'clean' would show it the answer, so it takes 'noisy' or 'prefix'.
    """

    def __init__(self, cfg):
        cfg.decoder = 'diffusion'
        super().__init__(cfg)
        if cfg.condition not in CONDITIONS:
            raise ConfigError(f"unknown condition '{cfg.condition}'; choose one of {', '.join(CONDITIONS)}")
        if cfg.mask_id < 0:
            raise ConfigError("ConceptDiffusion needs mask_id (from the data directory's meta.json)")
        if self.standard and cfg.condition == 'clean':
            raise ConfigError("condition='clean' shows the clean text to the denoiser itself with encoder='standard'; "
                              "use condition='noisy' or 'prefix'")
        self.decoder = None if self.standard else DiffusionDecoder(cfg)
        self._finish_init()
        for m in self.modules():  # AdaLN-Zero: every modulated layer starts as the identity
            if getattr(m, 'adaLN', None) is not None:
                nn.init.zeros_(m.adaLN.weight)
                nn.init.zeros_(m.adaLN.bias)

    # --- the forward (noising) process
    def sample_t(self, B, generator, device):
        """Per-sample t ~ U(t_min, 1); stratified: one draw in each of B equal strata."""
        u = torch.rand(B, generator=generator, device=device)
        if self.cfg.stratified_t:
            u = (u + torch.arange(B, device=device)) / B
        return self.cfg.t_min + (1.0 - self.cfg.t_min) * u

    def add_noise(self, idx, t, attn_mask=None, generator=None):
        """Mask each maskable token with probability t (B,); at least one per sample that has
        one. prefix condition: the first L tokens stay clean, L uniform in [0, n_real - 1].
        Returns (noisy ids (B, N), masked (B, N) bool, maskable (B, N) bool)."""
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
        """What the denoiser reads: the concepts (B, C, H) of the condition's input (clean idx or
        the noisy ids); for the standard arm, its token states (B, N, H) of the noisy ids at t (B,)."""
        if self.standard:
            return self.encoder(noisy, attn_mask, t=t)
        return self.encoder(idx if self.cfg.condition == 'clean' else noisy, attn_mask)

    def denoise(self, memory, noisy, pos, t, packing=None):
        """Hidden states (B, M, H) at positions pos of the noisy sequence, at noise level t (B,);
        (M', H) at the valid ones only, given the Packing of gather_positions' valid (B, M).
        memory: encode()'s output."""
        if self.standard:
            return self.read_states(memory, pos, packing)
        return self.decoder(memory, pos, self.encoder.wte(torch.gather(noisy, 1, pos)), t, packing)

    def forward(self, idx, attn_mask=None, t=None, generator=None, step=0):
        """Training loss on a batch of clean ids (B, N). Returns (None, loss, stats).

        loss = sum over masked tokens of w·CE_smoothed / (number of maskable tokens), with
        w = 1/t (elbo_weight) or w = 1 divided by the masked fraction instead. With w = 1/t it
        stays on the scale of a cross-entropy (E[#masked] = t·#maskable) and, without label
        smoothing, estimates the mean of the MDLM integrand over t in [t_min, 1]: an unbiased
        estimate of the bound per token only with t_min = 0 (nll_bound measures the bound itself)."""
        B = idx.shape[0]
        if t is None:
            t = self.sample_t(B, generator, idx.device)
        noisy, masked, maskable = self.add_noise(idx, t, attn_mask, generator)
        concepts = self.encode(idx, noisy, t, attn_mask)
        pos, valid, packing = gather_and_pack(masked)
        h = self.denoise(concepts, noisy, pos, t, packing)                        # (M, H)
        labels = packing.pack(torch.gather(idx, 1, pos))
        logits, ce = self.logits_and_ce(h, labels, self.cfg.label_smoothing)      # (M, V), (M,)
        row = packing.sample()  # sample of each target
        if self.cfg.elbo_weight:
            loss = (ce / t[row]).sum() / maskable.sum().clamp(min=1)
        else:
            loss = ce.mean()
        stats = {'n_pred': labels.numel(), **self.concept_stats(concepts)}
        if not self.training:  # evaluation metrics: the plain cross-entropy and the accuracy
            with torch.no_grad():
                stats['ce'] = F.cross_entropy(logits.float(), labels)
                stats['n_correct'] = (logits.argmax(-1) == labels).sum()
        return None, self.add_concept_losses(loss, concepts, step, stats), stats

    @torch.no_grad()
    def nll_bound(self, idx, attn_mask=None, n_grid=8, generator=None):
        """MDLM's upper bound on the NLL in nats per token: the continuous-time NELBO
        integral over t in (0, 1] by the midpoint rule on n_grid fixed levels, each a Monte-Carlo
        draw of the mask. Returns (sum of the bound over sequences, number of tokens it covers).
        Only meaningful for condition='noisy' (every maskable token) and 'prefix' (the tokens after
        the prefix, conditionally on it: each level draws its own prefix, so the count is their
        mean over the levels; counting the prefix too would halve the bound per token)."""
        B = idx.shape[0]
        wide = widest_float(idx.device)
        total = torch.zeros((), device=idx.device, dtype=wide)
        n_scored = 0.0
        for k in range(n_grid):
            t = torch.full((B,), (k + 0.5) / n_grid, device=idx.device)
            noisy, masked, maskable = self.add_noise(idx, t, attn_mask, generator)
            concepts = self.encode(idx, noisy, t, attn_mask)
            pos, valid, packing = gather_and_pack(masked)
            logits = self.lm_logits(self.denoise(concepts, noisy, pos, t, packing))
            nll = F.cross_entropy(logits.float(), packing.pack(torch.gather(idx, 1, pos)), reduction='sum')
            total += nll.to(wide) / t[0].to(wide) / n_grid
            n_scored += maskable.sum().item() / n_grid
        return total.item(), n_scored

    # --- sampling
    @torch.no_grad()
    def generate(self, idx, steps=32, temperature=1.0, top_k=0, block_len=0, attn_mask=None,
                 generator=None, trajectory=None):
        """Fill every [MASK] of idx (B, N) in `steps` steps; other tokens are kept as given.

        Each step re-encodes the current sequence, predicts every masked position, samples a
        token for each (temperature, top-k; float64 Gumbel noise, as LLaDA does, since float32
        noise lowers sample entropy), and commits the most confident predictions: the number
        committed follows a linear schedule (remaining / steps left), and the rest stay masked
        (LLaDA's low-confidence remasking). block_len > 0 fills blocks of that many masked
        positions left to right (semi-autoregressive), steps split evenly among them.
        Padding (attn_mask False) is never filled nor seen. `trajectory`, a list, receives a
        copy of the sequence after every step."""
        was_training = self.training
        self.eval()
        x = idx.clone()
        B, N = x.shape
        wide = widest_float(x.device)  # float64 for the Gumbel noise and confidences (float32 on MPS)
        if attn_mask is None:
            attn_mask = torch.ones_like(x, dtype=torch.bool)
        to_fill = (x == self.cfg.mask_id) & attn_mask
        n_real = attn_mask.sum(1).clamp(min=1)
        # which block each masked position belongs to, counted over the masked positions only
        rank_in_fill = to_fill.cumsum(1) - 1
        n_blocks = 1
        if block_len > 0:
            n_blocks = max(1, math.ceil(int(to_fill.sum(1).max()) / block_len))
        block_of = torch.where(to_fill, rank_in_fill // max(block_len, 1) if block_len > 0 else 0, -1)
        # steps split evenly among the blocks, at least one each
        steps_per_block = [max(1, steps // n_blocks + (1 if b < steps % n_blocks else 0)) for b in range(n_blocks)]
        for block, block_steps in enumerate(steps_per_block):
            for s in range(block_steps):
                masked = x == self.cfg.mask_id
                eligible = masked & (block_of == block)
                if not eligible.any():
                    break
                t = masked.sum(1) / n_real  # the model's noise level: the masked fraction
                concepts = self.encode(x, x, t, attn_mask)
                pos, valid = gather_positions(masked & attn_mask)
                logits = self.lm_logits(self.denoise(concepts, x, pos, t)).to(wide)  # (B, M, V)
                logits[..., self.cfg.special_ids] = -float('inf')  # never predict [MASK], pad, ...
                if top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
                    logits = logits.masked_fill(logits < kth, -float('inf'))
                probs = F.softmax(logits, dim=-1)
                if temperature > 0:
                    u = torch.rand(logits.shape, generator=generator, device=x.device, dtype=wide)
                    gumbel = -torch.log(-torch.log(u.clamp_min(max(1e-300, torch.finfo(wide).tiny))))
                    choice = (logits / temperature + gumbel).argmax(-1)
                else:
                    choice = logits.argmax(-1)
                confidence = probs.gather(-1, choice[..., None]).squeeze(-1)  # p of the chosen token
                # scatter back to (B, N); positions not eligible this step get -inf confidence
                conf_full = torch.full((B, N), -float('inf'), dtype=wide, device=x.device)
                pred_full = x.clone()
                rows = Packing.of(valid).sample()
                conf_full[rows, pos[valid]] = confidence[valid]
                pred_full[rows, pos[valid]] = choice[valid]
                conf_full[~eligible] = -float('inf')
                left = block_steps - s
                quota = torch.ceil(eligible.sum(1).to(wide) / left).long()  # (B,)
                order = conf_full.argsort(dim=1, descending=True)
                commit = torch.zeros_like(eligible)
                commit.scatter_(1, order, torch.arange(N, device=x.device)[None, :] < quota[:, None])
                commit &= eligible
                x = torch.where(commit, pred_full, x)
                if trajectory is not None:
                    trajectory.append(x.clone())
        self.train(was_training)
        return x
