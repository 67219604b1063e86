"""
The HEAR transformer: Infinity's bitwise next-scale autoregressive backbone plus HEAR's two identity paths.

  backbone   [Infinity] text-conditioned blocks (shared AdaLN, cosine self-attention with 2-D RoPE, cross-attention,
             FFN), bitwise classifier head, block-causal training, KV-cached sampling with CFG (Eq. (8) [HEAR])
  global     Eq. (3)-(4) [HEAR]: global face tokens join the text tokens of every cross-attention
  local      Eq. (5)-(7) [HEAR]: a decoupled high-frequency cross-attention (W'_K, W'_V) added in every block
  weights    load_infinity(): the official Infinity checkpoints, strictly checked, HEAR-only parameters initialised

Parameter names follow the official state_dict so that loading is a rename (`block_chunks.{c}.module.{m}` ->
`blocks.{i}`). Attention is F.scaled_dot_product_attention everywhere (FlexAttention for the training mask on CUDA).

References:
  [Infinity] Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image Synthesis",
             arXiv:2412.04431 (official code FoundationVision/Infinity @ 4c27bbb)
  [VAR]      Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction",
             arXiv:2404.02905
  [HEAR]     "HEAR: High-frequency Enhanced AutoRegressive modeling for identity-preserving image generation",
             Sec. 3.3, Eq. (3)-(8)
  [RoFormer] Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", arXiv:2104.09864
  [PaLM]     Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", arXiv:2204.02311, App. B

Dimension letters: B batch, L tokens of all scales, l tokens of one scale, K scales, C model width, H heads,
hd head dim, T text tokens, Ct text width, N face tokens, d bits per token, h/w rows/cols of one scale.
"""

import functools
import math
import re
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from checkpoint import CheckpointMismatchError, load_strict, read_state_dict, short_list  # noqa: F401 (re-exported)
from tokenizer import add_scale, token_offsets

try:  # FlexAttention (torch >= 2.5) runs the block-causal mask tile by tile instead of as an L x L tensor
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    BlockMask = create_block_mask = flex_attention = None


@dataclass
class ModelConfig:
    depth: int = 4  # number of transformer blocks
    embed_dim: int = 256  # C: model width
    num_heads: int = 4  # attention heads; head_dim = C / num_heads must be a multiple of 4 (2-D RoPE)
    mlp_ratio: float = 4.0  # FFN hidden = round(C * mlp_ratio / 256) * 256 (official rounding)
    codebook_dim: int = 32  # d: bits per token = latent channels of the tokenizer
    text_channels: int = 256  # Ct: width of the text features; text pool heads = Ct // 128 (// 64 when C > 4096)
    text_maxlen: int = 64  # rows of the learned null caption cfg_uncond (the longest caption CFG can replace)
    num_levels: int = 15  # rows of lvl_embed (the most scales a schedule may have)
    norm_eps: float = 1e-6  # epsilon of every LayerNorm / RMSNorm
    drop_path_rate: float = 0.0  # stochastic depth on the SA and FFN branches, linear 0 -> rate over the blocks
    grad_checkpointing: bool = False  # recompute every block in the backward pass (saves activation memory)
    use_global_face: bool = False  # HEAR Eq. (3)-(4): global face tokens join the text of the cross-attention
    global_face_dim: int = 512  # width of the global face tokens v_g (projected to Ct by face_global_proj)
    global_face_tokens: int = 1  # text-width tokens face_global_proj makes of each v_g token (synthfaces: the looks)
    use_hf_adapter: bool = False  # HEAR Eq. (5)-(7): decoupled high-frequency cross-attention in every block
    hf_face_dim: int = 32  # width of the high-frequency face tokens v_hf (d of the face encoder's codes)
    attn_backend: str = "auto"  # training mask kernel: auto (FlexAttention on CUDA, else SDPA) | flex | sdpa

    def __post_init__(self):
        if self.attn_backend not in ("auto", "flex", "sdpa"):
            raise ValueError(f"attn_backend={self.attn_backend!r}: choose auto, flex or sdpa")
        if self.num_heads < 1 or self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must give a head_dim that is "
                             "a multiple of 4 (2-D RoPE splits it into row and column pairs)")
        heads = text_pool_heads(self.embed_dim, self.text_channels)
        if heads < 1 or self.embed_dim % heads:
            raise ValueError(f"text_channels {self.text_channels} gives {heads} text-pool heads (Ct // 128; // 64 if "
                             f"embed_dim > 4096); it must be >= 1 and divide embed_dim {self.embed_dim}")


# Official Infinity-2B sizes (infinity_2b_reg.pth, with the d32 BSQ-VAE); presets themselves live in the scripts.
INFINITY_2B = dict(depth=32, embed_dim=2048, num_heads=16, mlp_ratio=4.0, codebook_dim=32, text_channels=2048,
                   text_maxlen=512, drop_path_rate=0.1)

# substrings that mark the parameters HEAR adds to Infinity (everything else is the pretrained backbone)
HEAR_PARAM_MARKERS = ("face_global_proj.", "face_hf_proj.", ".mat_kv_hf.", ".v_bias_hf")


