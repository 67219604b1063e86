"""
Faces in photos: detection backends behind one small interface, and the one square face crop. Used by sample.py
(the reference photo), eval.py (faces in generated photos), curate.py (the data pipeline), the face encoder's
identity loss and the synthfaces judge.

  make_face_detector(kind)  auto | insightface | dlib | none -> a backend: image (H, W, 3) uint8 RGB -> faces
                            [{"box", "kps", "score", "embedding"}], faces[0] the one to use
      insightface  FaceAnalysis with a local model pack (buffalo_l / antelopev2; research-only weights), never
                   downloaded
      dlib         offline and permissive: dlib-bin's HOG detector plus the 5-point landmark and 128-d ResNet
                   embedding models shipped in the face-recognition-models package (public domain)
  detect_face(...)          faces[0] with a warning when a photo holds several
  square_box / square_crop  the one framing of every face crop: side = scale * max(box w, h), centred on the box

References:
  [ArcFace]  Deng et al., arXiv:1801.07698 (insightface detection + recognition packs)
  [dlib]     King, dlib-models (HOG detector, shape_predictor_5_face_landmarks, dlib_face_recognition_resnet_model_v1)

Dimension letters: B batch, H/W image size.
"""

import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError, log


class FaceError(UserError, ValueError):
    """A user-facing problem with face input or face models (no face, missing model pack, bad checkpoint)."""


# -----------------------------------------------------------------------------
# Face detection and cropping


def _pack_folder(pack, root):
    """The InsightFace model pack folder (`pack` itself when it is a folder) and whether it holds .onnx models."""
    folder = os.path.expanduser(pack)
    if not os.path.isdir(folder):
        folder = os.path.join(os.path.expanduser(root), "models", pack)
    return folder, os.path.isdir(folder) and any(f.endswith(".onnx") for f in os.listdir(folder))


def _rank_faces(faces, rel=0.5):
    """Every backend's multi-face policy: drop faces scoring under best - rel |best|, then largest first. Score first:
    on skimage's astronaut() HOG also fires on the mission patch (score 0.12, 89 px; the face: 1.16, 90 px); a real
    second face scores like the first and is kept (detect_face warns). InsightFace at det_thresh >= 0.5 keeps all."""
    best = max((f["score"] for f in faces), default=0.0)
    kept = [f for f in faces if f["score"] >= best - rel * abs(best)]
    return sorted(kept, key=lambda f: -float((f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1])))


class InsightFaceDetector:
    """InsightFace FaceAnalysis: 5 landmarks (eyes, nose, mouth corners), 512-d ArcFace embedding, probability
    scores. The pack is looked up in <root>/models/<pack> (or `pack` may be a folder); it is never downloaded."""

    name = "insightface"

    def __init__(self, pack="buffalo_l", root="~/.insightface", det_size=640, det_thresh=0.5, device="cpu"):
        folder, has_onnx = _pack_folder(pack, root)
        if not has_onnx:
            raise FaceError(f"InsightFace model pack '{pack}' not found in {folder}: download {pack}.zip from "
                            "https://github.com/deepinsight/insightface/releases (model-zoo) and unzip it there "
                            "(or set --face_model_root), or use --face_detector=none for pre-cropped faces")
        from insightface.app import FaceAnalysis  # heavy import (onnxruntime, cv2) only when a detector is asked for

        self.app = FaceAnalysis(name=folder, allowed_modules=["detection", "recognition"])
        self.app.prepare(ctx_id=0 if str(device).startswith("cuda") else -1, det_thresh=det_thresh,
                         det_size=(det_size, det_size))
        self.det_thresh = det_thresh

    def __call__(self, image_rgb):
        faces = self.app.get(np.ascontiguousarray(image_rgb[:, :, ::-1]))  # insightface expects BGR
        return _rank_faces([{"box": f.bbox.astype(np.float32), "kps": f.kps, "score": float(f.det_score),
                             "embedding": getattr(f, "normed_embedding", None)} for f in faces])


class DlibDetector:
    """dlib [dlib]: HOG detector (scores are SVM margins: dlib's threshold 0, real faces ~0.3-2.5; upsample 1 finds
    faces down to ~40 px), 5 landmarks (image-right eye outer, inner corner, image-left eye outer, inner, nose base),
    128-d ResNet embedding of the aligned face chip. dlib's rule is Euclidean distance d < 0.6 = same person on raw
    descriptors of norm n ~1.3-1.5; unit-normalised here, d^2 ~ 2 n^2 (1 - cos), so d 0.6 ~ cos 0.9 (and different
    people still score cos ~0.8). Models: package face-recognition-models (CC0), found without importing it."""

    name = "dlib"

    def __init__(self, det_thresh=0.0, upsample=1, models=None):
        spec = importlib.util.find_spec("face_recognition_models")
        if importlib.util.find_spec("dlib") is None or (spec is None and models is None):
            raise FaceError("the dlib face backend needs `pip install dlib-bin face-recognition-models` (or use an "
                            "InsightFace pack, or --face_detector=none for pre-cropped faces)")
        import dlib

        models = models or os.path.join(list(spec.submodule_search_locations)[0], "models")
        files = [os.path.join(models, f) for f in ("shape_predictor_5_face_landmarks.dat",
                                                   "dlib_face_recognition_resnet_model_v1.dat")]
        for f in files:
            if not os.path.isfile(f):
                raise FaceError(f"dlib model file {f} missing: reinstall face-recognition-models")
        self.hog = dlib.get_frontal_face_detector()
        self.landmarks, self.recognizer = dlib.shape_predictor(files[0]), dlib.face_recognition_model_v1(files[1])
        self.det_thresh, self.upsample = det_thresh, upsample

    def __call__(self, image_rgb):
        image = np.ascontiguousarray(image_rgb, dtype=np.uint8)
        rects, scores, _ = self.hog.run(image, self.upsample, self.det_thresh)
        # dlib rectangles are inclusive pixel indices; boxes here are pixel edges (pixel j covers [j, j+1))
        faces = _rank_faces([{"box": np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float32),
                              "score": float(s), "rect": r} for r, s in zip(rects, scores)])
        for f in faces:  # landmarks and embedding only for the faces kept
            shape = self.landmarks(image, f.pop("rect"))
            f["kps"] = np.array([(p.x, p.y) for p in shape.parts()], np.float32)  # (5, 2)
            e = np.array(self.recognizer.compute_face_descriptor(image, shape), np.float32)  # (128,)
            f["embedding"] = e / np.linalg.norm(e)
        return faces


