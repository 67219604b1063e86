"""
The high-frequency face encoder of HEAR (paper sections 3.2-3.3): what turns a face crop into the face tokens the
transformer's two identity paths read.

  face mask:        Eq. (2)  w = alpha on the pixels of the face box, 1 elsewhere (weights the pixel losses)
  face tokens:      Eq. (5)  v = the face encoder's per-scale codes of the crop, low -> high frequency; v_hf = v[FT:]
                             (hf_split gives FT, face_schedule the crop's scales, face_tokens both token sets)
  global tokens:    Eq. (3)  v_g = a frozen global encoder's tokens (build_global_encoder, --global_face):
                             judge:<judge.pt> the synthfaces judge's loss identity net (JudgeGlobalEncoder),
                             clip:<folder> a CLIP vision tower (ClipGlobalEncoder, real presets), or
                             lowfreq, no encoder: the low-frequency codes v[:FT]

The face encoder itself is a copy of the tokenizer (tokenizer.BSQVAE) fine-tuned by train_tokenizer.py
--preset=synthfaces_face with the composite loss of Eq. (1) (face_loss.py); the generation tokenizer is never
modified. Detection and the square crop: face_detect.py.

References:
  [HEAR]     HEAR: High-frequency Enhanced AutoRegressive modeling for identity-preserving generation, Eq. (2)-(5)
  [CLIP]     Radford et al., arXiv:2103.00020 (the global encoder of the real presets)

Dimension letters: B batch, H/W image size, S crop side, d bits per token, L tokens, E embedding width.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenizer as tok
from face_detect import FaceError


# -----------------------------------------------------------------------------
# Eq. (2): the face mask


def face_mask(boxes, height, width, alpha=2.0):
    """Eq. (2) [HEAR]: w_ij = alpha for the pixel of row i, column j whose centre (j + 0.5, i + 0.5) lies in the
    face box, x0 <= j + 0.5 <= x1 and y0 <= i + 0.5 <= y1 (edges included), else 1.
    boxes (B, 4) [x0, y0, x1, y1] in pixel coordinates (pixel j spans [j, j + 1)) -> (B, 1, H, W)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    cols = torch.arange(width, dtype=torch.float32).view(1, 1, width)  # pixel j covers [j, j+1)
    rows = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    inside = (cols + 0.5 >= x0) & (cols + 0.5 <= x1) & (rows + 0.5 >= y0) & (rows + 0.5 <= y1)  # pixel centres
    return torch.where(inside, alpha, 1.0).unsqueeze(1)  # Eq. (2)


# -----------------------------------------------------------------------------
# Eq. (5): face tokens for the transformer


def hf_split(schedule, hf_first_scale):
    """FT = token count of the first `hf_first_scale` scales (paper: 6 of 13 -> 265 tokens at the 1M square)."""
    return tok.token_offsets(schedule)[hf_first_scale]