def text_pool_heads(C, Ct):
    """Heads of the text attention pool, as official: Ct // 128, or Ct // 64 when C > 4096 (the official "head_dim"
    only fixes this count); each head has C // heads channels (2B: 16 of 128; tiny fixture, C 128, Ct 256: 2 of 64)."""
    return Ct // (64 if C > 4096 else 128)


def mlp_hidden(C, mlp_ratio):
    """FFN width: Python round (half to even) of C * ratio / 256, times 256 [Infinity]; at least 256."""
    return max(round(C * mlp_ratio / 256), 1) * 256


# -----------------------------------------------------------------------------
# 2-D rotary position embedding [RoFormer] as Infinity uses it (rope2d_normalized_by_hw=2)


def rope_2d_positions(schedule, rope_grid):
    """Row and column (L,) int64 of every token of `schedule` [(h, w), ...] on the template's final '1M' grid
    (gh, gw) = rope_grid: token (i, j) of an h x w scale sits at (round(i gh / h), round(j gw / w)), computed in
    float32 with round-half-even as official (rope2d_normalized_by_hw=2). Tokens are row-major (h outer, w inner)."""
    gh, gw = rope_grid
    rows = [(torch.arange(h) * (gh / h)).round().long().repeat_interleave(w) for h, w in schedule]
    cols = [(torch.arange(w) * (gw / w)).round().long().repeat(h) for h, w in schedule]
    return torch.cat(rows), torch.cat(cols)


def rope_2d_table(schedule, rope_grid, head_dim, base=10000.0):
    """cos, sin (L, head_dim/2) of the 2-D RoPE angles: pairs 0 .. hd/4-1 rotate with the row position, the next
    hd/4 with the column position, both with inv_freq[j] = base^(-2j / (hd/2))."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))  # (hd/4,)
    rows, cols = rope_2d_positions(schedule, rope_grid)  # (L,) each
    angle = torch.cat((rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq), dim=-1)  # (L, hd/2)
    return torch.cos(angle), torch.sin(angle)


def apply_rope_2d(x, cos, sin):
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x (B, H, l, hd) by the angles of cos/sin (l, hd/2)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, l, hd/2) each
    return torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1).flatten(-2)  # (B, H, l, hd)


@functools.cache
def _compiled_flex_attention():
    """flex_attention is only fused when compiled; compile it once, on first use on CUDA (never at import)."""
    return torch.compile(flex_attention, dynamic=False)


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """text_norm [Infinity]: x * rsqrt(mean(x^2) + eps) * w, in fp32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SelfAttention(nn.Module):
    """Cosine self-attention with 2-D RoPE [Infinity]: q, k are L2-normalised, q is multiplied by a learned per-head
    temperature exp(min(s_h, ln 100)), and the softmax scale is 1."""

    def __init__(self, C, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, C // num_heads
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)  # rows [q; k; v], heads contiguous
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))  # (the official K bias is a zero buffer)
        # s_h, the log temperature per head, (1, H, 1, 1); the name is the official checkpoint key
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(C, C)

    def forward(self, x, rope, attn_mask=None, cache=None):
        """x (B, n, C), rope = (cos, sin) of these n tokens -> (B, n, C). `cache` (dict) holds the keys/values of
        earlier scales during KV-cached sampling; attn_mask is None there, a bool (L, L) or a BlockMask in training."""
        B, n, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))  # (3C,)
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, n, hd) each
        q = F.normalize(q.float(), dim=-1) * self.scale_mul_1H11.clamp_max(math.log(100.0)).exp()
        k = F.normalize(k.float(), dim=-1)
        q, k = apply_rope_2d(q, *rope).to(v.dtype), apply_rope_2d(k, *rope).to(v.dtype)
        if cache is not None:  # keys/values are cached after normalisation and RoPE
            if "k" in cache:
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)  # (B, H, L_seen, hd)
            cache["k"], cache["v"] = k, v
        if BlockMask is not None and isinstance(attn_mask, BlockMask):
            attend = _compiled_flex_attention() if q.is_cuda else flex_attention
            out = attend(q, k, v, block_mask=attn_mask, scale=1.0)  # (B, H, n, hd)
        else:
            # NOTE: a tensor attn_mask (training without FlexAttention) rules out SDPA's flash kernel;
            # KV-cached sampling passes None, so it is flash-eligible.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)  # (B, H, n, hd)
        return self.proj(out.transpose(1, 2).reshape(B, n, C))


