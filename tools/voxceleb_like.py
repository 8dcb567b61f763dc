"""Files shaped like VoxCeleb2, for the loader's benchmark and the prepared-format tests.

224 x 224 H.264 .mp4 at 25 fps, x264's default settings (crf 23, preset medium, keyframes every 250
frames, 3 B-frames), yuv420p, with a 16 kHz mono 16-bit .wav beside each, as the authors lay it out.
The picture is a smooth random texture that drifts and a face-sized ellipse that moves, so that the
encoder spends about the bit rate of a real talking-head clip (a few hundred kbit/s).

    python tools/voxceleb_like.py OUT_DIR [--num 64] [--seconds 8]

writes OUT_DIR/NNNNN.mp4 and .wav and OUT_DIR/train.csv (`<video> <audio> <class>` rows).
"""

import argparse
import wave
from pathlib import Path

import av
import numpy as np


def write_clip(path, seed, seconds=8.0, size=224, fps=25, sample_rate=16000):
    """Write `path`.mp4 and `path`.wav."""
    rng = np.random.default_rng(seed)
    num_frames = round(seconds * fps)
    # A texture twice the frame size, low-passed, panned one way; an ellipse that wanders.
    texture = rng.standard_normal((2 * size, 2 * size, 3))
    spectrum = np.fft.fft2(texture, axes=(0, 1))
    fy, fx = np.meshgrid(np.fft.fftfreq(2 * size), np.fft.fftfreq(2 * size), indexing="ij")
    texture = np.fft.ifft2(spectrum / (1 + (np.hypot(fx, fy) / 0.03) ** 2)[..., None], axes=(0, 1)).real
    texture = 128 + 60 * texture / texture.std()
    ys, xs = np.mgrid[0:size, 0:size]
    velocity = rng.uniform(-1.5, 1.5, 2)
    colour = rng.uniform(60, 200, 3)
    with av.open(f"{path}.mp4", mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            oy, ox = (np.array([size / 2, size / 2]) + i * velocity).astype(int) % size
            image = texture[oy:oy + size, ox:ox + size].copy()
            cy, cx = size / 2 + 20 * np.sin(i / 17 + seed), size / 2 + 20 * np.cos(i / 23 + seed)
            inside = ((ys - cy) / 70) ** 2 + ((xs - cx) / 55) ** 2 < 1
            image[inside] = 0.6 * image[inside] + 0.4 * colour
            frame = av.VideoFrame.from_ndarray(np.clip(image, 0, 255).astype(np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    voice = np.sin(2 * np.pi * (120 + 40 * np.sin(3 * t)) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    pcm = (3000 * voice + 300 * rng.standard_normal(t.size)).astype(np.int16)
    with wave.open(f"{path}.wav", "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def write_set(out_dir, num=64, seconds=8.0):
    """Write `num` clips and OUT_DIR/train.csv; returns the manifest's path."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num):
        path = out_dir / f"{i:05d}"
        write_clip(path, seed=i, seconds=seconds)
        rows.append(f"{path}.mp4 {path}.wav {i % 4}\n")
    (out_dir / "train.csv").write_text("".join(rows))
    return out_dir / "train.csv"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num", type=int, default=64, help="number of clips (default 64)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each clip (default 8)")
    args = parser.parse_args()
    print(write_set(args.out_dir, args.num, args.seconds))
