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

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value of positions that carry no loss (as in PyTorch's cross_entropy)


class ConfigError(ValueError):
    """A model setting that cannot work; the message says which values are allowed."""


@dataclass
class ConceptConfig:
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


# ----------------------------------------------------------------------------------------------
# building blocks

class CrossAttention(nn.Module):
    """Queries from one stream attend to keys/values of another, through SDPA. The key/value
    projection is a separate method so that a caller can project a static context once and
    reuse it (the recursive encoder projects the tokens once for all K iterations)."""

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

    def forward(self, x, kv, key_mask=None):
        """x: (B, T, H) queries; kv: from project_kv; key_mask: (B, N) bool, True = may be attended."""
        B, T, H = x.shape
        q = self.c_q(x).view(B, T, self.n_head, H // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H))


class SelfAttention(nn.Module):
    """Bidirectional self-attention among the C concepts (never among tokens)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x):
        B, T, H = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, H // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
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
        mask = None if key_mask is None else key_mask[:, None, None, :]
        dc = F.scaled_dot_product_attention(r_c, r_t, v_t, attn_mask=mask, dropout_p=p)  # rows of A
        if update_tokens:
            dx = F.scaled_dot_product_attention(r_t, r_c, v_c, dropout_p=p)              # rows of Aᵀ
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

class ConceptEncoder(nn.Module):
    """tokens (B, N) -> concepts (B, C, H). Cost and memory are linear in N."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.ln_tok = nn.LayerNorm(cfg.n_embd)  # one norm on the token stream, shared by all layers
        self.drop = nn.Dropout(cfg.dropout)
        self.concepts = nn.Parameter(torch.randn(cfg.n_concepts, cfg.n_embd) * 0.02)
        n_distinct = 1 if cfg.recursive_iters > 0 else cfg.n_layer
        if cfg.bixt:  # the last distinct layer updates tokens only if it is applied again (recursion)
            self.layers = nn.ModuleList([BiXTLayer(cfg, token_update=(i < n_distinct - 1 or cfg.recursive_iters > 0))
                                         for i in range(n_distinct)])
        else:
            self.layers = nn.ModuleList([ConceptLayer(cfg) for _ in range(n_distinct)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    @property
    def n_iters(self):
        return self.cfg.recursive_iters if self.cfg.recursive_iters > 0 else self.cfg.n_layer

    def embed(self, idx):
        B, N = idx.shape
        if N > self.cfg.block_size:
            raise ValueError(f"sequence of {N} tokens exceeds block_size={self.cfg.block_size}")
        pos = torch.arange(N, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, N, H)

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
            token_kv = None
            for layer in layer_seq:
                if token_kv is None or len(self.layers) > 1:  # a shared layer projects the tokens once
                    token_kv = layer.cross_attn.project_kv(x)
                c = layer(c, token_kv, attn_mask)
        return self.ln_f(c)


# ----------------------------------------------------------------------------------------------
# decoders: concepts -> hidden states at the positions that need them

def gather_positions(select):
    """select: (B, N) bool -> pos (B, Mmax) long, valid (B, Mmax) bool.

    The selected positions of each row come first, in order; rows with fewer than Mmax selected
    positions are padded with unselected positions that `valid` marks False. This ragged-to-
    padded layout lets every decoded position attend to its own sample's concepts in one SDPA
    call, and it is exact because decoder positions never attend to each other."""
    counts = select.sum(1)
    m_max = int(counts.max()) if select.numel() else 0
    order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :m_max]
    valid = torch.arange(m_max, device=select.device)[None, :] < counts[:, None]
    return order, valid


class DecoderLayer(nn.Module):
    """Perceiver-IO decoder layer: each query reads the concepts, then an FFN. No query-query
    attention, so the output at one position does not depend on which others are decoded."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.cross_attn = CrossAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = GatedMLP(cfg)

    def forward(self, q, concepts):
        q = q + self.cross_attn(self.ln_1(q), self.cross_attn.project_kv(concepts))
        return q + self.mlp(self.ln_2(q))


class MLMDecoder(nn.Module):
    """Reads concepts back out at positions pos (B, M) of the input.

    weighted:  h = softmax(W[pos]) @ concepts, a per-position mixture whose weights depend only on
               the position, as in the original weighted_mlm (origin_spec §2.1); then LN-Linear-GELU.
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

    def forward(self, concepts, pos, query_tok_emb=None):
        """concepts (B, C, H); pos (B, M) positions; query_tok_emb (B, M, H) for 'perceiver'."""
        if self.kind == 'weighted':
            h = torch.bmm(F.softmax(self.mix[pos].float(), dim=-1).to(concepts.dtype), concepts)
            return F.gelu(self.proj(self.ln(h)))  # (B, M, H)
        q = self.wpe(pos)
        if self.kind == 'perceiver':
            q = q + query_tok_emb
        for layer in self.layers:
            q = layer(q, concepts)
        return self.ln_f(q)  # (B, M, H)


# ----------------------------------------------------------------------------------------------
# full models

class ConceptLM(nn.Module):
    """What every objective shares: the encoder, the lm_head, init, optimizer and FLOP count."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.decoder not in DECODERS:
            raise ConfigError(f"unknown decoder '{cfg.decoder}'; choose one of {', '.join(DECODERS)}")
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.cfg = cfg
        self.encoder = ConceptEncoder(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def _finish_init(self):
        self.apply(self._init_weights)
        # scaled init of the residual projections (GPT-2): keeps the residual stream's variance
        # independent of depth
        n_res = 2 * max(self.cfg.n_layer, self.cfg.recursive_iters) + 2 * self.cfg.n_dec_layer
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight') or name.endswith('t_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(n_res))
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
        """Parameter count; the position tables are left out by default (as in nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.encoder.wpe.weight.numel()
        return n

    def lm_logits(self, h):
        return self.lm_head(h)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay only on matrices (>= 2-D), never on norms, biases or gains.
        Fused kernels on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=(device_type == 'cuda'))

    # --- FLOPs, for MFU. Counted as 2 FLOPs per multiply-accumulate of every matmul; the
    # backward pass costs twice the forward (Kaplan et al. 2020; PaLM appendix B).
    def encoder_flops(self, n_tokens):
        """Forward FLOPs of the encoder for one sequence of n_tokens: linear in n_tokens."""
        cfg, N = self.cfg, n_tokens
        H, C, I = cfg.n_embd, cfg.n_concepts, cfg.ffn_size
        concept_core = C * 4 * H * H + 2 * C * C * H + C * 3 * H * I  # self-attention, FFN
        if cfg.bixt:
            macs = C * 2 * H * H + N * 2 * H * H + 2 * C * N * H + C * H * H  # R, V; A; A V_t; out
            token_side = 2 * C * N * H + N * H * H + N * 3 * H * I           # Aᵀ again; Aᵀ V_c; out; FFN
            macs += token_side * (self.encoder.n_iters - 1) / self.encoder.n_iters  # none in the last layer
        else:
            macs = C * 2 * H * H + 2 * C * N * H  # concept Q and out projections; QKᵀ and AV
            # token K/V projection: once per distinct layer (a recursive encoder projects once)
            macs += N * 2 * H * H * len(self.encoder.layers) / self.encoder.n_iters
        return 2 * (macs + concept_core) * self.encoder.n_iters

    def decoder_flops(self, n_decoded):
        """Forward FLOPs of decoding n_decoded positions of one sequence, lm_head included."""
        cfg, M = self.cfg, n_decoded
        H, C, I = cfg.n_embd, cfg.n_concepts, cfg.ffn_size
        if cfg.decoder == 'weighted':
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
        self.decoder = MLMDecoder(cfg)
        self._finish_init()

    def decode(self, concepts, idx, pos):
        """Hidden states (B, M, H) at positions pos (B, M) of the input idx."""
        tok = self.encoder.wte(torch.gather(idx, 1, pos)) if self.cfg.decoder == 'perceiver' else None
        return self.decoder(concepts, pos, tok)

    def forward(self, idx, targets=None, attn_mask=None, n_iters=None):
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
        pos, valid = gather_positions(targets != IGNORE_INDEX)
        if pos.shape[1] == 0:  # nothing to predict: a zero that still has a graph
            return None, self.lm_head.weight.sum() * 0.0, {'n_pred': 0, 'n_correct': 0}
        h = self.decode(concepts, idx, pos)[valid]           # (M, H)
        logits = self.lm_logits(h)                            # (M, V): never (B, N, V)
        labels = torch.gather(targets, 1, pos)[valid]         # (M,)
        loss = F.cross_entropy(logits.float(), labels)
        with torch.no_grad():
            n_correct = (logits.argmax(-1) == labels).sum()
        return None, loss, {'n_pred': labels.numel(), 'n_correct': n_correct, 'concepts': concepts}


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

    def forward(self, q, concepts, cond=None):
        """q (B, M, H) queries; concepts (B, C, H); cond (B, H) timestep embedding."""
        kv = self.cross_attn.project_kv(concepts)
        if not self.time_cond:
            q = q + self.cross_attn(self.ln_1(q), kv)
            return q + self.mlp(self.ln_2(q))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(F.silu(cond))[:, None, :].chunk(6, dim=-1)
        q = q + gate1 * self.cross_attn(self.ln_1(q) * (1 + scale1) + shift1, kv)
        return q + gate2 * self.mlp(self.ln_2(q) * (1 + scale2) + shift2)


class DiffusionDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.time_emb = TimestepEmbedding(cfg) if cfg.time_cond else None
        self.layers = nn.ModuleList([DiffusionLayer(cfg) for _ in range(cfg.n_dec_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, concepts, pos, query_tok_emb, t):
        """concepts (B, C, H); pos (B, M); query_tok_emb (B, M, H) of the noisy ids; t (B,)."""
        q = query_tok_emb + self.wpe(pos)
        cond = self.time_emb(t) if self.time_emb is not None else None
        for layer in self.layers:
            q = layer(q, concepts, cond)
        return self.ln_f(q)  # (B, M, H)


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
    """

    def __init__(self, cfg):
        cfg.decoder = 'diffusion'
        super().__init__(cfg)
        if cfg.condition not in CONDITIONS:
            raise ConfigError(f"unknown condition '{cfg.condition}'; choose one of {', '.join(CONDITIONS)}")
        if cfg.mask_id < 0:
            raise ConfigError("ConceptDiffusion needs mask_id (from the data directory's meta.json)")
        self.decoder = DiffusionDecoder(cfg)
        self._finish_init()
        for layer in self.decoder.layers:  # AdaLN-Zero: every layer starts as the identity
            if cfg.time_cond:
                nn.init.zeros_(layer.adaLN.weight)
                nn.init.zeros_(layer.adaLN.bias)

    # --- the forward (noising) process
    def sample_t(self, B, generator, device):
        """Per-sample t ~ U(t_min, 1); stratified: one draw in each of B equal strata."""
        u = torch.rand(B, generator=generator, device=device)
        if self.cfg.stratified_t:
            u = (u + torch.arange(B, device=device)) / B
        return self.cfg.t_min + (1.0 - self.cfg.t_min) * u

    def maskable(self, idx, attn_mask=None):
        ok = ~torch.isin(idx, torch.tensor(self.cfg.special_ids, device=idx.device))
        return ok if attn_mask is None else ok & attn_mask

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
    def denoise(self, concepts, noisy, pos, t):
        """Hidden states (B, M, H) at positions pos of the noisy sequence, at noise level t (B,)."""
        return self.decoder(concepts, pos, self.encoder.wte(torch.gather(noisy, 1, pos)), t)

    def encoder_input(self, idx, noisy):
        return idx if self.cfg.condition == 'clean' else noisy

    def forward(self, idx, attn_mask=None, t=None, generator=None):
        """Training loss on a batch of clean ids (B, N). Returns (None, loss, stats).

        loss = sum over masked tokens of w·CE_smoothed / (number of maskable tokens), with
        w = 1/t (elbo_weight) or w = 1 divided by the masked fraction instead. With w = 1/t this
        is an unbiased Monte-Carlo estimate of the MDLM bound per token (without label smoothing)
        and stays on the scale of a cross-entropy: E[#masked] = t·#maskable."""
        B = idx.shape[0]
        if t is None:
            t = self.sample_t(B, generator, idx.device)
        noisy, masked, maskable = self.add_noise(idx, t, attn_mask, generator)
        concepts = self.encoder(self.encoder_input(idx, noisy), attn_mask)
        pos, valid = gather_positions(masked)
        h = self.denoise(concepts, noisy, pos, t)[valid]                          # (M, H)
        logits = self.lm_logits(h)                                                 # (M, V)
        labels = torch.gather(idx, 1, pos)[valid]
        ce = F.cross_entropy(logits.float(), labels, reduction='none', label_smoothing=self.cfg.label_smoothing)
        row = torch.arange(B, device=idx.device)[:, None].expand_as(pos)[valid]  # sample of each target
        if self.cfg.elbo_weight:
            loss = (ce / t[row]).sum() / maskable.sum().clamp(min=1)
        else:
            loss = ce.mean()
        with torch.no_grad():
            plain_ce = F.cross_entropy(logits.float(), labels)
            n_correct = (logits.argmax(-1) == labels).sum()
        return None, loss, {'n_pred': labels.numel(), 'n_correct': n_correct, 'ce': plain_ce,
                            'concepts': concepts}

    @torch.no_grad()
    def nll_bound(self, idx, attn_mask=None, n_grid=8, generator=None):
        """MDLM's upper bound on the NLL in nats per token: the continuous-time NELBO
        integral over t in (0, 1] by the midpoint rule on n_grid fixed levels, each a Monte-Carlo
        draw of the mask. Returns (sum of the bound over sequences, number of maskable tokens).
        Only meaningful for condition='noisy' (and 'prefix', conditionally on the prefix)."""
        B = idx.shape[0]
        total = torch.zeros((), device=idx.device, dtype=torch.float64)
        for k in range(n_grid):
            t = torch.full((B,), (k + 0.5) / n_grid, device=idx.device)
            noisy, masked, maskable = self.add_noise(idx, t, attn_mask, generator)
            concepts = self.encoder(self.encoder_input(idx, noisy), attn_mask)
            pos, valid = gather_positions(masked)
            logits = self.lm_logits(self.denoise(concepts, noisy, pos, t)[valid])
            nll = F.cross_entropy(logits.float(), torch.gather(idx, 1, pos)[valid], reduction='sum')
            total += nll.double() / t[0].double() / n_grid
        return total.item(), int(self.maskable(idx, attn_mask).sum())

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
                concepts = self.encoder(x, attn_mask)
                pos, valid = gather_positions(masked & attn_mask)
                logits = self.lm_logits(self.denoise(concepts, x, pos, t)).double()  # (B, M, V)
                logits[..., self.cfg.special_ids] = -float('inf')  # never predict [MASK], pad, ...
                if top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
                    logits = logits.masked_fill(logits < kth, -float('inf'))
                probs = F.softmax(logits, dim=-1)
                if temperature > 0:
                    u = torch.rand(logits.shape, generator=generator, device=x.device, dtype=torch.float64)
                    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
                    choice = (logits / temperature + gumbel).argmax(-1)
                else:
                    choice = logits.argmax(-1)
                confidence = probs.gather(-1, choice[..., None]).squeeze(-1)  # p of the chosen token
                # scatter back to (B, N); positions not eligible this step get -inf confidence
                conf_full = torch.full((B, N), -float('inf'), dtype=torch.float64, device=x.device)
                pred_full = x.clone()
                rows = torch.arange(B, device=x.device)[:, None].expand_as(pos)
                conf_full[rows[valid], pos[valid]] = confidence[valid]
                pred_full[rows[valid], pos[valid]] = choice[valid]
                conf_full[~eligible] = -float('inf')
                left = block_steps - s
                quota = torch.ceil(eligible.sum(1).double() / left).long()  # (B,)
                order = conf_full.argsort(dim=1, descending=True)
                commit = torch.zeros_like(eligible)
                commit.scatter_(1, order, torch.arange(N, device=x.device)[None, :] < quota[:, None])
                commit &= eligible
                x = torch.where(commit, pred_full, x)
                if trajectory is not None:
                    trajectory.append(x.clone())
        self.train(was_training)
        return x
