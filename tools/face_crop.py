"""Aligned face crops as OpenFace 2.2 writes them, without OpenFace: one folder of frames per video.

    python tools/face_crop.py INPUT... --out DIR [--workers N] [--size 256]

INPUT: video files (anything FFmpeg reads) or folders of them (their .flv, .mp4, .avi, .mkv, .mov, .webm, ...
files). Each clip NAME.ext becomes DIR/NAME/frame_det_00_000001.jpg, ...: one SIZE x SIZE frame per video
frame, the layout of OpenFace's `FeatureExtraction -simalign -simsize SIZE -format_aligned jpg -nomask`
and what `data.py crema-d --videos DIR` and the manifests read.

The alignment is OpenFace 2.2's (FaceAnalyser, Face_utils.cpp AlignFace with its rigid points): a similarity
(scale, rotation) fitted on 24 of the 68 landmarks (face outline at the cheeks, nose, eye corners: the
points that move least with expression) onto OpenFace's mean face (its PDM, carried in
tools/openface_mean_shape_68.txt) scaled by SIZE x 0.7 / 112, the face's centre (the mean of its 68
landmarks, where OpenFace puts the origin of its fitted 3D shape) moved to the middle, bilinear, black
outside the frame, no mask, jpg quality 95.

The landmarks are dlib's (its HOG face detector and its 68-point shape predictor, the same 68-point scheme as
OpenFace's), from the optional requirements-faces.txt; nothing is downloaded at run time. dlib's 68-point
model was trained on the iBUG 300-W data set, whose licence excludes commercial use (as OpenFace's licence
does). One face per clip: the largest in the first frame where one is found, then followed from frame to
frame (each frame is turned upright and scaled by the previous frame's landmarks, and the detector looks
for the face there; if it is not there, in the whole frame near where it was). A frame where the face is
not found takes the landmarks of the nearest frame where it is. A clip without a face in any frame, or that
cannot be decoded, is named with the reason and gets no folder; the exit status is then 1. A clip's folder
appears when it is complete (written as DIR/.NAME.partial, then renamed), so a rerun skips the clips
already there and redoes the rest.
"""

import argparse
import multiprocessing
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for python tools/face_crop.py
from data import VIDEO_EXTENSIONS, DataError, Progress, _open, _reading  # noqa: E402

MEAN_SHAPE = np.loadtxt(Path(__file__).with_name("openface_mean_shape_68.txt"))[:, :2]  # (68, 2) mm, x right, y down
# OpenFace's rigid points (Face_utils.cpp, extract_rigid_points): cheeks, nose bridge and base, eye corners.
RIGID = [1, 2, 3, 4, 12, 13, 14, 15, 27, 28, 29, 31, 32, 33, 34, 35, 36, 39, 40, 41, 42, 45, 46, 47]
TRACK_SIZE, TRACK_SCALE = 200, 1.0  # the upright view the face is looked for in, and its pixels per mm
EXTRA_MISSING = ("tools/face_crop.py needs dlib and its 68-point landmark model: "
                 "pip install -r requirements-faces.txt")


_MODELS = None  # loaded once per process


def load_models():
    """dlib's HOG face detector and 68-point shape predictor; SystemExit with one line if not installed."""
    global _MODELS
    if _MODELS is None:
        try:
            import dlib
            import face_recognition_models
        except ImportError:
            raise SystemExit(EXTRA_MISSING) from None
        _MODELS = dlib.get_frontal_face_detector(), dlib.shape_predictor(
            face_recognition_models.pose_predictor_model_location())
    return _MODELS


# 1. Geometry: OpenFace's similarity alignment

def similarity(src, dst):
    """The 2 x 2 matrix A (scale times rotation) of OpenFace's AlignShapesWithScale: both point sets centred,
    the scale the ratio of their RMS radii, the rotation Kabsch's (no reflection); dst - mean ~ A (src - mean)."""
    src, dst = src - src.mean(0), dst - dst.mean(0)
    scale = np.sqrt((dst ** 2).sum() / (src ** 2).sum())
    u, _, vt = np.linalg.svd(src.T @ dst)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    return scale * (vt.T @ np.diag([1.0, d]) @ u.T)


