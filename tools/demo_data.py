"""The built-in demo data set: synthetic talking faces with a voice, four emotions.

    python tools/demo_data.py OUT_DIR [--seed 0]
    python tools/demo_data.py OUT_DIR --agreement TIMELINE.csv

writes OUT_DIR/videos/*.mp4 (H.264 + AAC), train.csv (240 clips), test.csv (80) and classes.txt, and
OUT_DIR/recording.mp4: 40 s of one speaker showing the four emotions in turn, 10 s each (recording.csv).

Built so that what pre-training can learn is there to learn, and so that a class cannot be read off
trivial statistics of one modality:
  - the class shows in the face as large shapes (mouth curve, brow angle), and in the voice only in
    time: the pitch contour of every syllable (rising or falling) and the speaking rate (slow or fast).
    Pitch range, loudness and timbre are drawn alike for every class, so the log-Mel's per-bin mean and
    standard deviation carry little of the class;
  - face and voice share a speaker's identity, as in real talking-head data: a lower voice comes with
    darker skin, a duller timbre with darker hair; the mouth opens with the voice's loudness;
  - everything else (background colour, the light's direction, head position and size, expression
    strength) varies at random; the head holds still, only the mouth moves.
"""

import argparse
import csv
import sys
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for python tools/demo_data.py
from data import SAMPLE_RATE  # noqa: E402

DEMO_CLASSES = ("neutral", "happy", "sad", "angry")

_DEMO_FPS = 25
_DEMO_SECONDS = 2.4
_DEMO_SIZE = 64  # frame height and width in pixels: the demo model's input size
_DEMO_HOP = SAMPLE_RATE // _DEMO_FPS  # audio samples per video frame (40 ms)
_DEMO_AAC_FRAME = 1024  # samples per AAC frame

# Voice per class: the pitch contour of every syllable (+1 rising, -1 falling) and syllables per second.
_DEMO_VOICE = {"neutral": (+1, 1.8), "happy": (+1, 4.5), "sad": (-1, 1.8), "angry": (-1, 4.5)}
# Face per class, in head radii: mouth curve (> 0 corners up: a smile) and brow slope (> 0 inner ends down).
_DEMO_FACE = {"neutral": (0.0, 0.0), "happy": (0.3, -0.12), "sad": (-0.3, -0.5), "angry": (-0.08, 0.55)}
_DEMO_SWEEP = 0.35  # octaves a syllable's pitch moves


def _demo_voice(rng, contour, rate, pitch, timbre, num_samples):
    """(waveform, envelope): harmonic syllables at `rate` per second, each sweeping its pitch up or down
    (contour) around a base pitch set by `pitch` in [0, 1]; `timbre` in [0, 1] dulls the harmonics. The
    voice never stops (the envelope dips to 0.3 between syllables) and its harmonics fill the band, so
    that every patch of the spectrogram holds structure that its neighbours predict."""
    sr, period = SAMPLE_RATE, 1.0 / rate
    t = np.arange(num_samples) / sr
    x = (t / period + rng.uniform()) % 1.0  # 0 -> 1 across each syllable
    env = (0.3 + 0.7 * np.sin(np.pi * x) ** 2).astype(np.float32)
    f0 = 110.0 * 2 ** (1.2 * pitch) * 2 ** (contour * _DEMO_SWEEP * (x - 0.5))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    ks = np.arange(1, 31)[:, None]
    amps = ks ** -(0.5 + timbre) * (ks * f0.max() < 0.95 * sr / 2)  # 30 harmonics, none above Nyquist
    source = (amps * np.sin(ks * phase)).sum(0) / np.sqrt((amps ** 2).sum() / 2)
    wave = rng.uniform(0.2, 0.35) * env * source + 0.001 * rng.standard_normal(num_samples)
    return np.clip(wave, -1, 1).astype(np.float32), env


def _soft(dist):
    """Anti-aliased coverage from a signed distance in pixels (negative = inside)."""
    return np.clip(0.5 - dist, 0.0, 1.0)


