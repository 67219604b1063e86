"""
The bitwise multi-scale tokenizer of Infinity: BSQ-VAE + multi-scale residual BSQ quantizer.

Contents, top to bottom: scale schedules; resampling and bit <-> code conversions; the multi-scale residual BSQ
quantizer (Eq. (9)-(10)) with its training regularisers; bitwise self-correction (Eq. (11)-(12)); the conv
encoder/decoder in the official module layout; `load_infinity_vae()` for the released checkpoints.

References:
  [Infinity] Han et al., "Infinity: Scaling Bitwise AutoRegressive Modeling for High-Resolution Image Synthesis",
             arXiv:2412.04431 (official code FoundationVision/Infinity @ 4c27bbb)
  [BSQ]      Zhao et al., "Image and Video Tokenization with Binary Spherical Quantization", arXiv:2406.07548
  [HEAR]     HEAR paper, App. A, Eq. (9)-(12)

Dimension letters: B batch, d bits per token (codebook dim), h/w latent rows/cols of one scale,
H/W full latent size, L total tokens over all scales, K number of scales.
Images are (B, 3, 16H, 16W) in [-1, 1] (patch size 16; 8 for small images).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import CheckpointMismatchError, load_strict, read_state_dict

# -----------------------------------------------------------------------------
# Scale schedules (official table of infinity/utils/dynamic_resolution.py)

# 13 latent "h,w" sizes per aspect template h/w >= 1 (h = rows); the inverse templates swap h and w.
_RATIO_TO_HW = {ratio: [tuple(map(int, hw.split(","))) for hw in sizes.split()] for ratio, sizes in {
    1.0: "1,1 2,2 4,4 6,6 8,8 12,12 16,16 20,20 24,24 32,32 40,40 48,48 64,64",
    1.25: "1,1 2,2 3,3 5,4 10,8 15,12 20,16 25,20 30,24 35,28 45,36 55,44 70,56",
    1.333: "1,1 2,2 4,3 8,6 12,9 16,12 20,15 24,18 28,21 36,27 48,36 60,45 72,54",
    1.5: "1,1 2,2 3,2 6,4 9,6 15,10 21,14 27,18 33,22 39,26 48,32 63,42 78,52",
    1.75: "1,1 2,2 3,3 7,4 11,6 14,8 21,12 28,16 35,20 42,24 56,32 70,40 84,48",
    2.0: "1,1 2,2 4,2 6,3 10,5 16,8 22,11 30,15 38,19 46,23 60,30 74,37 90,45",
    2.5: "1,1 2,2 5,2 10,4 15,6 20,8 25,10 30,12 40,16 50,20 65,26 80,32 100,40",
    3.0: "1,1 2,2 6,2 9,3 15,5 21,7 27,9 36,12 45,15 54,18 72,24 90,30 111,37",
}.items()}
# Official template keys in official order: 1.0, then each ratio followed by its inverse. The inverse key is
# TRUNCATED to 3 decimals (int(1/r*1000)/1000), so 1/1.5 -> 0.666, not 0.667.
_TEMPLATE_TO_HW = {1.0: _RATIO_TO_HW[1.0]}
for _ratio, _hws in list(_RATIO_TO_HW.items())[1:]:
    _TEMPLATE_TO_HW.update({_ratio: _hws, int(1 / _ratio * 1000) / 1000: [(w, h) for h, w in _hws]})
H_DIV_W_TEMPLATES = list(_TEMPLATE_TO_HW)
# number of leading scales per official "pn" (pixel-count) setting
PN_NUM_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def nearest_template(h_div_w):
    """The official aspect template closest to h/w (argmin |template - h/w|, first one on ties)."""
    return min(H_DIV_W_TEMPLATES, key=lambda t: abs(t - h_div_w))


def template_scales(h_div_w_template):
    """All 13 (h, w) latent sizes of one template (h = rows)."""
    return list(_TEMPLATE_TO_HW[h_div_w_template])


def get_schedule(h_div_w, pn):
    """Official scale schedule [(h, w), ...] for an aspect ratio (snapped to its template) and a pn setting."""
    if pn not in PN_NUM_SCALES:
        raise ValueError(f"unknown pn {pn!r}; choose one of {sorted(PN_NUM_SCALES)}")
    return template_scales(nearest_template(h_div_w))[: PN_NUM_SCALES[pn]]


def small_schedule(h, w):
    """Scale schedule ending at any latent size (h, w), e.g. (1,2,4,6,8) for the 8x8 latent of 64 px with patch 8.
    If an official template/pn ends exactly at (h, w) that official schedule is returned; otherwise the official
    square progression 1,2,4,6,8,12,16,... below max(h, w) is scaled by (h, w)/max(h, w), then (h, w) is appended."""
    for hws in _TEMPLATE_TO_HW.values():
        for n in PN_NUM_SCALES.values():
            if hws[n - 1] == (h, w):
                return list(hws[:n])
    m, schedule = max(h, w), []
    for s, _ in _RATIO_TO_HW[1.0]:
        if s >= m:
            break
        hw = (max(1, round(s * h / m)), max(1, round(s * w / m)))
        if not schedule or hw != schedule[-1]:  # rounding can repeat a size on thin latents
            schedule.append(hw)
    return schedule + [(h, w)]


def rope_grid(h_div_w):
    """The RoPE position grid (rows, cols) of a template: its last '1M' scale (rope2d_normalized_by_hw=2)."""
    return template_scales(nearest_template(h_div_w))[-1]


def token_offsets(schedule):
    """Start offset of every scale in the flattened sequence, then the total L. [(h, w)] * K -> K + 1 ints"""
    offsets = [0]
    for h, w in schedule:
        offsets.append(offsets[-1] + h * w)
    return offsets


# -----------------------------------------------------------------------------
# Resampling and bit <-> code conversion, matched bit-for-bit to the official kernels


def resample(x, size, mode):
    """(B, d, h, w) -> (B, d, *size) with the official 5-D interpolation ('area' down, 'trilinear' up/down).
    parity: 5-D trilinear with T=1 equals bilinear (align_corners=False) but differs by ulps on CPU; the official
    code makes the 5-D call, so we do too."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.unsqueeze(2), size=(1, *size), mode=mode).squeeze(2)


