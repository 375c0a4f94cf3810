"""Five face points from SFHQ's 110 landmarks, and ArcFace 112x112 alignment by a similarity transform.

SFHQ's ``landmarks/<name>.npz`` holds ``landmarks``: 110 (x, y) points in pixel coordinates of the 1024x1024
image. Its readme says they were "extracted using Dlib, Face Alignment and some post processing of Face Parsing
BiSeNet" and add inner and outer hairlines; it does not number the points. dlib's 68-point predictor and the
``face-alignment`` package both emit the iBUG-300W 68-point order, so we take points 0-67 to be that order (the
remaining 42 are the hairline points, which we do not use). 0-based iBUG-68 indices used here:

    36-41  the eye on the image's left (the subject's right eye)   -> mean of the six contour points
    42-47  the eye on the image's right (the subject's left eye)   -> mean of the six contour points
    30     nose tip (last point of the nose bridge 27-30)
    48     mouth corner on the image's left (outer lip contour 48-59 starts there)
    54     mouth corner on the image's right

:func:`five_points_from_sfhq` checks that the points it picks are laid out like a face (eyes above the nose above
the mouth, left before right, in the face's own frame) so that a file in some other order fails loudly instead of
producing garbage crops.

The five points are in the order of the ArcFace (insightface) template: image-left eye, image-right eye, nose tip,
image-left mouth corner, image-right mouth corner. :func:`align_arcface` estimates the least-squares similarity
transform (Umeyama 1991: rotation, uniform scale, translation; no reflection) from the five points to the template
and warps the image with it.
"""

from __future__ import annotations

import io
import zipfile

import cv2
import numpy as np

from facegen.generators.alignment import ARCFACE_TEMPLATE, umeyama

# insightface's arcface_dst for 112x112 crops (x, y), in the order described above
ARCFACE_TEMPLATE_112 = ARCFACE_TEMPLATE.astype(np.float64)

SFHQ_NUM_LANDMARKS = 110
SFHQ_LEFT_EYE = tuple(range(36, 42))  # image-left eye contour (iBUG-68)
SFHQ_RIGHT_EYE = tuple(range(42, 48))  # image-right eye contour
SFHQ_NOSE_TIP = 30
SFHQ_MOUTH_LEFT = 48
SFHQ_MOUTH_RIGHT = 54