def _demo_face(rng, curve, slope, pitch, timbre, opening):
    """Frames (T, S, S, 3) uint8 of a face with mouth curve and brow slope, skin from `pitch`, hair from
    `timbre`, and a mouth that opens with `opening` (T,) in [0, 1]. The head holds still: the face is
    drawn once, then the mouth of every frame."""
    size = _DEMO_SIZE
    radius = float(rng.uniform(0.40, 0.46) * size)
    cx, cy = rng.uniform(0.42, 0.58) * size, rng.uniform(0.45, 0.58) * size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = (xs - np.float32(cx)) / np.float32(radius), (ys - np.float32(cy)) / np.float32(radius)  # head radius 1
    strength = rng.uniform(0.7, 1.0)  # how strongly this clip shows its emotion
    curve, slope = strength * curve, strength * slope

    # One light for the scene: the background and the face brighten along the same random direction,
    # so that every patch holds a gradient that its neighbours predict.
    light = rng.uniform(-1, 1, 2)
    shade = (light[0] * u + light[1] * v)[..., None]
    face = (rng.uniform(70, 190, 3) * (1 + 0.3 * shade)).astype(np.float32)

    def paint(img, alpha, colour):
        img += alpha[..., None] * (np.asarray(colour, np.float32) - img)

    skin = np.array([95, 60, 40]) + (0.15 + 0.8 * pitch) * np.array([150, 140, 125])
    hair = np.array([40, 25, 15]) + (1.0 - timbre) * np.array([200, 160, 60])
    head = np.sqrt((u / 0.82) ** 2 + v ** 2)
    paint(face, _soft((head - 1) * radius), (1 + 0.25 * shade) * skin)  # lit by the scene's light
    paint(face, _soft((head - 1) * radius) * _soft((v + 0.5) * radius), hair)  # the top of the head
    for side in (-1, 1):
        eye = np.sqrt(((u - side * 0.33) / 0.13) ** 2 + ((v + 0.12) / 0.09) ** 2)
        paint(face, _soft((eye - 1) * 0.1 * radius), (25, 20, 30))
        brow_v = -0.32 + slope * (0.5 - np.abs(u))  # slope > 0: inner ends (|u| small) lower
        paint(face, _soft(np.maximum(np.abs(v - brow_v) - 0.06, np.abs(u - side * 0.33) - 0.2) * radius), hair * 0.6)

    rows = slice(max(int(cy + 0.1 * radius), 0), min(int(cy + 0.9 * radius) + 2, size))  # the mouth's rows
    u, v = u[rows], v[rows]
    width = 0.45
    across = np.clip(u / width, -1, 1)
    centre = 0.45 - curve * (across ** 2 - 0.5)  # curve > 0: corners above the centre
    outside = np.abs(u) - width
    lips = skin * 0.5 + np.array([90, 10, 20])
    frames = np.repeat(face[None], opening.size, axis=0)
    for frame, amount in zip(frames, opening):
        gap = (0.02 + 0.16 * amount) * np.sqrt(1 - across ** 2)
        mouth = frame[rows]
        paint(mouth, _soft(np.maximum(np.abs(v - centre) - gap - 0.06, outside) * radius), lips)
        paint(mouth, _soft(np.maximum(np.abs(v - centre) - gap, outside + 0.03) * radius), (50, 10, 20))
    return np.clip(frames + 0.5, 0, 255).astype(np.uint8)