def bits_to_codes(bits):
    """Eq. (9) [HEAR]: bits (..., d) in {0,1} -> codes (..., d) = (2b - 1)/sqrt(d). parity: renormalised as the
    official indices_to_codes does, so every magnitude equals the official float32 value."""
    d = bits.shape[-1]
    s = 1.0 / math.sqrt(d)
    return F.normalize(bits.float() * (2 * s) - s, dim=-1)


def add_scale(summed, bits, schedule, k):
    """One step of the next-scale recursion, Eq. (12) [HEAR] and the official inference loop: scale k's codes (from its
    bits (B, h_k, w_k, d)), upsampled to the full latent, join the running sum (B, d, H, W). Returns (new sum, scale
    k+1's input tokens (B, h_{k+1} w_{k+1}, d): the sum trilinear-downsampled, row-major; None after the last scale).
    Training (bitwise_self_correction), sampling (model.generate) and bits_to_latent all go through here."""
    H, W = schedule[-1]
    # parity: codes stay the channels-last view the official code interpolates (the CPU trilinear kernel rounds a
    # contiguous input differently, by 1 ulp)
    codes = bits_to_codes(bits).permute(0, 3, 1, 2)  # (B, d, h, w) = +-1/sqrt(d)
    summed = summed + resample(codes, (H, W), "trilinear")  # F_k = sum_{i<=k} up(R_i)
    if k + 1 == len(schedule):
        return summed, None
    return summed, resample(summed, schedule[k + 1], "trilinear").flatten(2).transpose(1, 2)  # (B, h'w', d)


def bits_to_index(bits):
    """Eq. (10) [HEAR]: bits (..., d) -> index (...,) int64 = sum_p b_p 2^p. For d = 64 this is the two's-complement
    int64 view of the unsigned index (bit 63 is the sign bit); index_to_bits undoes it exactly.
    NOTE: differs from the official code, whose (unused) int_label mask is MSB-first (2^(d-1) for channel 0): we
    follow the paper's Eq. (10), channel p weighted 2^p. Nothing depends on the order: the classifier is bitwise."""
    d = bits.shape[-1]
    if d > 64:
        raise ValueError(f"bits_to_index supports d <= 64 (int64), got d={d}")
    weights = torch.ones(d, dtype=torch.int64, device=bits.device) << torch.arange(d, device=bits.device)  # 2^p, wraps
    return (bits.long() * weights).sum(-1)


