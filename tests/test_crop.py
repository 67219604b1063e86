"""face_detect.square_crop / square_box: the one square face crop (side = scale * max(box w, h), centred on the box,
border repeated, differentiable, antialiased when it shrinks a lot) used by the judge, CropEmbedder and prepare.py."""

import torch
import torch.nn.functional as F

import face_detect as fd


def test_square_box_geometry():
    sq = fd.square_box(torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 8.0, 2.0]]), 1.5)
    assert torch.equal(sq, torch.tensor([[-10.0, 10.0, 50.0, 70.0], [-2.0, -5.0, 10.0, 7.0]]))


def test_whole_square_image_at_scale_one_is_the_image_resized():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0]] * 2)
    assert torch.allclose(fd.square_crop(x, boxes, 1.0, 64), x, atol=1e-5)  # fp32 rounding of the sample grid
    # shrink < 2: plain bilinear samples at the pixel centres of the smaller grid
    plain = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(fd.square_crop(x, boxes, 1.0, 48), plain, atol=1e-5)
    # shrink 2: the antialiased resize itself
    smooth = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(fd.square_crop(x, boxes, 1.0, 32), smooth, atol=1e-5)


def test_crop_centre_stays_at_the_box_centre():
    """A blob at the box centre lands at the crop centre, whatever the box shape, scale and shrink factor."""
    H, W, cx, cy = 72, 96, 41.3, 35.8  # not square, so a swapped axis would show
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    blob = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 3.0 ** 2)).expand(3, H, W)
    cases = [(10.0, 14.0, 1.4, 20), (22.0, 12.0, 1.0, 24), (30.0, 30.0, 1.7, 16)]  # (w, h, scale, size); last: shrink 3
    for w, h, scale, size in cases:
        box = torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]])
        crop = fd.square_crop(blob[None], box, scale, size)[0, 0]  # (size, size)
        i = torch.arange(size, dtype=torch.float32)
        row, col = (crop.sum(1) * i).sum() / crop.sum(), (crop.sum(0) * i).sum() / crop.sum()
        # tolerance: bilinear resampling of a sampled Gaussian moves its centroid by a few hundredths of a pixel
        assert abs(row - (size - 1) / 2) < 0.05 and abs(col - (size - 1) / 2) < 0.05, (w, h, scale, size, row, col)


def test_border_is_repeated_outside_the_image():
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for box, dy, dx in [([-4.0, -4.0, 4.0, 4.0], -4, -4), ([4.0, 6.0, 12.0, 14.0], 6, 4)]:
        crop = fd.square_crop(x, torch.tensor([box]), 1.0, 8)  # one crop pixel per image pixel, shifted
        rows, cols = (torch.arange(8) + dy).clamp(0, 7), (torch.arange(8) + dx).clamp(0, 7)
        assert torch.allclose(crop, x[:, :, rows][:, :, :, cols], atol=1e-5)


def test_gradients_flow_to_the_window_only():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    boxes = torch.tensor([[20.0, 20.0, 40.0, 40.0], [8.0, 8.0, 56.0, 56.0]])  # shrink 1 and shrink 3 (side 48, size 16)
    fd.square_crop(x, boxes, 1.0, 16).sum().backward()
    g = x.grad
    # every crop pixel is a convex combination of image pixels (bilinear and antialias weights sum to 1)
    assert torch.allclose(g.sum(dim=(1, 2, 3)), torch.full((2,), 3.0 * 16 * 16), rtol=1e-4)
    assert (g[0, :, 21:39, 21:39] > 0).all() and g[0, :, :19].abs().sum() == 0 and g[0, :, :, 41:].abs().sum() == 0
    assert (g[1, :, 8:56, 8:56].sum(dim=0) > 0).float().mean() > 0.9 and g[1, :, :4].abs().sum() == 0


def test_antialiased_when_shrinking_a_lot():
    """A 1-px checkerboard shrunk 8x is flat grey. Point sampling would not be: the bilinear taps of this window land
    exactly on pixel centres (x = 8j + 4), so without the pre-filter every crop pixel would be +-1."""
    i = torch.arange(256)
    board = ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().expand(1, 3, 256, 256)
    crop = fd.square_crop(board, torch.tensor([[0.5, 0.5, 256.5, 256.5]]), 1.0, 32)
    assert crop.abs().max() < 0.02


def test_judge_crops_match_the_affine_crop_they_replace():
    """The judge's case (shrink < 2) is the former judge.crop_faces affine crop, to fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    xy, wh = torch.rand(4, 2, generator=g) * 40 + 4, torch.rand(4, 2, generator=g) * 20 + 18
    boxes = torch.cat([xy, xy + wh], dim=1)  # face boxes of 18-38 px, some running off the image
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    half = 1.4 * torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2
    theta = torch.zeros(4, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = 2 * half / 64, 2 * cx / 64 - 1
    theta[:, 1, 1], theta[:, 1, 2] = 2 * half / 64, 2 * cy / 64 - 1
    grid = F.affine_grid(theta, (4, 3, 32, 32), align_corners=False)
    old = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(fd.square_crop(x, boxes, 1.4, 32), old, atol=1e-5)