class CrossAttention(nn.Module):
    """Softmax cross-attention to a key-padded token set, scale 1/sqrt(hd) [Infinity]. forward: a block's attention to
    the text (+ global face) tokens, Eq. (4), plus HEAR's decoupled high-frequency attention, Eq. (6)-(7), when
    hf_adapter=True. pool: the text attention pool (pool=True), whose query is one learned vector per head."""

    def __init__(self, C, kv_dim, num_heads, pool=False, hf_adapter=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, C // num_heads
        self.mat_q = nn.Parameter(torch.zeros(1, num_heads, C // num_heads)) if pool else nn.Linear(C, C)
        self.mat_kv = nn.Linear(kv_dim, 2 * C, bias=False)  # rows [k; v]: W_K, W_V of Eq. (4)
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.proj = nn.Linear(C, C)
        if hf_adapter:  # W'_K, W'_V of Eq. (6); initialised as a copy of mat_kv / v_bias
            self.mat_kv_hf = nn.Linear(C, 2 * C, bias=False)
            self.v_bias_hf = nn.Parameter(torch.zeros(C))

    def _keys_values(self, src, weight, v_bias, cache=None, name=None):
        """src (B, T, kv_dim) -> keys, values (B, H, T, hd) each; K has no bias, V has v_bias. In KV-cached sampling the
        condition is the same at every scale: they are computed at the first scale and kept in cache[name]."""
        if cache is not None and name in cache:
            return cache[name]
        B, T, _ = src.shape
        kv = F.linear(src, weight, torch.cat((torch.zeros_like(v_bias), v_bias)))  # (B, T, 2C)
        k, v = kv.view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            cache[name] = (k, v)
        return k, v

    def attention(self, q, src, src_mask, cache=None):
        """softmax(Q K^T / sqrt(hd)) V with K = W_K src, V = W_V src over the valid tokens of each sample (the official
        varlen flash call). q (B, H, l, hd), src (B, T, kv_dim), src_mask (B, T) bool, True = real token
        -> (B, H, l, hd). NOTE: the key-padding mask rules out SDPA's flash kernel."""
        k, v = self._keys_values(src, self.mat_kv.weight, self.v_bias, cache, "ca")  # (B, H, T, hd)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=src_mask[:, None, None, :])

    def hf_attention(self, q, hf, hf_null, cache=None):
        """HEAR's decoupled high-frequency cross-attention: q (B, H, l, hd) of Eq. (4), hf (B_f, N, C) the face tokens
        v_hf of rows :B_f (B_f <= B), hf_null (1, 1, C) v_hf of a zero face token -> Z_hf (B, H, l, hd). Rows B_f.. are
        CFG's unconditional half (sampling_condition): their face tokens are all zero, which W_hf maps to one vector,
        so their N keys are equal, the softmax is uniform and Z_hf is that token's value V', at any N. They get it
        directly, instead of (B - B_f) x N copies of that token in every block's KV cache."""
        k, v = self._keys_values(hf, self.mat_kv_hf.weight, self.v_bias_hf, cache, "ca_hf")  # (B_f, H, N, hd)
        # Eq. (6) [HEAR]: Z_hf = softmax(Q K'^T / sqrt(hd)) V', K' = W'_K v_hf, V' = W'_V v_hf, the Q of Eq. (4)
        z_hf = F.scaled_dot_product_attention(q[: len(hf)], k.to(q.dtype), v.to(q.dtype))  # (B_f, H, l, hd)
        if len(hf) < len(q):
            v_null = self._keys_values(hf_null, self.mat_kv_hf.weight, self.v_bias_hf)[1]  # (1, H, 1, hd)
            z_hf = torch.cat((z_hf, v_null.to(q.dtype).expand(len(q) - len(hf), -1, q.shape[2], -1)))
        return z_hf

    def pool(self, text, mask):
        """The text attention pool [Infinity]: the learned query mat_q (one per head) attends to text (B, T, Ct), mask
        (B, T) -> (B, C)."""
        q = self.mat_q.unsqueeze(2).expand(len(text), -1, -1, -1)  # (B, H, 1, hd)
        return self.proj(self.attention(q, text, mask).transpose(1, 2).reshape(len(text), 1, -1)).squeeze(1)

    def forward(self, x, c, cache=None):
        """x (B, l, C) normalised image tokens, c: Condition, cache: the block's sampling cache or None -> (B, l, C)."""
        B, n, _ = x.shape
        q = self.mat_q(x).view(B, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, l, hd): Q = W_Q Z
        # Eq. (4) [HEAR]: Z_g = softmax(Q K^T / sqrt(hd)) V, K = W_K f, V = W_V f, f = the text (+ global face) tokens
        z = self.attention(q, c.kv, c.kv_mask, cache)
        if c.hf is not None and c.id_scale != 0:
            # Eq. (7) [HEAR]: Z' = Z_g + lambda Z_hf. NOTE: differs from [HEAR] Eq. (7), which has no lambda: lambda is
            # 1 in training (the paper's equation) and id_scale at sampling, the identity-strength knob of IP-Adapter
            z = z + c.id_scale * self.hf_attention(q, c.hf, c.hf_null, cache)
        return self.proj(z.transpose(1, 2).reshape(B, n, -1))  # (B, l, C)


class TextAttentivePool(nn.Module):
    """Pools the normalised text into one vector (B, C) with a learned query [Infinity]: the sos token, every AdaLN's
    input."""

    def __init__(self, C, Ct):
        super().__init__()
        self.ca = CrossAttention(C, Ct, text_pool_heads(C, Ct), pool=True)

    def forward(self, text, mask):
        """text (B, T, Ct), mask (B, T) -> (B, C)"""
        return self.ca.pool(text, mask)


class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, C, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, hidden), nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Condition(NamedTuple):
    """What the blocks read besides the image tokens; built once per forward / generate call."""

    cond: torch.Tensor  # (B, C) pooled text: the sos token, the AdaLN and head-AdaLN input
    modulation: torch.Tensor  # (B, 1, 6, C) shared AdaLN gammas, scales, shifts from cond (official name: gss)
    kv: torch.Tensor  # (B, T', C) cross-attention source f of Eq. (3): projected text (+ global face) tokens
    kv_mask: torch.Tensor  # (B, T') bool, True = real token
    hf: torch.Tensor | None  # (B_f, N, C) projected high-frequency face tokens v_hf of Eq. (5) of rows :B_f, or None
    hf_null: torch.Tensor | None  # (1, 1, C) v_hf of a zero face token, for rows B_f.. (CrossAttention.hf_attention)
    id_scale: float  # lambda of Eq. (7)


class Block(nn.Module):
    """Infinity CrossAttnBlock: x += g1 SA(AdaLN1 x); x += CA(ca_norm x) (no AdaLN, weight 1); x += g2 FFN(AdaLN2 x)."""

    def __init__(self, cfg, drop_path):
        super().__init__()
        C = cfg.embed_dim
        self.eps, self.drop_path = cfg.norm_eps, drop_path
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))  # per-block offset of the shared AdaLN
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads, hf_adapter=cfg.use_hf_adapter)
        self.ffn = FFN(C, mlp_hidden(C, cfg.mlp_ratio))
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)

    def _drop(self, y):
        """Stochastic depth: drop the whole branch of a sample with probability drop_path (training only)."""
        if not self.training or self.drop_path == 0:
            return y
        keep = y.new_empty(y.shape[0], 1, 1).bernoulli_(1 - self.drop_path)
        return y * keep / (1 - self.drop_path)

    def forward(self, x, c, rope, attn_mask=None, cache=None):
        """x (B, l, C), c: Condition -> (B, l, C)"""
        # official order along dim 2: gamma1, gamma2, scale1, scale2, shift1, shift2
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + c.modulation).unbind(2)  # (B, 1, C) each
        h = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1 + scale1) + shift1
        x = x + self._drop(self.sa(h, rope, attn_mask, cache) * gamma1)
        x = x + self.ca(self.ca_norm(x), c, cache)
        h = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1 + scale2) + shift2
        return x + self._drop(self.ffn(h) * gamma2)