def index_to_bits(idx, d):
    """Inverse of bits_to_index: index (...,) int64 -> bits (..., d) uint8."""
    shifts = torch.arange(d, device=idx.device)
    return ((idx.long().unsqueeze(-1) >> shifts) & 1).to(torch.uint8)


def bits_to_sequence(bits_list):
    """Per-scale bits [(B, h_k, w_k, d)] -> codes as one token sequence (B, L, d): scales low -> high frequency,
    row-major inside a scale (the transformer's token order)."""
    return torch.cat([bits_to_codes(b).flatten(1, 2) for b in bits_list], dim=1)


# -----------------------------------------------------------------------------
# Multi-scale residual BSQ (Eq. (9)-(10) [HEAR] App. A; MultiScaleBSQ + BSQ of [Infinity])


def _sphere_and_sign(r):
    """Eq. (9) [HEAR] without the straight-through step: residual r (B, d, h, w) -> z = r/||r|| per position and
    its code zhat = sign(z)/sqrt(d) with 0 -> -1, both (B, h, w, d). bsq_quantize and bsq_aux_loss share it."""
    d = r.shape[1]
    # parity: contiguous channels-last (B, h, w, d) as the official (b n c d) layout, so the norm sums in its order
    z = F.normalize(r.float().permute(0, 2, 3, 1).contiguous(), dim=-1)
    return z, torch.where(z > 0, 1.0, -1.0) * (1.0 / d**0.5)  # zhat on the unit sphere


def bsq_quantize(r):
    """Eq. (9) [HEAR]: one scale of BSQ. residual r (B, d, h, w) -> codes (B, d, h, w), bits (B, h, w, d) uint8.
    z = r/||r|| per position; code = sign(z)/sqrt(d) with 0 -> -1; straight-through gradient to z."""
    z, zhat = _sphere_and_sign(r)
    # parity: the forward value is z + (zhat - z), as the official code; it can differ from zhat in the last ulp
    q = z + (zhat - z).detach()
    return q.permute(0, 3, 1, 2), (q > 0).to(torch.uint8)


def _residual_scales(f, schedule, flip=None):
    """The multi-scale residual recursion, written once for multiscale_bsq (Eq. (9)-(10) [HEAR]) and
    bitwise_self_correction (Eq. (11)-(12)). f (B, d, H, W) fp32, schedule [(h, w)] ending at (H, W). Per scale k:
        r_k = area-down(f - F_{k-1}) to (h_k, w_k);  bits_k, code_k = BSQ(r_k);  F_k = F_{k-1} + up(code_k)
    flip=None: F sums BSQ's straight-through codes, so the gradient reaches f. flip(bits) -> bits: F sums the codes
    re-quantised from the flipped bits (Eq. (12)), so every later r_k holds the flips for its bits to correct.
    -> dict: per scale "inputs" r_k (B, d, h, w), "bits" (B, h, w, d) uint8 (clean, before any flip), "codes"
    (B, d, h, w) and, with flip only, "next": scale k+1's input tokens (B, h_{k+1} w_{k+1}, d); "z" F_K and
    "residual" f - F_K (B, d, H, W)."""
    H, W = f.shape[-2:]
    if tuple(schedule[-1]) != (H, W):
        raise ValueError(f"the schedule must end at the latent size {(H, W)}, got {tuple(schedule[-1])}")
    out = {"inputs": [], "bits": [], "codes": [], "next": []}
    # parity: the official MultiScaleBSQ keeps a running residual (R <- R - up(code_k)) and starts its sum at 0;
    # flip_requant recomputes f - F_k and starts F at a zero tensor. Both are kept: they round (by an ulp) and lay
    # out memory differently
    residual, summed = f, 0 if flip is None else torch.zeros_like(f)
    for k, (h, w) in enumerate(schedule):
        r = resample(residual, (h, w), "area")  # (B, d, h, w); no-op at full size (the last scale)
        codes, bits = bsq_quantize(r)
        out["inputs"].append(r), out["bits"].append(bits), out["codes"].append(codes)
        if flip is None:
            up = resample(codes, (H, W), "trilinear")  # (B, d, H, W)
            residual, summed = residual - up.detach(), summed + up  # R <- R - up(code_k); F_k = F_{k-1} + up(code_k)
        else:
            # the next input is the trilinear (not area) down of F_k, as the official code
            summed, nxt = add_scale(summed, flip(bits), schedule, k)
            residual = f - summed
            if nxt is not None:
                out["next"].append(nxt)
    return {**out, "z": summed, "residual": residual}


