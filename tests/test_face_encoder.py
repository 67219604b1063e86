"""face_encoder.py and face_loss.py: Eq. (2) mask, Eq. (1) loss terms with real (tiny, random) backbones, IResNet
loading (AdaFace and arcface_torch layouts, built here from their published architectures), InsightFace error path
and ONNX model-zoo loading, Eq. (5) token split."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import face_detect as fd
import face_encoder as fe
import face_loss as fl
import tokenizer as tok


def test_face_mask_eq2():
    m = fe.face_mask(torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 8.0, 8.0]]), 6, 8, alpha=2.0)
    assert m.shape == (2, 1, 6, 8)
    expect = torch.ones(6, 8)
    expect[1:3, 2:5] = 2.0  # pixel centres inside [x0, x1] x [y0, y1]
    assert torch.equal(m[0, 0], expect)
    assert torch.equal(m[1, 0, :, :], torch.full((6, 8), 2.0))


def tiny_iresnet():
    torch.manual_seed(1)
    net = fl.IResNet(layers=(1, 1, 1, 1), width=8, emb_dim=16, input_size=32)
    return net.eval()


def test_composite_loss_terms_backprop_and_identity_zero():
    from transformers import Dinov2Config, Dinov2Model

    dino = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    patch_size=8, image_size=32))
    weights = {"l1": 0.2, "l2": 1.0, "vq": 1.0, "lpips": 0.5, "dino": 0.1, "id": 0.1}
    loss = fl.CompositeLoss(weights, lpips_net=fl.make_lpips(pretrained=False), id_net=fl.CropEmbedder(tiny_iresnet()),
                            dino_align=fl.DinoAlign(dino, latent_dim=4, image_size=32))
    assert loss.active() == list(weights)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (target + 0.3 * torch.randn_like(target)).clamp(-1, 1).requires_grad_(True)
    features = torch.randn(2, 4, 4, 4, requires_grad=True)
    boxes = torch.tensor([[4.0, 4.0, 28.0, 28.0], [0.0, 2.0, 20.0, 30.0]])
    total, terms = loss(recon, target, boxes, torch.tensor(0.5), features)
    assert set(terms) == set(weights) and all(torch.isfinite(v) for v in terms.values())
    assert torch.allclose(total, sum(weights[k] * v for k, v in terms.items()))
    total.backward()
    assert recon.grad.abs().sum() > 0 and features.grad.abs().sum() > 0  # features get grad through the dino term
    assert loss.dino_align.proj.weight.grad is not None
    _, same = loss(target, target, boxes, torch.tensor(0.0), features.detach())
    assert same["id"].abs() < 1e-6 and same["l1"] == 0 and same["l2"] == 0


def test_masked_pixel_loss_weights_face_alpha_times():
    loss = fl.CompositeLoss({"l1": 1.0}, alpha=3.0)
    target = torch.zeros(1, 3, 8, 8)
    inside, outside = target.clone(), target.clone()
    inside[..., 3, 3] = 1.0  # one pixel error inside the box
    outside[..., 7, 7] = 1.0  # same error outside
    box = torch.tensor([[2.0, 2.0, 5.0, 5.0]])
    l_in = loss(inside, target, box, torch.tensor(0.0), None)[1]["l1"]
    l_out = loss(outside, target, box, torch.tensor(0.0), None)[1]["l1"]
    assert torch.allclose(l_in, 3 * l_out)
    assert loss.active() == ["l1"]


def test_off_terms_and_missing_networks_are_inactive():
    loss = fl.CompositeLoss({"l1": 0.2, "l2": 1.0, "vq": 1.0, "lpips": 0.5, "dino": 0.1, "id": 0.0})
    assert loss.active() == ["l1", "l2", "vq"]  # no LPIPS/DINO network given, id weight 0


def ir_block(cin, cout, stride, conv_shortcut):
    """Both published IR blocks: BN, conv3x3, BN, PReLU, conv3x3(stride), BN (+ shortcut conv1x1 + BN)."""
    res = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                        nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
    short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if conv_shortcut else None
    return res, short


class AdaFaceBlock(nn.Module):  # AdaFace net.py BasicBlockIR: MaxPool2d(1, stride) shortcut when cin == cout
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.res_layer, short = ir_block(cin, cout, stride, cin != cout)
        self.shortcut_layer = short if cin != cout else nn.MaxPool2d(1, stride)

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceNet(nn.Module):  # AdaFace net.py Backbone(mode="ir") at 112 px, narrow (width 8 instead of 64) and short
    def __init__(self, units=(2, 2, 2, 2), width=8, emb=32):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                         nn.PReLU(width))
        blocks, cin = [], width
        for n, c in zip(units, [width, 2 * width, 4 * width, 8 * width]):
            blocks += [AdaFaceBlock(cin if i == 0 else c, c, 2 if i == 0 else 1) for i in range(n)]
            cin = c
        self.body = nn.Sequential(*blocks)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(cin * 7 * 7, emb), nn.BatchNorm1d(emb, affine=False))

    def forward(self, bgr):  # (B, 3, 112, 112) BGR, (x / 255 - 0.5) / 0.5 -> (unit embedding, its norm)
        x = self.output_layer(self.body(self.input_layer(bgr)))
        norm = x.norm(dim=1, keepdim=True)
        return x / norm, norm


class ArcFaceBlock(nn.Module):  # insightface arcface_torch IBasicBlock: conv downsample if stride != 1 or cin != cout
    def __init__(self, cin, cout, stride):
        super().__init__()
        res, self.downsample = ir_block(cin, cout, stride, stride != 1 or cin != cout)
        self.bn1, self.conv1, self.bn2, self.prelu, self.conv2, self.bn3 = res

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class ArcFaceNet(nn.Module):  # arcface_torch IResNet at 112 px, narrow; returns the raw (unnormalised) features
    def __init__(self, units=(2, 2, 2, 2), width=8, emb=32):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.prelu = nn.PReLU(width)
        cin = width
        for s, (n, c) in enumerate(zip(units, [width, 2 * width, 4 * width, 8 * width])):
            setattr(self, f"layer{s + 1}", nn.Sequential(*[ArcFaceBlock(cin if i == 0 else c, c, 2 if i == 0 else 1)
                                                          for i in range(n)]))
            cin = c
        self.bn2, self.fc, self.features = nn.BatchNorm2d(cin), nn.Linear(cin * 49, emb), nn.BatchNorm1d(emb)

    def forward(self, rgb):
        x = self.prelu(self.bn1(self.conv1(rgb)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.bn2(x).flatten(1)))


def randomized(net):
    """Random BN statistics/affines and PReLU slopes, so that every loaded tensor changes the output."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.num_batches_tracked.fill_(7)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_(0, 0.1)
        elif isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.0, 0.5)
    return net.eval()