def alignment(landmarks, scale, size):
    """(A, b): the affine map x -> A x + b from frame pixels to the size x size aligned face, whose rigid points
    match MEAN_SHAPE * scale (pixels per mm) and whose centre is the middle pixel (size // 2, as OpenFace)."""
    a = similarity(landmarks[RIGID], MEAN_SHAPE[RIGID] * scale)
    return a, size // 2 - a @ landmarks.mean(0)


def warp(image, a, b, size):
    """The size x size image out(x) = image(A^-1 (x - b)), bilinear, black outside: OpenCV's warpAffine with
    pixel centres at integers, written for Pillow, whose pixel centres are at +0.5."""
    inv = np.linalg.inv(a)
    offset = 0.5 - inv @ (b + 0.5)
    return image.transform((size, size), Image.Transform.AFFINE, (*inv[0], offset[0], *inv[1], offset[1]),
                           Image.Resampling.BILINEAR)


# 2. Landmarks of one clip

class FaceFollower:
    """The 68 landmarks of one face through a clip, frame by frame; None where it is not found."""

    def __init__(self, models):
        self.detector, self.predictor = models
        self.previous = None  # the last frame's landmarks

    def _shape(self, gray, box):
        parts = self.predictor(gray, box).parts()
        return np.array([(p.x, p.y) for p in parts], dtype=np.float64)

    def _in_frame(self, gray):
        """Landmarks of the largest face in the whole frame (the one nearest the previous face when following)."""
        boxes = self.detector(gray, 0) or self.detector(gray, 1)  # faces of 80 pixels and up, then 40
        if not boxes:
            return None
        if self.previous is None:
            box = max(boxes, key=lambda r: r.area())
        else:
            centre = self.previous.mean(0)
            reach = np.ptp(self.previous, axis=0).max()  # not a new person elsewhere in the frame
            box = min(boxes, key=lambda r: np.hypot(*(_centre(r) - centre)))
            if np.hypot(*(_centre(box) - centre)) > reach:
                return None
        return self._shape(gray, box)

    def _near_previous(self, image):
        """Landmarks from the upright view of the previous face; None if the detector finds no face there."""
        a, b = alignment(self.previous, TRACK_SCALE, TRACK_SIZE)
        view = np.asarray(warp(image, a, b, TRACK_SIZE))
        boxes = self.detector(view, 0)
        if not boxes:
            return None
        box = min(boxes, key=lambda r: np.hypot(*(_centre(r) - TRACK_SIZE / 2)))
        return (self._shape(view, box) - b) @ np.linalg.inv(a).T

    def __call__(self, gray_image):
        """Landmarks (68, 2) in frame pixels of the face in this frame (a grayscale PIL image), or None."""
        landmarks = self._near_previous(gray_image) if self.previous is not None else None
        if landmarks is None:
            landmarks = self._in_frame(np.asarray(gray_image))
        if landmarks is not None:
            self.previous = landmarks
        return landmarks


def _centre(rect):
    return np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])


# 3. One clip

def frames(path):
    """The frames of a video file in display order, as RGB PIL images; DataError naming the file."""
    with _reading(path, "video"):
        container = _open(path)
        with container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "NONE"  # one core per worker; the workers are the parallelism
            count = 0
            for frame in container.decode(stream):
                count += 1
                yield frame.to_image()
            if not count:
                raise DataError(f"{path}: the video stream holds no frames")
            if stream.frames and count < stream.frames:
                raise DataError(f"{path}: truncated: {count} of {stream.frames} video frames decoded")
            # A container that does not count its frames (FLV) still states its duration.
            announced = container.duration and stream.average_rate and container.duration / 1e6 * stream.average_rate
            if announced and count < 0.9 * announced:
                raise DataError(f"{path}: truncated: {count} frames decoded, its header announces "
                                f"{container.duration / 1e6:.2f} s at {float(stream.average_rate):g} frames/s")


def frame_name(i):
    """OpenFace's name of the aligned face of frame i (0-based): frame_det_00_000001.jpg for the first."""
    return f"frame_det_00_{i + 1:06d}.jpg"