def _write_mp4(path, frames, wave):
    """Write frames (T, H, W, 3) uint8 as H.264 and wave (N,) float32 as AAC into one .mp4."""
    with av.open(str(path), mode="w") as container:
        # one thread and no lookahead (rc-lookahead, mbtree): with them x264 wrote some of these small clips
        # differently from run to run
        video = container.add_stream("libx264", rate=_DEMO_FPS, options={
            "preset": "veryfast", "crf": "18", "x264-params": "threads=1:rc-lookahead=0:mbtree=0"})
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.codec_context.thread_count = 1
        audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono", options={"aac_coder": "fast"})
        audio.bit_rate = 32000
        # Mux in time order: after each video frame, the audio chunks that start before its end.
        next_sample = 0
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
            frame_end = wave.size if i == len(frames) - 1 else (i + 1) * _DEMO_HOP
            while next_sample < frame_end:
                chunk = av.AudioFrame.from_ndarray(
                    wave[None, next_sample:next_sample + _DEMO_AAC_FRAME], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = SAMPLE_RATE, next_sample
                container.mux(audio.encode(chunk))
                next_sample += _DEMO_AAC_FRAME
        container.mux(video.encode(None))
        container.mux(audio.encode(None))


def _demo_clip(seed, split_id, index, label):
    """Frames and waveform of one clip; its randomness comes only from (seed, split, index)."""
    rng = np.random.default_rng([seed, split_id, index])
    name = DEMO_CLASSES[label]
    pitch, timbre = rng.uniform(size=2)  # the speaker: shared by face and voice
    wave, env = _demo_voice(rng, *_DEMO_VOICE[name], pitch, timbre, int(_DEMO_SECONDS * SAMPLE_RATE))
    opening = env[: env.size // _DEMO_HOP * _DEMO_HOP].reshape(-1, _DEMO_HOP).mean(1)  # per video frame
    return _demo_face(rng, *_DEMO_FACE[name], pitch, timbre, opening), wave


RECORDING_SECONDS = 10  # per emotion of the demo recording


def write_demo_recording(out_dir, seed=0):
    """OUT_DIR/recording.mp4: one speaker (one face, one voice) showing DEMO_CLASSES in turn, RECORDING_SECONDS
    each, for evaluate.py --video; OUT_DIR/recording.csv names its segments (start_s, end_s, emotion)."""
    out_dir = Path(out_dir)
    pitch, timbre = np.random.default_rng([seed, 2, 0]).uniform(size=2)
    frames, waves, rows = [], [], ["start_s,end_s,emotion\n"]
    for i, name in enumerate(DEMO_CLASSES):
        wave, env = _demo_voice(np.random.default_rng([seed, 2, 1, i]), *_DEMO_VOICE[name], pitch, timbre,
                                RECORDING_SECONDS * SAMPLE_RATE)
        opening = env.reshape(-1, _DEMO_HOP).mean(1)
        # the same generator for every segment's face: the same head, background and light throughout
        frames.append(_demo_face(np.random.default_rng([seed, 2, 0]), *_DEMO_FACE[name], pitch, timbre, opening))
        waves.append(wave)
        rows.append(f"{i * RECORDING_SECONDS},{(i + 1) * RECORDING_SECONDS},{name}\n")
    _write_mp4(out_dir / "recording.mp4", np.concatenate(frames), np.concatenate(waves))
    (out_dir / "recording.csv").write_text("".join(rows))
    return str(out_dir / "recording.mp4")


def write_demo(out_dir, seed=0, num_train=240, num_test=80):
    """Write the demo set: OUT_DIR/videos/*.mp4, train.csv, test.csv and classes.txt, and the demo recording
    (write_demo_recording).

    Manifest rows are `<video path> <audio path> <label>` with absolute paths; the audio path is the
    .mp4 itself. Classes are balanced (clip i has label i % 4). Returns the two manifest paths.
    """
    out_dir = Path(out_dir).resolve()
    if any(ch.isspace() for ch in str(out_dir)):
        raise ValueError(f"demo output path must not contain whitespace (manifests are space separated): {out_dir}")
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "classes.txt").write_text("".join(name + "\n" for name in DEMO_CLASSES))
    manifests = []
    for split_id, (split, count) in enumerate((("train", num_train), ("test", num_test))):
        rows = []
        for index in range(count):
            label = index % len(DEMO_CLASSES)
            path = video_dir / f"{split}_{index:04d}_{DEMO_CLASSES[label]}.mp4"
            _write_mp4(path, *_demo_clip(seed, split_id, index, label))
            rows.append(f"{path} {path} {label}\n")
        manifest = out_dir / f"{split}.csv"
        manifest.write_text("".join(rows))
        manifests.append(str(manifest))
    write_demo_recording(out_dir, seed)
    return manifests[0], manifests[1]


def recording_agreement(timeline, segments):
    """(agreeing, counted): of the windows of a timeline CSV (evaluate.py --video) that lie wholly inside one
    segment of the demo recording (recording.csv), how many have that segment's emotion as their top class."""
    with open(segments, newline="") as f:
        spans = [(float(r["start_s"]), float(r["end_s"]), r["emotion"]) for r in csv.DictReader(f)]
    agreeing = counted = 0
    with open(timeline, newline="") as f:
        for row in csv.DictReader(f):
            inside = [name for start, end, name in spans
                      if start <= float(row["start_s"]) and float(row["end_s"]) <= end]
            if inside and row[DEMO_CLASSES[0]] != "":
                counted += 1
                agreeing += max(DEMO_CLASSES, key=lambda name: float(row[name])) == inside[0]
    return agreeing, counted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--agreement", metavar="TIMELINE.csv",
                        help="print how often a window's top class is its segment's emotion, for the timeline of "
                             "OUT_DIR/recording.mp4 (evaluate.py --video), instead of writing")
    args = parser.parse_args(argv)
    if args.agreement:
        agreeing, counted = recording_agreement(args.agreement, Path(args.out_dir) / "recording.csv")
        print(f"{agreeing} of {counted} windows wholly inside a segment ({agreeing / counted:.1%}) have its emotion "
              "as their top class")
        return
    start = time.perf_counter()
    train, test = write_demo(args.out_dir, args.seed)
    print(f"wrote {train} and {test} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
