"""face_encoder.py: Eq. (2) mask, Eq. (1) loss terms with real (tiny, random) backbones, IResNet loading,
InsightFace error path and ONNX model-zoo loading, Eq. (5) token split."""

import numpy as np
import pytest
import torch

import face_encoder as fe
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
    net = fe.IResNet(layers=(1, 1, 1, 1), width=8, emb_dim=16, input_size=32)
    return net.eval()


def test_composite_loss_terms_backprop_and_identity_zero():
    from transformers import Dinov2Config, Dinov2Model

    dino = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    patch_size=8, image_size=32))
    weights = {"l1": 0.2, "l2": 1.0, "vq": 1.0, "lpips": 0.5, "clip": 0.1, "id": 0.1}
    loss = fe.CompositeLoss(weights, lpips_net=fe.make_lpips(pretrained=False), id_net=fe.CropEmbedder(tiny_iresnet()),
                            dino_align=fe.DinoAlign(dino, latent_dim=4, image_size=32))
    assert loss.active() == list(weights)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (target + 0.3 * torch.randn_like(target)).clamp(-1, 1).requires_grad_(True)
    features = torch.randn(2, 4, 4, 4, requires_grad=True)
    boxes = torch.tensor([[4.0, 4.0, 28.0, 28.0], [0.0, 2.0, 20.0, 30.0]])
    total, terms = loss(recon, target, boxes, torch.tensor(0.5), features)
    assert set(terms) == set(weights) and all(torch.isfinite(v) for v in terms.values())
    assert torch.allclose(total, sum(weights[k] * v for k, v in terms.items()))
    total.backward()
    assert recon.grad.abs().sum() > 0 and features.grad.abs().sum() > 0  # features get grad through the clip term
    assert loss.dino_align.proj.weight.grad is not None
    _, same = loss(target, target, boxes, torch.tensor(0.0), features.detach())
    assert same["id"].abs() < 1e-6 and same["l1"] == 0 and same["l2"] == 0


def test_masked_pixel_loss_weights_face_alpha_times():
    loss = fe.CompositeLoss({"l1": 1.0}, alpha=3.0)
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
    loss = fe.CompositeLoss({"l1": 0.2, "l2": 1.0, "vq": 1.0, "lpips": 0.5, "clip": 0.1, "id": 0.0})
    assert loss.active() == ["l1", "l2", "vq"]  # no LPIPS/DINO network given, id weight 0


def test_iresnet_loads_arcface_and_adaface_layouts(tmp_path):
    net = tiny_iresnet()
    torch.save(net.state_dict(), tmp_path / "backbone.pth")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(fe.load_iresnet(str(tmp_path / "backbone.pth"))(x), net(x), atol=1e-6)
    # the same weights under AdaFace's names (Lightning ckpt); BGR input convention
    ada = {}
    for k, v in net.state_dict().items():
        for ours, theirs in [("conv1.", "input_layer.0."), ("bn1.", "input_layer.1."), ("prelu.", "input_layer.2."),
                             ("bn2.", "output_layer.0."), ("fc.", "output_layer.3."), ("features.", "output_layer.4.")]:
            if k.startswith(ours):
                k = theirs + k[len(ours):]
        if k.startswith("layer"):
            stage, rest = int(k[5]) - 1, k.split(".", 2)[2]
            for ours, theirs in [("bn1.", "res_layer.0."), ("conv1.", "res_layer.1."), ("bn2.", "res_layer.2."),
                                 ("prelu.", "res_layer.3."), ("conv2.", "res_layer.4."), ("bn3.", "res_layer.5."),
                                 ("downsample.", "shortcut_layer.")]:
                if rest.startswith(ours):
                    rest = theirs + rest[len(ours):]
            k = f"body.{stage}.{rest}"
        ada["model." + k] = v
    torch.save({"state_dict": ada}, tmp_path / "adaface.ckpt")
    loaded = fe.load_iresnet(str(tmp_path / "adaface.ckpt"))
    assert loaded.bgr and torch.allclose(loaded(x.flip(1)), net(x), atol=1e-6)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(fe.FaceError):
        fe.load_iresnet(str(tmp_path / "bad.pth"))


def test_detector_error_names_pack_and_folder(tmp_path):
    from skimage.data import astronaut

    image = astronaut()  # public-domain photo with one face
    with pytest.raises(fe.FaceError) as e:
        detector = fe.InsightFaceDetector(pack="buffalo_l", root=str(tmp_path))
        fe.detect_face(image, detector, "astronaut")
    msg = str(e.value)
    assert "buffalo_l" in msg and str(tmp_path) in msg and "--face_detector=none" in msg and "\n" not in msg
    face = fe.detect_face(image, None)  # `none`: the image is the face
    assert list(face["box"]) == [0, 0, image.shape[1], image.shape[0]]


def test_onnx_recognizer_loads_through_insightface_model_zoo(tmp_path):
    from insightface.model_zoo import get_model

    net = fe.IResNet(layers=(1, 1, 1, 1), width=8, emb_dim=16, input_size=112).eval()
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
