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
outside the frame, no mask, jpg quality 95. It is evaluate.py's (section 5), which aligns the faces of a
recording in memory for `evaluate.py --video` the same way.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for python tools/face_crop.py
import data  # noqa: E402
from data import DataError, Progress, open_media, reading  # noqa: E402
from evaluate import FaceFollower, aligned_face, load_face_models, nearest_landmarks  # noqa: E402

EXTRA_MISSING = "tools/face_crop.py needs dlib and its 68-point landmark model: pip install -r requirements-faces.txt"


def load_models():
    """dlib's detector and landmark model (evaluate.load_face_models); SystemExit with one line if not installed."""
    try:
        return load_face_models()
    except ImportError:
        raise SystemExit(EXTRA_MISSING) from None


# 1. One clip

def frames(path):
    """The frames of a video file in display order, as RGB PIL images; DataError naming the file."""
    with reading(path, "video"):
        container = open_media(path)
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
    without a detection). DataError if it cannot be decoded or shows no face. A frame without a detection takes
    the landmarks of its nearest frame with one (evaluate.nearest_landmarks): the clip is decoded twice rather
    than held in memory."""
    follow, found = FaceFollower(models), []
    for i, image in enumerate(frames(path)):
        found.append(follow(image.convert("L")))
        if found[-1] is not None:
            _write(image, found[-1], size, os.path.join(folder, frame_name(i)))
    missing = [i for i, landmarks in enumerate(found) if landmarks is None]
    if len(missing) == len(found):
        raise DataError(f"{path}: no face found in any of its {len(missing)} frames")
    if missing:
        filled, wanted = nearest_landmarks(found), set(missing)
        for i, image in enumerate(frames(path)):
            if i in wanted:
                _write(image, filled[i], size, os.path.join(folder, frame_name(i)))
    return len(found), len(missing)


def _write(image, landmarks, size, path):
    aligned_face(image, landmarks, size).save(path, quality=95)  # OpenCV's imwrite default, as OpenFace writes


# 2. Many clips

def clip_inputs(inputs):
    """The video files named, and those in the folders named (by extension, in name order); DataError for
    an input that does not exist or a folder without videos."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir()
                           if p.suffix.lower() in data.VIDEO_EXTENSIONS and not p.name.startswith("."))
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