def multiscale_bsq(f, schedule):
    """Eq. (9)-(10) [HEAR]: multi-scale residual BSQ of features f (B, d, H, W); schedule [(h, w)] ends at (H, W).
    Returns a dict: "z" (B, d, H, W) = sum_k up(codes_k) (gradient reaches f through every scale), and per scale
    "bits" [(B, h, w, d) uint8] (the labels), "codes" [(B, d, h, w)] (+-1/sqrt(d)), "inputs" [(B, d, h, w)] (the
    residual fed to BSQ: area-downsampled, full size at the last scale); "residual" (B, d, H, W) is what is left
    after the last scale (residual + z == f)."""
    q = _residual_scales(f.float(), schedule)  # fp32: the official quantizer runs with autocast off
    return {key: q[key] for key in ("z", "bits", "codes", "inputs", "residual")}


def bits_to_latent(bits_list, schedule):
    """Summed latent from per-scale bits, as the official decode_from_indices / inference summation.
    bits_list: [(B, h, w, d) or (B, h*w, d)] -> (B, d, H, W) with (H, W) = schedule[-1]."""
    z = 0
    for k, (bits, (h, w)) in enumerate(zip(bits_list, schedule, strict=True)):
        z, _ = add_scale(z, bits.reshape(bits.shape[0], h, w, bits.shape[-1]), schedule, k)
    return z


def _entropy(prob):
    """Shannon entropy over the last dim (nats), with the BitVAE 1e-8 guard."""
    return -(prob * torch.log(prob + 1e-8)).sum(-1)


# Inverse temperature of the soft bit assignment in the entropy terms, and the divisor of their weight: BitVAE's
# default, which Infinity's VAE training kept ([Infinity] notes 1.4); the two entropies are weighted 1 : 1.
ENTROPY_INV_TEMPERATURE = 100.0


def bsq_aux_loss(inputs, commit_weight=0.25, entropy_weight=0.1):
    """BSQ training regularisers [BSQ] as BitVAE's code computes them, averaged over scales: the commitment of the
    normalised residual to its code, plus entropy_weight x (per-sample entropy - codebook entropy) / T^-1.
    inputs: per-scale residuals [(B, d, h, w)] (multiscale_bsq(...)["inputs"]) -> dict of scalars, "aux" = total."""
    terms = {"aux": [], "commitment": [], "per_sample_entropy": [], "codebook_entropy": []}
    for r in inputs:
        d = r.shape[1]
        z, q = (t.reshape(-1, d) for t in _sphere_and_sign(r))  # (N, d): z on the unit sphere, its code (no gradient)
        commit = F.mse_loss(z, q)
        # soft P(bit = 0): the logit is the squared-distance gap to the codes -+1/sqrt(d), 4 z / sqrt(d), times T^-1.
        # Low per-sample entropy = confident bits; high codebook entropy = every code used.
        p = torch.sigmoid(-4 * z / math.sqrt(d) * ENTROPY_INV_TEMPERATURE)  # (N, d)
        prob = torch.stack([p, 1 - p], dim=-1)  # (N, d, 2)
        per_sample = _entropy(prob).sum(-1).mean()
        codebook = _entropy(prob.mean(0)).sum()
        aux = commit_weight * commit + entropy_weight * (per_sample - codebook) / ENTROPY_INV_TEMPERATURE
        for name, value in zip(terms, (aux, commit, per_sample, codebook)):
            terms[name].append(value)
    return {name: torch.stack(values).mean() for name, values in terms.items()}


