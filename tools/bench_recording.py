"""The speed and memory of `evaluate.py --video` on a long recording of a real face.

    python tools/bench_recording.py [--checkpoint C | --size base] [--minutes 10] [--face_crop on|off] [--threads N]

Writes (once) a recording of tests/fixtures/face.jpg moving as tools/face_clips.py moves it (480 x 360, 25 frames/s,
with a tone as its audio), then runs evaluate.py's --video on it in this process and prints the windows, windows
per second, how many times faster than real time, the seconds spent aligning faces (evaluate.FaceAligner) and
their share, and the process's peak memory (its peak RSS, model included). Without --checkpoint: a HiCMAE model of
--size at random initialisation (its speed is that of trained weights), 6 classes.
"""

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for python tools/bench_recording.py
import evaluate  # noqa: E402
from model import HiCMAEClassifier, make_config  # noqa: E402
from tools import face_clips  # noqa: E402


def write_recording(path, seconds, fps=25):
    """The face of face_clips moving through a 10 s cycle, and a 220 Hz tone, for `seconds`."""
    face = Image.open(face_clips.FACE).convert("RGB")
    cycle = [face_clips.frame(face, *face_clips.motion(k, 10 * fps)) for k in range(10 * fps)]
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=Fraction(fps), options={"preset": "veryfast"})
        video.width, video.height, video.pix_fmt = face_clips.WIDTH, face_clips.HEIGHT, "yuv420p"
        audio = container.add_stream("aac", rate=16000, layout="mono")
        hop = 16000 // fps
        tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(hop) / 16000)).astype(np.float32)[None]
        for k in range(round(seconds * fps)):
            container.mux(video.encode(av.VideoFrame.from_image(cycle[k % len(cycle)])))
            chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, k * hop
            container.mux(audio.encode(chunk))
        container.mux(video.encode(None))
        container.mux(audio.encode(None))
    return str(path)


def random_checkpoint(path, size):
    model = HiCMAEClassifier(make_config(size), "av", 6)
    torch.save(dict(model=model.state_dict(), model_config=asdict(model.cfg),
                    args=dict(task="classification", modality="av", num_outputs=6, sampling_rate=4)), path)
    return str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a fine-tuned checkpoint (default: --size at random initialisation)")
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the recording (default 10)")
    parser.add_argument("--face_crop", default="on", choices=["on", "off"])
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "bench_recording"),
                        help="where the recording (kept for later runs) and the timeline go")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    recording = work / f"face-{args.minutes:g}min.mp4"
    if not recording.exists():
        start = time.perf_counter()
        write_recording(recording, args.minutes * 60)
        print(f"wrote {recording} in {time.perf_counter() - start:.0f} s")
    checkpoint = args.checkpoint or random_checkpoint(work / f"random-{args.size}.pth", args.size)
    if args.threads:
        torch.set_num_threads(args.threads)

    aligning, windows = [0.0], [0]
    call = evaluate.FaceAligner.__call__

    def timed(self, frames, ticks):
        start = time.perf_counter()
        out = call(self, frames, ticks)
        aligning[0] += time.perf_counter() - start
        windows[0] += 1
        return out

    evaluate.FaceAligner.__call__ = timed
    start = time.perf_counter()
    code = evaluate.main(["--checkpoint", checkpoint, "--video", str(recording), "--face_crop", args.face_crop,
                          "--output_dir", str(work / "out"), "--device", "cpu", "--num_workers", "0"])
    elapsed = time.perf_counter() - start
    rows = (work / "out" / f"{recording.stem}.timeline.csv").read_text().count("\n") - 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{rows} windows of {args.minutes * 60:.0f} s in {elapsed:.1f} s: {rows / elapsed:.2f} windows/s, "
          f"{args.minutes * 60 / elapsed:.2f} x real time, {torch.get_num_threads()} torch threads; aligning faces "
          f"{aligning[0]:.1f} s ({aligning[0] / elapsed:.0%}); peak RSS {peak:.0f} MB")
    return code


if __name__ == "__main__":
    sys.exit(main())