class AdaLNBeforeHead(nn.Module):
    """LayerNorm (no affine) modulated by (scale, shift) from the pooled text [Infinity]."""

    def __init__(self, C, eps):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, cond):
        """x (B, l, C), cond (B, C) -> (B, l, C)"""
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)  # (B, 1, C) each
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1 + scale) + shift


def sample_bits(logits, top_k=900, top_p=0.97, generator=None):
    """logits (B, n, 2) of n two-way bit classifiers -> bits (B, n) int64, as the official sampler: top-k (a no-op
    for k >= 2), top-p (drop the smaller class when its probability <= 1 - top_p), then ONE torch.multinomial call
    over (B*n, 2) rows in row-major order (so a seeded CPU generator reproduces the official draws)."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1] = False  # always keep the most likely class
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -torch.inf)
    probs = logits.softmax(-1).view(-1, logits.shape[-1])  # (B*n, 2)
    return torch.multinomial(probs, 1, replacement=True, generator=generator).view(logits.shape[:2])


def bitwise_loss(logits, bits, token_weights=None):
    """Bitwise classifier loss [Infinity]: cross-entropy of the d two-way classifiers, mean over bits, weighted sum
    over tokens (token_weights (L,), or (B, L) one row per sample; None: uniform 1/L), mean over the batch.
    logits (B, L, 2d), bits (B, L, d) in {0, 1} -> scalar."""
    B, L, d = bits.shape
    ce = F.cross_entropy(logits.float().view(B, L, d, 2).permute(0, 3, 1, 2), bits.long(), reduction="none")  # (B,L,d)
    w = torch.full((L,), 1.0 / L, device=bits.device) if token_weights is None else token_weights
    return (ce.mean(-1) * w).sum(-1).mean()


def scale_loss_weights(schedule, reweight=True):
    """Token weights (L,) summing to 1: uniform, or the official reweight_loss_by_scale (w_k proportional to
    sqrt(h_K w_K / (h_k w_k)) for each token of scale k, so coarse scales are not drowned by fine ones)."""
    last = schedule[-1][0] * schedule[-1][1]
    w = torch.cat([torch.full((h * w,), math.sqrt(last / (h * w)) if reweight else 1.0) for h, w in schedule])
    return w / w.sum()


def _per_scale(value, K, name):
    """A scalar, or a list / tuple of one value per scale -> K values (generate's cfg_scale, tau and id_scale)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * K
    if len(values) != K:
        raise ValueError(f"{name} needs one value per scale ({K}), got {len(values)}")
    return values


# -----------------------------------------------------------------------------
# The model


class HEARTransformer(nn.Module):
    """Infinity transformer with HEAR's global face tokens (Eq. (3)-(4)) and high-frequency adapter (Eq. (5)-(7))."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, Ct, d = cfg.embed_dim, cfg.text_channels, cfg.codebook_dim
        # text path: RMSNorm, then (a) attention pool -> cond / sos, (b) MLP -> cross-attention source
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, Ct))  # learned null caption for CFG
        self.text_norm = RMSNorm(Ct, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(C, Ct)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))  # W_g
        # image tokens: first token = sos + pos_start; then word_embed of the continuous cumulative code map
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.word_embed = nn.Linear(d, C)
        self.lvl_embed = nn.Embedding(cfg.num_levels, C)  # one row per scale, added once before the first block
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))  # shared AdaLN of all blocks
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # Python floats: meta-safe
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * d)  # [..., 2k] = logit of bit k = 0, [..., 2k + 1] = logit of bit k = 1
        # HEAR-only parameters
        if cfg.use_global_face:
            self.face_global_proj = nn.Linear(cfg.global_face_dim, cfg.global_face_tokens * Ct)  # v_g -> text width
        if cfg.use_hf_adapter:
            self.face_hf_proj = nn.Linear(cfg.hf_face_dim, C)  # W_hf of Eq. (5)
        self._block_masks = {}  # FlexAttention BlockMask per (schedule, device), rebuilt on demand
        self.init_weights()

    # ----- initialisation and parameter groups

    @torch.no_grad()
    def init_weights(self):
        """Fresh-model init after the official special_init [Infinity]: truncated normal std sqrt(1/(3C)) for every
        Linear / Embedding, tiny AdaLN projections (1e-3) and residual gammas (5e-6), head weights x0.02, output
        projections / sqrt(2 depth). Loading official weights overwrites all of it except the HEAR-only parameters."""
        C, depth = self.cfg.embed_dim, self.cfg.depth
        std = (1.0 / (3 * C)) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cfg_uncond, std=self.cfg.text_channels**-0.5)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.text_proj_for_sos.ca.mat_q, std=std)
        for lin in (self.shared_ada_lin[1], self.head_nm.ada_lin[1]):
            lin.weight.mul_(1e-3)
        self.head.weight.mul_(0.02)
        for b in self.blocks:
            for lin in (b.sa.proj, b.ca.proj, b.ffn.fc2):
                lin.weight.div_(math.sqrt(2 * depth))
            nn.init.normal_(b.ada_gss, std=C**-0.5)
            b.ada_gss[:, :, :2].mul_(5e-6)  # gamma1, gamma2: residual branches start almost closed
            b.ada_gss[:, :, 2:].mul_(1e-3)
        self.init_hf_adapter_from_backbone()

    @torch.no_grad()
    def init_hf_adapter_from_backbone(self):
        """Eq. (6) [HEAR]: W'_K, W'_V start as copies of the block's W_K, W_V (mat_kv and its v_bias)."""
        if self.cfg.use_hf_adapter:
            for b in self.blocks:
                b.ca.mat_kv_hf.weight.copy_(b.ca.mat_kv.weight)
                b.ca.v_bias_hf.copy_(b.ca.v_bias)

    def hear_parameter_names(self):
        """Names of the parameters HEAR adds to Infinity (face projections, W'_K / W'_V and their v bias)."""
        return [n for n, _ in self.named_parameters() if any(m in n for m in HEAR_PARAM_MARKERS)]

    def set_trainable(self, train_params="all"):
        """Which parameters train -> their names. all: every one; hear: HEAR's new parameters only (W_hf, W'_K, W'_V
        with its V bias, the global projection); adapter: those + every block cross-attention's W_Q, W_K, W_V (with
        their biases) + W_g (text_proj_for_ca), the projections Eq. (3)-(4) call trainable."""
        if train_params not in ("all", "adapter", "hear"):
            raise ValueError(f"train_params={train_params!r}: choose all, adapter or hear")
        new = set(self.hear_parameter_names())
        for n, p in self.named_parameters():
            attn = n.startswith("blocks.") and any(s in n for s in (".ca.mat_q.", ".ca.mat_kv.", ".ca.v_bias"))
            proj = attn or n.startswith("text_proj_for_ca.")
            p.requires_grad_(train_params == "all" or n in new or (train_params == "adapter" and proj))
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def num_params(self, trainable_only=False):
        """Number of parameters (all, or only those with requires_grad)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def estimate_flops_per_token(self, schedule, text_len=0, num_global_tokens=0, num_hf_tokens=0):
        """Training FLOPs per image token (forward + backward) [PaLM App. B], the one count behind train.py's and
        bench.py's MFU (docs/performance.md): 6 N + 12 * depth * C * keys. N: the parameters every image token passes
        through (blocks, word_embed, head; not the cross-attention K/V projections, which run on text and face tokens,
        nor head_nm's once-per-sample AdaLN). keys: what one image query attends to in a block = the mean number of
        image tokens the block-causal mask shows it (model FLOPs, whatever the kernel skips) + text_len (as padded) +
        num_global_tokens (joined to the text, Eq. (3)) + num_hf_tokens (the adapter's keys, Eq. (6)). Per-sample
        work (text and face projections, the shared AdaLN) and the encoders are left out."""
        sizes = [h * w for h, w in schedule]
        seen = sum(s * sum(sizes[: k + 1]) for k, s in enumerate(sizes)) / sum(sizes)  # mean visible self-attn keys
        per_token = [p.numel() for n, p in self.named_parameters() if n.startswith(("blocks.", "word_embed.", "head."))
                     and ".mat_kv" not in n and "v_bias_hf" not in n and not n.endswith("ca.v_bias")]
        keys = seen + text_len + num_global_tokens + num_hf_tokens
        return 6 * sum(per_token) + 12 * self.cfg.depth * self.cfg.embed_dim * keys

    # ----- conditioning

    def null_text(self, T):
        """The learned null caption (T, Ct); with lengths len_b its valid rows are cfg_uncond[:len_b] (official)."""
        if T > self.cfg.text_maxlen:
            raise ValueError(f"captions of {T} tokens exceed text_maxlen {self.cfg.text_maxlen} (rows of cfg_uncond)")
        return self.cfg_uncond[:T]

    def drop_condition(self, text, drop, face_global=None, face_hf=None):
        """CFG training dropout: samples with drop[b] (B,) bool get the null caption cfg_uncond[:len_b] and zero face
        tokens (the same null condition that generate() uses for its unconditional half)."""
        keep = ~drop.view(-1, 1, 1)  # (B, 1, 1)
        text = torch.where(keep, text, self.null_text(text.shape[1]).to(text.dtype))
        face_global = None if face_global is None else face_global * keep
        face_hf = None if face_hf is None else face_hf * keep
        return text, face_global, face_hf

    def encode_condition(self, text, text_lens, face_global=None, face_hf=None, id_scale=1.0):
        """text (B, T, Ct) zero-padded, text_lens (B,) >= 1, face_global (B, N_g, global_face_dim) or None,
        face_hf (B_f <= B, N_hf, hf_face_dim) or None (rows B_f.. have zero face tokens, see
        CrossAttention.hf_attention) -> Condition. Runs in fp32 (autocast off), as official."""
        for tokens, flag in ((face_global, "use_global_face"), (face_hf, "use_hf_adapter")):
            if tokens is not None and not getattr(self.cfg, flag):
                raise ValueError(f"face tokens given, but the model was built with {flag}=False")
        B, T, _ = text.shape
        mask = torch.arange(T, device=text.device) < text_lens.to(text.device)[:, None]  # (B, T) key padding
        with torch.autocast(text.device.type, enabled=False):
            t = self.text_norm(text)  # (B, T, Ct)
            # The pooled cond stays text-only: it is the sos token and drives every AdaLN and the head, all pretrained
            # on text alone; face tokens there would shift the modulation of every block. HEAR injects identity only
            # through the cross-attentions (Eq. (3)-(7)).
            cond = self.text_proj_for_sos(t, mask)  # (B, C)
            kv, kv_mask = t, mask
            if face_global is not None:
                # Eq. (3) [HEAR]: f = Concat(t, v_g) W_g. v_g is projected into the text width and normalised like
                # the text; W_g is the pretrained text_proj_for_ca. The face rows follow the padded text block; with
                # the key mask this equals per-sample [len_b text rows, N_g face rows] (attention ignores key order).
                # NOTE: differs from [HEAR] Sec. 3.3.1, which aligns v_g with the text "through a pre-trained and
                # frozen word embedding layer" but does not say how a continuous vector passes a lookup table; a new
                # trainable linear map into the text width (face_global_proj) is the reading that can be built.
                v_g = self.text_norm(self.face_global_proj(face_global.float()).view(B, -1, t.shape[-1]))
                kv = torch.cat((t, v_g), dim=1)  # (B, T + N_g, Ct)
                kv_mask = torch.cat((mask, mask.new_ones(B, v_g.shape[1])), dim=1)
            kv = self.text_proj_for_ca(kv)  # (B, T', C)
            hf = hf_null = None
            if face_hf is not None:
                hf = self.face_hf_proj(face_hf.float())  # Eq. (5): v_hf = v[FT:] W_hf, (B_f, N, C)
                hf_null = self.face_hf_proj.bias.float().view(1, 1, -1)  # W_hf of a zero face token: its bias
            modulation = self.shared_ada_lin(cond).view(B, 1, 6, -1)  # (B, 1, 6, C)
        return Condition(cond, modulation, kv, kv_mask, hf, hf_null, id_scale)

    def compile_blocks(self, **kwargs):
        """torch.compile each block in place: one shared graph, whatever the depth; parameter names do not change."""
        for block in self.blocks:
            block.compile(**kwargs)

    def block_causal_mask(self, schedule, scale_id):
        """Training mask from each token's scale (L,), built from the Python schedule (a compile-friendly static shape):
        a token sees its own and earlier scales [VAR]. FlexAttention BlockMask on CUDA, else (L, L) bool for SDPA."""
        device = scale_id.device
        use_flex = self.cfg.attn_backend == "flex" or (self.cfg.attn_backend == "auto" and device.type == "cuda")
        if not use_flex or create_block_mask is None:
            return scale_id[:, None] >= scale_id[None, :]  # (L, L)
        key = (tuple(map(tuple, schedule)), str(device))
        if key not in self._block_masks:
            L = len(scale_id)
            self._block_masks[key] = create_block_mask(lambda b, h, q, k: scale_id[q] >= scale_id[k], None, None, L, L,
                                                       device=device)
        return self._block_masks[key]

    def get_logits(self, x, cond):
        """x (B, l, C), cond (B, C) -> bit logits (B, l, 2d), in fp32 (autocast off, as official)."""
        with torch.autocast(x.device.type, enabled=False):
            return self.head(self.head_nm(x.float(), cond.float()))

    # ----- training forward

    def forward(self, text, text_lens, scale_inputs, schedule, rope_grid, face_global=None, face_hf=None,
                id_scale=1.0, drop_cond=None):
        """Teacher-forced logits, Eq. (8) [HEAR] with the block-causal mask. text (B, T, Ct) zero-padded, text_lens
        (B,), scale_inputs (B, L - 1, d) = inputs of scales 2..K, the trilinear-downsampled cumulative codes (official
        name: x_BLC_wo_prefix), schedule [(h, w), ...], rope_grid (rows, cols), drop_cond (B,) bool for CFG dropout
        -> logits (B, L, 2d)."""
        L = token_offsets(schedule)[-1]
        if scale_inputs.shape[1] != L - 1:
            raise ValueError(f"scale_inputs has {scale_inputs.shape[1]} tokens; the schedule needs L-1 = {L - 1}")
        if drop_cond is not None:
            text, face_global, face_hf = self.drop_condition(text, drop_cond, face_global, face_hf)
        c = self.encode_condition(text, text_lens, face_global, face_hf, id_scale)
        x = torch.cat((c.cond[:, None] + self.pos_start, self.word_embed(scale_inputs)), dim=1)  # (B, L, C)
        scale_id = torch.cat([torch.full((h * w,), k, device=x.device) for k, (h, w) in enumerate(schedule)])  # (L,)
        x = x + self.lvl_embed(scale_id)
        rope = tuple(t.to(x.device) for t in rope_2d_table(schedule, rope_grid, self.blocks[0].sa.head_dim))
        mask = self.block_causal_mask(schedule, scale_id)  # Eq. (8): scale k sees scales <= k only
        for block in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                x = checkpoint(block, x, c, rope, mask, use_reentrant=False)
            else:
                x = block(x, c, rope, mask)
        return self.get_logits(x, c.cond)  # (B, L, 2d)

    # ----- sampling

    def sampling_condition(self, text, text_lens, negative_text=None, negative_lens=None, face_global=None,
                           face_hf=None, guided=True):
        """The Condition of generate() (its id_scale is set per scale there). guided (CFG): a batch of 2B rows [cond;
        uncond], uncond = the learned null caption cfg_uncond[:len_b] with the positive caption's own lengths
        (official) or the negative prompt, and zero face tokens: the null condition that drop_condition() trains."""
        if (text_lens < 1).any():
            raise ValueError("every caption needs at least one token (text_lens >= 1)")
        if not guided:
            return self.encode_condition(text, text_lens, face_global, face_hf)
        B = text.shape[0]
        if negative_text is None:
            negative_text, negative_lens = self.null_text(text.shape[1]).expand(B, -1, -1), text_lens
        elif negative_lens is None:
            raise ValueError("negative_text needs negative_lens")
        T = max(text.shape[1], negative_text.shape[1])  # both padded with zero rows to T tokens
        text = torch.cat([F.pad(t.to(text), (0, 0, 0, T - t.shape[1])) for t in (text, negative_text)])  # (2B, T, Ct)
        lens = torch.cat((text_lens, negative_lens.to(text_lens)))
        face_global = None if face_global is None else torch.cat((face_global, torch.zeros_like(face_global)))
        return self.encode_condition(text, lens, face_global, face_hf)

    @torch.no_grad()
    def generate(self, text, text_lens, schedule, rope_grid, cfg_scale=3.0, tau=1.0, top_k=900, top_p=0.97,
                 generator=None, negative_text=None, negative_lens=None, face_global=None, face_hf=None, id_scale=1.0):
        """KV-cached next-scale sampling, Eq. (8) [HEAR], with classifier-free guidance on the logits as the official
        autoregressive_infer_cfg; each scale's bits are drawn by sample_bits from its logits after CFG and 1/tau.
        cfg_scale, tau and id_scale (lambda of Eq. (7); 0 turns the high-frequency adapter off): a scalar, or a list of
        one value per scale. Returns {"latent": (B, d, h_K, w_K) summed codes for the decoder, "bits": [(B, h, w, d)
        int64 per scale], "per_scale": [(B, d, h_K, w_K) running sum after each scale, full latent size] (Fig. 8)}."""
        B, K = text.shape[0], len(schedule)
        cfgs, taus, id_scales = (_per_scale(v, K, name) for v, name in
                                 ((cfg_scale, "cfg_scale"), (tau, "tau"), (id_scale, "id_scale")))
        guided = any(s != 1 for s in cfgs)
        c = self.sampling_condition(text, text_lens, negative_text, negative_lens, face_global, face_hf, guided)
        cos, sin = (t.to(text.device) for t in rope_2d_table(schedule, rope_grid, self.blocks[0].sa.head_dim))
        offsets = token_offsets(schedule)
        x = c.cond[:, None] + self.pos_start  # (B', 1, C), B' = 2B with CFG: the sos token is scale 1's input
        caches, out = [{} for _ in self.blocks], {"bits": [], "per_scale": []}
        summed = torch.zeros(B, self.cfg.codebook_dim, *schedule[-1], device=text.device)  # (B, d, h_K, w_K)
        for k, (h, w) in enumerate(schedule):
            ck = c._replace(id_scale=id_scales[k])
            # parity: RoPE rows are sliced at the scale's token offset (the official unfused path drops that offset in
            # KV-cached inference; a known bug not copied here)
            rope = (cos[offsets[k]:offsets[k + 1]], sin[offsets[k]:offsets[k + 1]])
            x = x + self.lvl_embed.weight[k]
            for block, cache in zip(self.blocks, caches):
                x = block(x, ck, rope, None, cache)  # no mask: the cache holds exactly the visible keys
            logits = self.get_logits(x, c.cond).mul(1 / taus[k])  # (B', l, 2d)
            if guided:  # CFG on logits: cfg * l_c / tau + (1 - cfg) * l_u / tau
                logits = cfgs[k] * logits[:B] + (1 - cfgs[k]) * logits[B:] if cfgs[k] != 1 else logits[:B]
            bits = sample_bits(logits.reshape(B, -1, 2), top_k, top_p, generator).view(B, h, w, -1)  # (B, h, w, d)
            summed, nxt = add_scale(summed, bits, schedule, k)  # Eq. (12) running sum; scale k+1's input tokens
            out["bits"].append(bits), out["per_scale"].append(summed)
            if nxt is not None:
                x = self.word_embed(nxt)  # (B, l', C)
                x = x.repeat(2, 1, 1) if guided else x
        return {"latent": summed, **out}


# -----------------------------------------------------------------------------
# Official Infinity weights


def load_infinity(path_or_state_dict, **hear_overrides):
    """Build a HEARTransformer from official Infinity weights (or our own checkpoints) and load them strictly.
    Every size is inferred from the tensors; `hear_overrides` sets ModelConfig fields (use_global_face, hf_face_dim,
    drop_path_rate, ...). Returns (model in fp32 on CPU, eval mode; report dict with `loaded`, `newly_initialized`,
    `ignored`, `config`). Raises CheckpointMismatchError (a ValueError) with one line on any mismatch."""
    sd = read_state_dict(path_or_state_dict, unwrap=("model",))  # ours wrap the state_dict in "model"
    chunk = [re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", k) for k in sd]
    per_chunk = 1 + max((int(m[2]) for m in chunk if m), default=0)  # official: block_chunks.{c}.module.{m}
    sd = {re.sub(r"^block_chunks\.(\d+)\.module\.(\d+)\.", lambda m: f"blocks.{int(m[1]) * per_chunk + int(m[2])}.",
                 k): v for k, v in sd.items()}
    # zero_k_bias: official always-zero K-bias buffers; we add no K bias, so they must be zero
    ignored = sorted(k for k in sd if k.endswith("zero_k_bias"))
    if any(not sd[k].is_meta and sd[k].any() for k in ignored):  # (meta tensors: a key/shape check only)
        raise CheckpointMismatchError(f"load_infinity: non-zero zero_k_bias buffers ({short_list(ignored)}); "
                                      "this is not an Infinity checkpoint this code can represent")
    sd = {k: v for k, v in sd.items() if not k.endswith("zero_k_bias")}
    need = ["word_embed.weight", "text_norm.weight", "cfg_uncond", "lvl_embed.weight", "blocks.0.sa.scale_mul_1H11",
            "blocks.0.ffn.fc1.weight"]
    if absent := [k for k in need if k not in sd]:
        raise CheckpointMismatchError(
            f"load_infinity: cannot infer the model sizes, missing {short_list(absent)}; pass an official Infinity "
            "transformer state_dict (e.g. infinity_2b_reg.pth), not a VAE or a training checkpoint")
    C, d = sd["word_embed.weight"].shape
    sizes = dict(depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), embed_dim=C,
                 num_heads=sd["blocks.0.sa.scale_mul_1H11"].shape[1], codebook_dim=d,
                 mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / C, text_channels=sd["text_norm.weight"].shape[0],
                 text_maxlen=sd["cfg_uncond"].shape[0], num_levels=sd["lvl_embed.weight"].shape[0])
    if "face_global_proj.weight" in sd:  # our own HEAR checkpoints carry the HEAR parameters
        rows, dim = sd["face_global_proj.weight"].shape
        sizes.update(use_global_face=True, global_face_dim=dim, global_face_tokens=rows // sizes["text_channels"])
    if "face_hf_proj.weight" in sd:
        sizes.update(use_hf_adapter=True, hf_face_dim=sd["face_hf_proj.weight"].shape[1])
    cfg = ModelConfig(**{**sizes, **hear_overrides})
    with torch.device("meta"):  # no memory, no init: every tensor comes from `sd` or is initialised below
        model = HEARTransformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    new = [k for k in expected if k not in sd and any(m in k for m in HEAR_PARAM_MARKERS)]
    load_strict(model, {k: v.float() for k, v in sd.items()}, "load_infinity", "pass an unmodified official Infinity "
                "transformer state_dict, with HEAR options (use_global_face, use_hf_adapter, ...) matching its HEAR "
                "keys", optional=new, assign=True)  # assign: the fp32 tensors replace the meta ones
    for name in new:  # the HEAR-only parameters are still on the meta device: allocate and initialise them
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, p := nn.Parameter(torch.empty(expected[name])))
        nn.init.trunc_normal_(p, std=(3 * cfg.embed_dim) ** -0.5) if name.endswith("weight") else nn.init.zeros_(p)
    if any(".mat_kv_hf." in k for k in new):
        model.init_hf_adapter_from_backbone()  # W'_K, W'_V = copies of the loaded W_K, W_V (Eq. 6)
    report = dict(loaded=sorted(sd), newly_initialized=new, ignored=ignored, config=asdict(cfg))
    return model.eval(), report