# -----------------------------------------------------------------------------
# Bitwise self-correction (Eq. (11)-(12) [HEAR]; BitwiseSelfCorrection.flip_requant of [Infinity])


def flip_bits(bits, p, generator=None):
    """Eq. (11) [HEAR]: flip each bit independently with probability p. bits (...) uint8 -> (...) uint8.
    The random numbers are drawn on the generator's device (CPU by default) and moved to the bits' device."""
    rng_device = generator.device if generator is not None else torch.device("cpu")
    flip = torch.rand(bits.shape, generator=generator, device=rng_device).to(bits.device) < p
    return torch.where(flip, 1 - bits, bits)


def bitwise_self_correction(features, schedule, p_max=0.0, generator=None):
    """Eq. (11)-(12) [HEAR]: teacher-forcing inputs and labels with random bit flips, as the official flip_requant.
    features (B, d, H, W) raw encoder output -> x_BLC_wo_prefix (B, L - 1, d) fp32, labels (B, L, d) uint8.
    Per scale one p is drawn from {0, 0.01, ..., p_max}, shared by the batch; labels are the clean bits of the
    residual seen on the corrupted path, so later labels learn to correct earlier flips."""
    rng_device = generator.device if generator is not None else torch.device("cpu")

    def flip(bits):  # (B, h, w, d) clean bits of one scale -> the bits F_k is re-quantised from
        if p_max > 0:
            # Eq. (11): p ~ U{0, 0.01, ..., p_max}, one draw per scale (official: np.random.randint, here the generator)
            p = torch.randint(0, round(100 * p_max) + 1, (1,), generator=generator, device=rng_device).item() * 0.01
            bits = flip_bits(bits, p, generator)
        return bits

    # Eq. (12): F_k = sum_{i<=k} up(R_i^flip), re-quantised from the (possibly flipped) bits; the official code does
    # this whenever flips are enabled, even at p = 0
    q = _residual_scales(features.float(), schedule, flip)
    labels = torch.cat([bits.flatten(1, 2) for bits in q["bits"]], dim=1)  # (B, L, d)
    return torch.cat(q["next"], dim=1), labels


# -----------------------------------------------------------------------------
# BSQ-VAE: conv encoder/decoder in the official layout (infinity/models/bsq_vae/flux_vqgan.py), no attention


@dataclass
class TokenizerConfig:
    base_ch: int = 128  # channels of the first encoder level (and of the last decoder level)
    ch_mult: tuple = (1, 2, 4, 4, 4)  # channel multiplier per resolution level
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more per level)
    codebook_dim: int = 32  # d: latent channels = bits per token (Infinity d32)
    patch_size: int = 16  # image pixels per latent token side: log2(patch_size) down/upsamples (8 for small images)

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        n = self.patch_size.bit_length() - 1
        if self.patch_size != 2**n or not 1 <= n <= len(self.ch_mult) - 1:
            raise ValueError(f"patch_size must be 2^n with 1 <= n <= len(ch_mult) - 1, got {self.patch_size}")


def swish(x):
    """x * sigmoid(x). parity: written as the official code (F.silu can differ in the last ulp)."""
    return x * torch.sigmoid(x)


class Conv(nn.Module):
    """nn.Conv2d one level deep, so state_dict keys read '<name>.conv.weight' as in the official checkpoint."""

    def __init__(self, c_in, c_out, kernel_size=3, stride=1, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding)

    def forward(self, x):
        return self.conv(x)


class Norm(nn.Module):
    """GroupNorm(32 groups, or 24 when 32 does not divide C; eps 1e-6), keys '<name>.norm.weight' as official."""

    def __init__(self, c):
        super().__init__()
        groups = 32 if c % 32 == 0 else 24 if c % 24 == 0 else None
        if groups is None:
            raise ValueError(f"GroupNorm needs channels divisible by 32 (or 24), got {c}")
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)

    def forward(self, x):
        return self.norm(x)