def make_face_detector(kind="auto", pack="buffalo_l", root="~/.insightface", det_thresh=None, device="cpu",
                       log=print):
    """kind: auto | insightface | dlib | none -> a backend, or None for `none` (the image is already a face crop).
    A backend maps an image (H, W, 3) uint8 RGB to [{"box": float32 [x0, y0, x1, y1] pixels, "kps": float32 (5, 2)
    (its own 5 landmarks) or None, "score": float, "embedding": unit float32 (E,) or None}], faces[0] the one to use
    (_rank_faces); it has `name` and `det_thresh` (None: its default, InsightFace 0.5, dlib 0.0).
    auto: InsightFace when its pack folder holds .onnx models (and insightface imports), else dlib; logged."""
    if kind == "none":
        return None
    if kind not in ("auto", "insightface", "dlib"):
        raise FaceError(f"--face_detector={kind}: choose auto, insightface, dlib or none")
    if kind == "auto":
        folder, has_pack = _pack_folder(pack, root)
        has_pack = has_pack and importlib.util.find_spec("insightface") is not None
        kind = "insightface" if has_pack else "dlib"
        log(f"face detector: {kind} ({'pack' if has_pack else 'no InsightFace pack'} {pack} in {folder})")
    if kind == "insightface":
        return InsightFaceDetector(pack, root, det_thresh=0.5 if det_thresh is None else det_thresh, device=device)
    return DlibDetector(det_thresh=0.0 if det_thresh is None else det_thresh)


def detect_face(image_rgb, detector, name="image"):
    """faces[0] of a backend (see _rank_faces), with a warning naming how many faces were kept. detector=None:
    the whole image is the face (pre-cropped references, synthfaces)."""
    H, W = image_rgb.shape[:2]
    if detector is None:
        return {"box": np.array([0, 0, W, H], np.float32), "kps": None, "score": 1.0, "embedding": None}
    faces = detector(image_rgb)
    if not faces:
        raise FaceError(f"no face found in {name} ({detector.name}, threshold {detector.det_thresh}); use a clear "
                        "frontal photo, lower --det_thresh, or pass a pre-cropped face with --face_detector=none")
    if len(faces) > 1:
        log(f"warning: {len(faces)} faces found in {name}; using the largest")
    return faces[0]


def square_box(boxes, scale):
    """The one framing of every face crop: boxes (..., 4) pixels [x0, y0, x1, y1] -> the squares (..., 4) of side
    scale * max(w, h) centred on them (scale 1.4: the synthfaces reference crops and judge; 1.25: CropEmbedder)."""
    boxes = torch.as_tensor(boxes)
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    half = scale * torch.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]) / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1)


def square_crop(images, boxes, scale, size):
    """Square face crops (square_box), differentiable w.r.t. the images: bilinear samples, the image border repeated
    outside the image. A crop that shrinks its window k >= 2 times (a large face in a photo) first box-filters the
    image by k (antialiased resize), so the bilinear taps do not alias fine detail.
    images (B, 3, H, W), boxes (B, 4) pixels [x0, y0, x1, y1] -> (B, 3, size, size)."""
    B, _, H, W = images.shape
    sq = square_box(torch.as_tensor(boxes, dtype=images.dtype, device=images.device), scale)  # (B, 4)
    theta = torch.zeros(B, 2, 3, dtype=images.dtype, device=images.device)  # output [-1, 1] -> input [-1, 1]
    theta[:, 0, 0], theta[:, 0, 2] = (sq[:, 2] - sq[:, 0]) / W, (sq[:, 0] + sq[:, 2]) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = (sq[:, 3] - sq[:, 1]) / H, (sq[:, 1] + sq[:, 3]) / H - 1
    grid = F.affine_grid(theta, (B, 3, size, size), align_corners=False)  # (B, size, size, 2)
    shrink = ((sq[:, 2] - sq[:, 0]) / size).floor().clamp(min=1).long()  # (B,) integer pre-filter factor
    index, crops = [], []
    for k in shrink.unique().tolist():
        idx = (shrink == k).nonzero()[:, 0]
        src = images[idx]
        if k > 1:  # normalised coordinates are resolution-free: the same grid samples the smaller image
            src = F.interpolate(src, size=(max(1, H // k), max(1, W // k)), mode="bilinear", antialias=True)
        index.append(idx)
        crops.append(F.grid_sample(src, grid[idx], mode="bilinear", padding_mode="border", align_corners=False))
    return torch.cat(crops)[torch.cat(index).argsort()]