def crop_clip(path, folder, size, models):
    """Write folder/frame_det_00_NNNNNN.jpg for every frame of the video at path; returns (frames, frames
    without a detection). DataError if it cannot be decoded or shows no face."""
    scale = size * 0.7 / 112  # OpenFace's -simsize alone: SIZE frames the face as its default 112 does
    follow, found, missing = FaceFollower(models), {}, []
    for i, image in enumerate(frames(path)):
        landmarks = follow(image.convert("L"))
        if landmarks is None:
            missing.append(i)
            continue
        found[i] = landmarks
        _write(image, landmarks, scale, size, os.path.join(folder, frame_name(i)))
    if not found:
        raise DataError(f"{path}: no face found in any of its {len(missing)} frames")
    if missing:  # decode again for the frames without a face: each takes its nearest frame's landmarks
        detected = np.array(sorted(found))
        wanted = set(missing)
        for i, image in enumerate(frames(path)):
            if i in wanted:
                nearest = detected[np.abs(detected - i).argmin()]
                _write(image, found[nearest], scale, size, os.path.join(folder, frame_name(i)))
    return len(found) + len(missing), len(missing)


def _write(image, landmarks, scale, size, path):
    a, b = alignment(landmarks, scale, size)
    warp(image, a, b, size).save(path, quality=95)  # OpenCV's imwrite default, as OpenFace writes


# 4. Many clips

def clip_inputs(inputs):
    """The video files named, and those in the folders named (by extension, in name order); DataError for
    an input that does not exist or a folder without videos."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir()
                           if p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith("."))
            if not found:
                raise DataError(f"{item}: no video files in this folder (its subfolders are not searched: for "
                                "CREMA-D name its VideoFlash folder)")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return paths


def _crop_job(job):
    """(path, frames, frames without a detection, CPU seconds, error message or None); in a worker."""
    path, out_dir, size = job
    models = load_models()
    start = time.process_time()
    final = os.path.join(out_dir, Path(path).stem)
    partial = os.path.join(out_dir, f".{Path(path).stem}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed run left
    os.makedirs(partial)
    try:
        num, missing = crop_clip(path, partial, size, models)
        os.rename(partial, final)
        return path, num, missing, time.process_time() - start, None
    except DataError as e:
        return path, 0, 0, time.process_time() - start, str(e)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def face_crop(inputs, out_dir, workers=1, size=256):
    """Crop every clip of `inputs` into out_dir (see the top of this file); returns the number of clips that
    failed."""
    paths = clip_inputs(inputs)  # what is wrong with the inputs is said with or without the extra
    load_models()  # the one-line message before any work if the extra is missing
    os.makedirs(out_dir, exist_ok=True)
    jobs, failed, seen = [], 0, {}
    for path in paths:
        stem = Path(path).stem
        if stem in seen:
            print(f"{path}: same name as {seen[stem]}: both would be {os.path.join(out_dir, stem)}; left out")
            failed += 1
        elif not os.path.isdir(os.path.join(out_dir, stem)):
            jobs.append((path, out_dir, size))
        seen[stem] = seen.get(stem, path)
    done = len(seen) - len(jobs) - failed
    print(f"{len(paths)} clips: {done} already in {out_dir}, {len(jobs)} to crop")
    progress = Progress("face_crop:", len(jobs), "frames")
    frames_total = missing_total = cpu = cropped = 0
    start = time.perf_counter()
    # spawn: a forked copy of a process with threads (torch's, FFmpeg's) can hang
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else nullcontext() as pool:
        results = pool.imap_unordered(_crop_job, jobs) if pool else map(_crop_job, jobs)
        for path, num, missing, seconds, error in results:
            if error:
                progress.note(error)
                failed += 1
            cropped += error is None
            frames_total, missing_total, cpu = frames_total + num, missing_total + missing, cpu + seconds
            progress.update(error is not None, num)
    progress.close()
    elapsed = time.perf_counter() - start
    print(f"{cropped} clips cropped, {frames_total} frames ({missing_total} without a "
          f"detection: they took the landmarks of their nearest frame with one), {failed} failed")
    if frames_total:
        print(f"{elapsed:.1f} s, {frames_total / elapsed:.1f} frames/s with {workers} worker(s); "
              f"{1000 * cpu / frames_total:.1f} ms CPU per frame = {frames_total / cpu:.1f} frames/s per core")
    return failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="video files or folders of them")
    parser.add_argument("--out", required=True, help="folder of the clips' frame folders")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--size", type=int, default=256, help="pixels of the square aligned frames (default 256, "
                        "the authors'; OpenFace's -simsize)")
    args = parser.parse_args(argv)
    try:
        return 1 if face_crop(args.inputs, args.out, args.workers, args.size) else 0
    except DataError as e:
        raise SystemExit(f"face_crop.py: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