def load_npz_array(path, key: str, max_bytes: int) -> np.ndarray:
    """One array of an ``.npz`` file, its sizes checked before anything is inflated or allocated.

    ``np.load`` trusts the member's header: a 3 MB ``.npz`` of zeros can declare and inflate gigabytes. Here the
    member's inflated size (which ``zipfile`` enforces while reading) and the shape in its header must both fit in
    ``max_bytes``. Raises ValueError (missing key, too large, not a plain numeric array, broken file).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                info = archive.getinfo(f"{key}.npy")
            except KeyError:
                keys = ", ".join(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
                raise ValueError(f"no {key!r} array (keys: {keys or 'none'})") from None
            if info.file_size > max_bytes:
                raise ValueError(f"{key!r} inflates to {info.file_size} bytes, over the {max_bytes} bytes limit")
            with archive.open(info) as member:
                data = member.read(max_bytes + 1)
    except ValueError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError, NotImplementedError … of a broken file
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise ValueError(f"{key!r} is not an .npy array: {exc}") from None
    if dtype.hasobject or dtype.kind not in "biufc":
        raise ValueError(f"{key!r} has dtype {dtype}, expected numbers")
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != len(data) - stream.tell():
        raise ValueError(f"{key!r} declares shape {shape} {dtype} ({count * dtype.itemsize} bytes) but holds "
                         f"{len(data) - stream.tell()} bytes")
    array = np.frombuffer(data, dtype, count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran else "C").copy()


def five_points_from_sfhq(landmarks: np.ndarray) -> np.ndarray:
    """(110, 2) SFHQ landmarks -> (5, 2) float64 points in ArcFace template order, same pixel coordinates.

    Raises ValueError for a wrong shape, non-finite values or points that are not laid out like a face.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (SFHQ_NUM_LANDMARKS, 2):
        raise ValueError(f"expected landmarks of shape ({SFHQ_NUM_LANDMARKS}, 2), got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("landmarks contain NaN or infinite values")
    five = np.stack([
        points[list(SFHQ_LEFT_EYE)].mean(axis=0),
        points[list(SFHQ_RIGHT_EYE)].mean(axis=0),
        points[SFHQ_NOSE_TIP],
        points[SFHQ_MOUTH_LEFT],
        points[SFHQ_MOUTH_RIGHT],
    ])
    check_face_layout(five)
    return five


def check_face_layout(five: np.ndarray) -> None:
    """Raise ValueError unless the five points look like eyes / nose / mouth in any in-plane rotation.

    Works in the face's own frame: x along the eye line (left eye -> right eye), y perpendicular to it, towards
    the mouth. Eyes and mouth corners must be ordered left to right, and eyes < nose < mouth along y.
    """
    five = np.asarray(five, dtype=np.float64)
    eye_vec = five[1] - five[0]
    eye_dist = float(np.hypot(*eye_vec))
    if eye_dist < 1e-6:
        raise ValueError("the two eye centres coincide")
    x_axis = eye_vec / eye_dist
    y_axis = np.array([-x_axis[1], x_axis[0]])  # image y grows downwards, so this points from the eyes to the mouth
    local = (five - five[:2].mean(axis=0)) @ np.stack([x_axis, y_axis], axis=1)
    eyes_y = local[:2, 1].mean()
    nose_y = local[2, 1]
    mouth_y = local[3:, 1].mean()
    if not (local[3, 0] < local[4, 0]):
        raise ValueError("mouth corners are in the wrong left/right order relative to the eyes")
    if not (eyes_y < nose_y < mouth_y):
        raise ValueError("eyes, nose tip and mouth are not ordered from top to bottom of the face")


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (2x3 matrix, never a reflection) mapping ``src`` (N, 2) onto ``dst``."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    if not np.ptp(src, axis=0).any():
        raise ValueError("source points are all identical")
    return umeyama(src, dst)[:2]


def arcface_matrix(five_points: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2x3 similarity matrix from image pixels to an ArcFace crop of ``size`` x ``size`` pixels.

    For sizes other than 112 the template is scaled by ``size / 112`` (same framing, more pixels).
    """
    template = ARCFACE_TEMPLATE_112 * (size / 112.0)
    return umeyama_similarity(five_points, template)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to (N, 2) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def align_arcface(image_rgb: np.ndarray, five_points: np.ndarray, size: int = 112,
                  interpolation: int = cv2.INTER_LINEAR, border_value=0) -> np.ndarray:
    """Warp an HxW(x C) uint8 image to the ArcFace ``size`` x ``size`` crop defined by its five points.

    Use ``interpolation=cv2.INTER_NEAREST`` for label maps (segmentations). Pixels outside the source are
    ``border_value``. Large reductions (a 1024 px SFHQ face to 112 px) are anti-aliased, see :func:`warp`.
    """
    return warp(image_rgb, arcface_matrix(five_points, size), size, interpolation, border_value)


def scale_matrix(fx: float, fy: float) -> np.ndarray:
    """2x3 matrix of a resize by (fx, fy), pixel centres at integer coordinates: x' = (x + 0.5) * fx - 0.5."""
    return np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5]])


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2x3 matrix of ``outer`` after ``inner`` (apply ``inner`` first)."""
    a = np.vstack([outer, [0.0, 0.0, 1.0]])
    b = np.vstack([inner, [0.0, 0.0, 1.0]])
    return (a @ b)[:2]


def invert(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]


def warp(image: np.ndarray, matrix: np.ndarray, size: int, interpolation: int = cv2.INTER_LINEAR,
         border_value=0) -> np.ndarray:
    """Warp ``image`` by the 2x3 ``matrix`` into a square ``size`` crop (pixel centres at integer coordinates).

    Bilinear sampling of a strong reduction aliases (every 9th pixel of a 1024 px face for a 112 px crop), so for
    smooth interpolations the image is first shrunk with area averaging to about the crop's scale and the matrix
    composed accordingly; the result maps the same points to the same places.
    """
    image = np.ascontiguousarray(image)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if interpolation != cv2.INTER_NEAREST and scale < 0.75:
        height, width = image.shape[:2]
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        matrix = compose(matrix, invert(scale_matrix(new_w / width, new_h / height)))
    return cv2.warpAffine(image, matrix, (size, size), flags=interpolation, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=border_value)