class ResnetBlock(nn.Module):
    """(norm, swish, conv3x3) x 2 plus a skip (1x1 nin_shortcut if channels change). (B, c_in, ..) -> (B, c_out, ..)"""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = Norm(c_in), Conv(c_in, c_out)
        self.norm2, self.conv2 = Norm(c_out), Conv(c_out, c_out)
        if c_in != c_out:
            self.nin_shortcut = Conv(c_in, c_out, kernel_size=1, padding=0)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1, then 3x3 conv with stride 2. (B, C, h, w) -> (B, C, h/2, w/2)"""

    def __init__(self, c):
        super().__init__()
        self.conv = Conv(c, c, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then 3x3 conv. (B, C, h, w) -> (B, C, 2h, 2w)"""

    def __init__(self, c):
        super().__init__()
        self.conv = Conv(c, c)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in, c_out, num_blocks, resize=None):
    """One resolution level: `block` (ResnetBlocks) and an optional `downsample` / `upsample`, named as official."""
    level = nn.Module()
    level.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(num_blocks)])
    if resize == "down":
        level.downsample = Downsample(c_out)
    elif resize == "up":
        level.upsample = Upsample(c_out)
    return level


def _run_level(level, h):
    """Run one level built by _level: its ResnetBlocks, then its resampling conv if any."""
    for block in level.block:
        h = block(h)
    for name in ("downsample", "upsample"):
        if hasattr(level, name):
            h = getattr(level, name)(h)
    return h