def face_schedule(face_size, patch_size, hf_first_scale):
    """The scale schedule of a face_size crop, checked against hf_first_scale (FT must leave high-frequency tokens)."""
    schedule = tok.small_schedule(face_size // patch_size, face_size // patch_size)
    if not 0 < hf_first_scale < len(schedule):
        raise FaceError(f"hf_first_scale={hf_first_scale} leaves no high-frequency face tokens: a {face_size} px crop "
                        f"has {len(schedule)} scales {schedule}; choose 1 .. {len(schedule) - 1}")
    return schedule


@torch.no_grad()
def face_tokens(face_encoder, crops, hf_first_scale, global_encoder=None):
    """Eq. (5) [HEAR]: reference face crops (B, 3, S, S) in [-1, 1] -> (v_g, v_hf), the global and the
    high-frequency face tokens. v (B, L_face, d) = the face encoder's per-scale codes of the crop, low -> high
    frequency; v_hf = v[:, FT:] (before W_hf, which lives in model.py); v_g = the low-frequency codes v[:, :FT]
    or, with a global_encoder, its tokens (B, N_g, E) (the synthfaces judge, CLIP).
    Always fp32 (autocast off, as the official code encodes), so training and sampling see the same face bits."""
    schedule = face_schedule(crops.shape[-1], face_encoder.cfg.patch_size, hf_first_scale)
    with torch.autocast(crops.device.type, enabled=False):
        bits = face_encoder.quantize(face_encoder.encode(crops.float()), schedule)["bits"]  # K x (B, h_k, w_k, d)
        encoded_global = None if global_encoder is None else global_encoder(crops.float())  # (B, N_g, E)
    # parity: tokens from the bits (exact +-1/sqrt(d) values, as decoding sees them), not the straight-through value,
    # whose last ulp depends on the batch the crop was encoded in
    v = tok.bits_to_sequence(bits)  # (B, L_face, d)
    ft = hf_split(schedule, hf_first_scale)
    # Eq. (5) [HEAR]: v_hf = v[FT:] (W_hf is applied in model.py); the low-frequency rest is v_g without an encoder
    v_low, v_hf = v[:, :ft], v[:, ft:]  # (B, FT, d), (B, L_face - FT, d)
    v_g = v_low if encoded_global is None else encoded_global
    return v_g, v_hf


# -----------------------------------------------------------------------------
# Eq. (3): the global encoder of v_g


def build_global_encoder(spec, device="cpu"):
    """--global_face: "lowfreq" -> None (v[:FT] is the global view); "judge:<judge.pt>" -> the synthfaces judge's
    frozen loss identity net; "clip:<folder>" -> a frozen CLIP vision tower. Each encoder has .dim, its token width."""
    if spec == "lowfreq":
        return None
    kind, _, path = spec.partition(":")
    if kind == "judge":
        if not os.path.isfile(path):
            raise FaceError(f"--global_face={spec!r}: no such judge file; pass the synthfaces judge.pt the model was "
                            "trained with (weights/synthfaces/judge.pt)")
        from data.synthfaces.judge import load_judge  # the synthfaces judge, only needed here

        return JudgeGlobalEncoder(load_judge(path)).to(device)
    if kind == "clip" and os.path.isdir(path):
        from transformers import CLIPVisionModelWithProjection

        return ClipGlobalEncoder(CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)).to(device)
    raise FaceError(f"--global_face={spec!r}: use lowfreq, judge:<synthfaces judge.pt> or clip:<local "
                    "CLIPVisionModelWithProjection folder>")


class JudgeGlobalEncoder(nn.Module):
    """Global face tokens for synthfaces: the L2-normalised identity embedding of the judge's *loss* identity net
    (the one the face encoder trains against; FaceSim is scored by the other, id_eval), one token (B, 1, E). It
    stands where the paper's pretrained global visual encoder stands: a recogniser trained before HEAR and frozen.
    Crops in [-1, 1] framed like the judge's (prepare.py's reference crops are)."""

    def __init__(self, judge):
        super().__init__()
        self.judge = judge.eval().requires_grad_(False)
        self.dim = judge.id_loss.embed[1].out_features  # E, the width of the embedding Linear

    @torch.no_grad()
    def forward(self, crops):
        return self.judge.embed(crops.float(), "loss")[:, None]  # (B, 1, E)


class ClipGlobalEncoder(nn.Module):
    """Global face tokens for real presets: a frozen CLIP vision tower (transformers CLIPVisionModelWithProjection);
    returns the projected image embedding as one token (B, 1, E), input crops in [-1, 1]."""

    def __init__(self, clip_vision):
        super().__init__()
        self.clip = clip_vision.eval().requires_grad_(False)
        self.dim = clip_vision.config.projection_dim  # E
        self.register_buffer("mean", torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, crops):
        size = self.clip.config.image_size
        x = F.interpolate((crops + 1) / 2, size=(size, size), mode="bicubic", align_corners=False)
        return self.clip(pixel_values=(x - self.mean) / self.std).image_embeds[:, None]  # (B, 1, E)