def test_adaface_checkpoint_loads_with_its_own_layout(tmp_path):
    ref = randomized(AdaFaceNet())
    assert isinstance(ref.body[0].shortcut_layer, nn.MaxPool2d)  # 8 -> 8, stride 2: no shortcut tensors in the file
    ckpt = {f"model.{k}": v for k, v in ref.state_dict().items()}
    ckpt["head.kernel"] = torch.randn(32, 100)  # the AdaFace margin head's class centres (training only)
    torch.save({"state_dict": ckpt}, tmp_path / "adaface_ir18.ckpt")
    net = fl.load_iresnet(str(tmp_path / "adaface_ir18.ckpt"))
    assert net.layout == "adaface" and net.features.weight is None and net.input_size == 112
    u8 = torch.randint(0, 256, (2, 3, 112, 112)).float()  # an RGB image batch
    want, norm = ref((u8.flip(1) / 255 - 0.5) / 0.5)  # AdaFace's own input: BGR
    # same float32 ops in the same order (kernels may differ): ~1e-7 relative per layer over ~20 layers on unit vectors
    assert torch.allclose(net(u8 / 127.5 - 1), want, atol=1e-5) and norm.min() > 0
    ckpt["model.body.0.shortcut_layer.0.weight"] = torch.zeros(8, 8, 1, 1)  # an ArcFace-style shortcut: refused
    torch.save({"state_dict": ckpt}, tmp_path / "bad.ckpt")
    with pytest.raises(fe.FaceError, match="unexpected.*layer1.0.downsample"):
        fl.load_iresnet(str(tmp_path / "bad.ckpt"))


def test_arcface_backbone_loads_strictly(tmp_path):
    ref = randomized(ArcFaceNet())
    assert ref.layer1[0].downsample is not None  # 8 -> 8, stride 2: a conv shortcut in this layout
    torch.save(ref.state_dict(), tmp_path / "backbone.pth")
    net = fl.load_iresnet(str(tmp_path / "backbone.pth"))
    x = torch.rand(2, 3, 112, 112) * 2 - 1  # RGB, (x / 255 - 0.5) / 0.5
    assert net.layout == "arcface" and torch.allclose(net(x), F.normalize(ref(x), dim=-1), atol=1e-5)
    sd = ref.state_dict()
    del sd["layer1.0.downsample.0.weight"]  # an AdaFace-style first block in an ArcFace file: refused
    torch.save(sd, tmp_path / "short.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    for bad in ["short.pth", "bad.pth"]:
        with pytest.raises(fe.FaceError) as e:
            fl.load_iresnet(str(tmp_path / bad))
        assert "\n" not in str(e.value)


def test_detector_error_names_pack_and_folder(tmp_path):
    from skimage.data import astronaut

    image = astronaut()  # public-domain photo with one face
    with pytest.raises(fe.FaceError) as e:
        detector = fd.InsightFaceDetector(pack="buffalo_l", root=str(tmp_path))
        fd.detect_face(image, detector, "astronaut")
    msg = str(e.value)
    assert "buffalo_l" in msg and str(tmp_path) in msg and "--face_detector=none" in msg and "\n" not in msg
    face = fd.detect_face(image, None)  # `none`: the image is the face
    assert list(face["box"]) == [0, 0, image.shape[1], image.shape[0]]


def test_onnx_recognizer_loads_through_insightface_model_zoo(tmp_path):
    from insightface.model_zoo import get_model

    net = fl.IResNet(layers=(1, 1, 1, 1), width=8, emb_dim=16, input_size=112).eval()
    path = str(tmp_path / "w600k_tiny.onnx")
    torch.onnx.export(net, torch.zeros(1, 3, 112, 112), path, input_names=["input"], output_names=["embedding"],
                      dynamo=False)
    model = get_model(path, providers=["CPUExecutionProvider"])
    assert model.taskname == "recognition"
    rgb = (np.random.default_rng(0).random((112, 112, 3)) * 255).astype(np.uint8)
    emb = model.get_feat(np.ascontiguousarray(rgb[:, :, ::-1])).ravel()  # insightface takes BGR, feeds RGB
    ours = net(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
    assert emb.shape == (16,)
    assert np.allclose(emb / np.linalg.norm(emb), ours.detach().numpy(), atol=1e-4)


@pytest.mark.parametrize("h_div_w,pn,first,expect", [(1.0, "1M", 6, 265), (1.0, "0.06M", 3, 21), (2.0, "1M", 6, None)])
def test_ft_counts(h_div_w, pn, first, expect):
    schedule = tok.get_schedule(h_div_w, pn)
    ft = fe.hf_split(schedule, first)
    assert ft == sum(h * w for h, w in schedule[:first])
    if expect is not None:
        assert ft == expect