def _mid(c):
    """The middle of encoder and decoder: two ResnetBlocks at the deepest width (no attention)."""
    mid = nn.Module()
    mid.block_1, mid.block_2 = ResnetBlock(c, c), ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    """Image (B, 3, H*p, W*p) -> raw features (B, d, H, W); downsample after level i when i < log2(p)."""

    def __init__(self, cfg):
        super().__init__()
        ch, n_down = cfg.base_ch, int(math.log2(cfg.patch_size))
        self.conv_in = Conv(3, ch)
        self.down, c = nn.ModuleList(), ch
        for i, mult in enumerate(cfg.ch_mult):
            self.down.append(_level(c, ch * mult, cfg.num_res_blocks, "down" if i < n_down else None))
            c = ch * mult
        self.mid = _mid(c)
        self.norm_out, self.conv_out = Norm(c), Conv(c, cfg.codebook_dim)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, d, H, W) -> image (B, 3, H*p, W*p); `up` is indexed by level and runs high -> low, upsampling after
    level i when 1 <= i <= log2(p)."""

    def __init__(self, cfg):
        super().__init__()
        ch, n_up = cfg.base_ch, int(math.log2(cfg.patch_size))
        c = ch * cfg.ch_mult[-1]
        self.conv_in = Conv(cfg.codebook_dim, c)
        self.mid = _mid(c)
        up = []
        for i in reversed(range(len(cfg.ch_mult))):
            up.insert(0, _level(c, ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, "up" if 1 <= i <= n_up else None))
            c = ch * cfg.ch_mult[i]
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = Norm(c), Conv(c, 3)

    def forward(self, z):
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for level in reversed(self.up):
            h = _run_level(level, h)
        return self.conv_out(swish(self.norm_out(h)))


class BSQVAE(nn.Module):
    """The Infinity BSQ-VAE. state_dict keys equal the official (wrapped) names, except that the two stateless
    quantizer buffers `quantizer.lfq.mask` / `quantize.lfq.mask` are not registered (load_infinity_vae drops them)."""

    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg if cfg is not None else TokenizerConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        # channels-last weights and activations: encode and decode run 1.4-2.7x faster on the CPU (bench.py
        # --what=sample: decode_s), a training step no faster or slower; load_state_dict copies into this layout, and
        # encode / decode hand back plain contiguous tensors
        self.to(memory_format=torch.channels_last)

    def encode(self, x):
        """Image (B, 3, H*p, W*p) in [-1, 1] -> raw features (B, d, H, W) fp32 (not normalised, not quantized)."""
        return self.encoder(x.contiguous(memory_format=torch.channels_last)).float().contiguous()

    def decode(self, z, clamp=True):
        """Latent (B, d, H, W) -> image (B, 3, H*p, W*p); clamp to [-1, 1] as the official decode()."""
        x = self.decoder(z.contiguous(memory_format=torch.channels_last)).contiguous()
        return x.clamp(-1, 1) if clamp else x

    def quantize(self, h, schedule=None):
        """Multi-scale residual BSQ of h (B, d, H, W), default schedule small_schedule(H, W) -> dict (multiscale_bsq)"""
        return multiscale_bsq(h, schedule if schedule is not None else small_schedule(*h.shape[-2:]))

    def forward(self, x, schedule=None):
        """One training pass: image (B, 3, H*p, W*p) -> (raw features (B, d, H, W), the multiscale_bsq dict,
        reconstruction (B, 3, H*p, W*p) not clamped, as the official forward). The loss needs all three."""
        features = self.encode(x)
        q = self.quantize(features, schedule)
        return features, q, self.decode(q["z"], clamp=False)


# -----------------------------------------------------------------------------
# Loading official checkpoints (infinity_vae_d32reg.pth and the other released sizes)

# the stateless quantizer buffer (2^(d-1..0)), registered twice by the official module; accepted and dropped
_DROPPED_SUFFIX = ".lfq.mask"


def _flat_name(key):
    """Official wrapped name -> the 'flat' spelling that official load_cnn also accepts (one wrapper level dropped):
    'a.conv1.conv.weight' -> 'a.conv1.weight', 'a.downsample.conv.conv.bias' -> 'a.downsample.conv.bias'."""
    *module, wrapper, leaf = key.split(".")
    return ".".join(module + [leaf]) if wrapper in ("conv", "norm") else key


def config_from_state_dict(sd):
    """Infer TokenizerConfig from weight names and shapes (either spelling; only .shape is read)."""

    def shape(wrapped):
        for name in (wrapped, _flat_name(wrapped)):
            if name in sd:
                return tuple(sd[name].shape)
        raise CheckpointMismatchError(f"not a BSQ-VAE checkpoint: no tensor {wrapped!r} (nor its flat spelling); "
                                      f"pass the official infinity_vae_*.pth or its 'vae' state dict")

    base_ch = shape("encoder.conv_in.conv.weight")[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    blocks = {k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")}
    n_down = sum(any(k.startswith(f"encoder.down.{i}.downsample.") for k in sd) for i in levels)
    return TokenizerConfig(
        base_ch=base_ch,
        ch_mult=tuple(shape(f"encoder.down.{i}.block.0.conv1.conv.weight")[0] // base_ch for i in levels),
        num_res_blocks=len(blocks),
        codebook_dim=shape("encoder.conv_out.conv.weight")[0],
        patch_size=2**n_down,
    )


def load_infinity_vae(path_or_state_dict, device="cpu"):
    """Build a BSQVAE from an official checkpoint and load it strictly. -> model in eval mode, fp32.
    Accepts a .pth (torch.load(weights_only=True), top-level "vae"), a .safetensors file or a state dict, in the
    wrapped ('conv1.conv.weight') or flat ('conv1.weight') spelling; the architecture is inferred from the shapes.
    Raises CheckpointMismatchError (one line) unless every tensor is consumed and every shape matches."""
    sd = read_state_dict(path_or_state_dict, unwrap=("vae",))
    cfg = config_from_state_dict(sd)
    model = BSQVAE(cfg)
    ours = model.state_dict()
    wrapped = {_flat_name(k): k for k in ours}  # flat spelling -> ours
    # the quantizer buffers 2^(d-1..0) are recomputable, not parameters: dropped
    sd = {k: v for k, v in sd.items() if not (k.endswith(_DROPPED_SUFFIX) and tuple(v.shape) == (cfg.codebook_dim,))}
    # flat names take our spelling; a tensor given in both spellings keeps its flat name and is reported unexpected
    sd = {k if k in ours or wrapped.get(k, k) in sd else wrapped[k]: v for k, v in sd.items()}
    load_strict(model, {k: v.float() for k, v in sd.items()}, "load_infinity_vae", "pass an unmodified official "
                f"infinity_vae_*.pth (top-level 'vae') or a state dict with the official key names (inferred: {cfg})")
    return model.to(device=device, dtype=torch.float32).eval()
