"""CREMA-D-shaped clips of a real face moving by known rolls, scales and shifts, for tools/face_crop.py.

    python tools/face_clips.py OUT [--num 8] [--frames 75]

writes OUT/VideoFlash/NAME.flv (480 x 360, 30 frames/s, FLV1 like CREMA-D's) and OUT/AudioWAV/NAME.wav (16 kHz,
silent) for NAME = 1001_DFA_ANG_XX, 1001_DFA_DIS_XX, ...: the face of tests/fixtures/face.jpg (a public-domain NASA
photo) over a plain grey background, rolled up to +-25 degrees, scaled 0.8 to 1.25 and shifted, smoothly
over each clip (`motion`). The tests and the speed figure of face_crop.py use them.
"""

import argparse
import fractions
import math
import wave
from pathlib import Path

import av
import numpy as np
from PIL import Image

FACE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "face.jpg"
# The pupils in FACE's pixels (x right, y down), marked by hand on the photo (see tests/fixtures/README.md).
PUPILS = np.array([(53.5, 75.6), (96.0, 77.5)])
WIDTH, HEIGHT, FPS = 480, 360, 30
BACKGROUND = (128, 128, 128)
BASE_SCALE = 1.3  # the face's size at scale 1: pupils 55 pixels apart, as an actor's in CREMA-D's frames
EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


def motion(k, n):
    """Frame k of n: (roll in degrees, counter-clockwise on screen; scale; shift (dx, dy) in pixels) of the face
    about the frame's centre. The first frame is upright at scale 1, in the middle."""
    t = k / max(n - 1, 1)
    return (25 * math.sin(2 * math.pi * t), 1.25 ** math.sin(4 * math.pi * t),
            (40 * math.sin(3 * math.pi * t), 20 * math.sin(2 * math.pi * t)))


def placement(roll, scale, shift):
    """(M, c): FACE's pixel p lands at M p + c in the frame (pixel centres at integers): its pupils' midpoint at
    the frame's centre plus `shift`, turned by `roll` and scaled by BASE_SCALE * `scale`."""
    r = math.radians(roll)
    m = BASE_SCALE * scale * np.array([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]])  # y points down
    target = np.array([(WIDTH - 1) / 2, (HEIGHT - 1) / 2]) + shift
    return m, target - m @ PUPILS.mean(0)


def frame(face, roll, scale, shift):
    """One RGB frame (PIL) showing `face` placed as `placement` says."""
    m, c = placement(roll, scale, shift)
    inv = np.linalg.inv(m)
    offset = 0.5 - inv @ (c + 0.5)  # Pillow's pixel centres are at +0.5
    return face.transform((WIDTH, HEIGHT), Image.Transform.AFFINE, (*inv[0], offset[0], *inv[1], offset[1]),
                          Image.Resampling.BILINEAR, fillcolor=BACKGROUND)


def write_video(path, images, fps=FPS):
    """A video file of RGB PIL images (FLV1 for .flv, H.264 otherwise)."""
    with av.open(str(path), "w") as container:
        flv = str(path).endswith(".flv")
        stream = container.add_stream("flv" if flv else "libx264", rate=fractions.Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if flv:
            stream.bit_rate = 2_000_000
        for image in images:
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode(None))
    return str(path)


def write_clip(path, num_frames, face=None):
    """A clip of the moving face; returns the motion of its frames."""
    face = face or Image.open(FACE).convert("RGB")
    moves = [motion(k, num_frames) for k in range(num_frames)]
    write_video(path, (frame(face, *move) for move in moves))
    return moves


def write_silence(path, seconds, rate=16000):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.zeros(int(seconds * rate), dtype=np.int16).tobytes())


def write_set(out, num=8, num_frames=75):
    """OUT/VideoFlash/NAME.flv and OUT/AudioWAV/NAME.wav for `num` CREMA-D names; returns the names."""
    out = Path(out)
    (out / "VideoFlash").mkdir(parents=True, exist_ok=True)
    (out / "AudioWAV").mkdir(exist_ok=True)
    face = Image.open(FACE).convert("RGB")
    names = [f"{1001 + i // 6}_DFA_{EMOTIONS[i % 6]}_XX" for i in range(num)]
    for name in names:
        write_clip(out / "VideoFlash" / f"{name}.flv", num_frames, face)
        write_silence(out / "AudioWAV" / f"{name}.wav", num_frames / FPS)
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--num", type=int, default=8, help="clips (default 8)")
    parser.add_argument("--frames", type=int, default=75, help="frames per clip (default 75, 2.5 s)")
    args = parser.parse_args(argv)
    names = write_set(args.out, args.num, args.frames)
    print(f"{len(names)} clips of {args.frames} frames in {args.out}/VideoFlash, their wavs in {args.out}/AudioWAV")


if __name__ == "__main__":
    main()
