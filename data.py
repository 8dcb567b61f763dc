"""Data for HiCMAE, in the order the data flows: manifests, decoding, clip sampling, log-Mel features, masks,
transforms, data sets, and the command line (python data.py check|scan|crema-d|folders). Every random choice of an
item comes from a generator seeded by (seed, epoch, index): an item does not depend on the number of workers or
processes.
"""

import argparse
import itertools
import math
import os
import random
import re
import sys
import time
import warnings
import wave
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from model import IMAGENET_MEAN, IMAGENET_STD, HiCMAEConfig  # the model's input normalisation and geometry

# 0. Constants and the error type

FBANK_MEAN = -4.2677393  # AudioSet statistics of the log-Mel features, as the authors
FBANK_STD = 4.5689974
SAMPLE_RATE = 16000
MIN_AUDIO_SAMPLES = 1024  # a window of this many samples (64 ms) or fewer is unusable
AUDIO_ONLY_FPS = 25  # the frame rate given to audio without video (data sets' videos are 25 or 30 fps)
AUDIO_HINT = "name its audio file: a manifest row's <audio> field, or evaluate.py --audio FILE"
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# The files taken for videos where a folder is listed (data.py folders, evaluate.py --video, tools/face_crop.py);
# any case.
VIDEO_EXTENSIONS = (".flv", ".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".3gp", ".ts")
TASKS = ("pretrain", "classification", "regression")
MULTISCALE_SCALES = (1.0, 0.875, 0.75, 0.66)
# The 13 crop positions of the pre-training crop, in quarters of the free room (x, y).
MULTISCALE_POSITIONS = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
                        (1, 1), (3, 1), (1, 3), (3, 3))


class DataError(Exception):
    """A sample that cannot be used; the message names the manifest row, the path and the reason."""


@contextmanager
def reading(path, what):
    """Turn an error of the decoder or the file system into a DataError naming the path."""
    try:
        yield
    except DataError:
        raise
    except (av.FFmpegError, OSError, RuntimeError, ValueError, EOFError, wave.Error) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise DataError(f"{path}: cannot read {what}: {reason}") from None


# 1. Manifests

@dataclass
class Sample:
    video: str  # a video file or a folder of frames
    audio: str | None  # an audio file, or None: the audio stream of the video file
    target: int | list[float] | None  # class index, regression targets, or None (pre-training)
    row: str | None  # where the sample comes from, "train.csv:12" (None: a file named on the command line)


def root_map_arg(pair):
    """The argparse type of --root_map: "OLD=NEW" -> (OLD, NEW), a path prefix to rewrite, else a usage error."""
    old, sep, new = pair.partition("=")
    if not sep or not old:
        raise argparse.ArgumentTypeError(f"a root map is OLD=NEW, got {pair!r}")
    return old, new


def add_root_map(parser):
    """--root_map OLD=NEW, as every command that reads a manifest takes it."""
    parser.add_argument("--root_map", action="append", default=[], metavar="OLD=NEW", type=root_map_arg,
                        help="replace the path prefix OLD of the manifest's paths by NEW (repeatable; the first "
                             "match wins)")


def _resolve(path, root_map, base):
    for old, new in root_map:
        if path.startswith(old):
            path = new + path[len(old):]
            break
    return path if os.path.isabs(path) else os.path.join(base, path)


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _parse_row(fields, task, row):
    """(video, audio, target) of one manifest row, or DataError."""
    if task == "pretrain":  # <video> [<audio>] [labels, ignored]; the authors write `<video> 0`
        audio = fields[1] if len(fields) > 1 and not _is_number(fields[1]) else None
        return fields[0], audio, None
    if len(fields) < 3:
        raise DataError(f"{row}: expected '<video> <audio> <label...>', got {len(fields)} fields")
    if task == "classification":
        if len(fields) != 3:
            raise DataError(f"{row}: expected '<video> <audio> <class index>', got {len(fields)} fields")
        if not fields[2].isdigit():
            raise DataError(f"{row}: label {fields[2]!r} is not a class index")
        return fields[0], fields[1], int(fields[2])
    try:  # regression
        target = [float(x) for x in fields[2:]]
    except ValueError:
        raise DataError(f"{row}: regression targets {fields[2:]} are not all numbers") from None
    if not all(math.isfinite(x) for x in target):
        raise DataError(f"{row}: regression targets {fields[2:]} are not all finite")
    return fields[0], fields[1], target


def read_manifest(path, root_map=(), task="pretrain", errors=None):
    """Samples of a manifest, `<video> <audio> <label...>` per line (pre-training: `<video>` may stand alone),
    paths rewritten by `root_map`; a bad row raises DataError naming file:line, or goes to `errors` (a list)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: one of {TASKS}")
    base = os.path.dirname(os.path.abspath(path))
    samples, num_targets = [], None
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            fields, row = line.split(), f"{path}:{lineno}"
            if not fields or fields[0].startswith("#"):
                continue
            try:
                video, audio, target = _parse_row(fields, task, row)
                if task == "regression":
                    num_targets = num_targets or len(target)
                    if len(target) != num_targets:
                        raise DataError(f"{row}: {len(target)} regression targets, earlier rows have {num_targets}")
            except DataError as e:
                if errors is None:
                    raise
                errors.append(e)
                continue
            audio = None if audio is None else _resolve(audio, root_map, base)
            samples.append(Sample(_resolve(video, root_map, base), audio, target, row))
    if not samples and errors is None:
        raise DataError(f"{path}: no samples")
    return samples


def guess_task(path):
    """'classification', 'regression' or 'pretrain', from the first row of a manifest."""
    with open(path) as f:
        fields = next((line.split() for line in f if line.split() and not line.startswith("#")), [])
    if len(fields) >= 3 and all(_is_number(x) for x in fields[2:]):
        return "classification" if len(fields) == 3 and fields[2].isdigit() else "regression"
    return "pretrain"


# 2. Decoding

class _Frames:
    """The frames of a sample (a video file, a frame folder, an audio timeline), used in a `with` block."""

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_media(path):
    """av.open, telling apart the two usual files in which FFmpeg finds no media at all."""
    try:
        return av.open(path)
    except av.InvalidDataError:
        with open(path, "rb") as f:
            head = f.read(12)
        if head[4:8] == b"ftyp":  # an MP4/MOV whose index (moov box) would have come at the end
            raise DataError(f"{path}: an MP4/MOV file without its index (moov box): cut short while being "
                            "written or copied; copy it again") from None
        raise DataError(f"{path}: not a media file FFmpeg can read ({os.path.getsize(path)} bytes)") from None


class VideoFile(_Frames):
    """A video file of any container and codec FFmpeg reads, demuxed once (the packets stay in memory);
    frame i is the i-th in display order. `audio=True`: `self.audio` is a Waveform of its audio stream."""

    def __init__(self, path, audio=False):
        self.path = path
        with reading(path, "video"):
            self.container = open_media(path)
            try:
                self._demux(audio)
            except BaseException:
                self.close()
                raise

    def _demux(self, audio):
        """Read every packet of the video stream (and of the audio stream, decoded, when `audio`)."""
        container, path = self.container, self.path
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        if audio and not container.streams.audio:
            raise DataError(f"{path}: no audio stream ({AUDIO_HINT})")
        self.stream = container.streams.video[0]
        self.stream.thread_type = "NONE"  # one thread per loader worker; the workers are the parallelism
        self.time_base = self.stream.time_base
        audio_stream = container.streams.audio[0] if audio else None
        self.packets, audio_packets = [], []
        for packet in container.demux([self.stream] + ([audio_stream] if audio else [])):
            if packet.size:
                (self.packets if packet.stream is self.stream else audio_packets).append(packet)
        self._check_packets()
        self.pts = sorted(p.pts for p in self.packets if not p.is_discard)
        self.audio = _decode_audio(path, audio_stream, audio_packets) if audio else None

    def _check_packets(self):
        """DataError for video packets without timestamps, none to show, or fewer than the stream declares."""
        if any(p.pts is None for p in self.packets):
            raise DataError(f"{self.path}: the video packets carry no timestamps (remux the file, e.g. to .mp4)")
        if not any(not p.is_discard for p in self.packets):
            raise DataError(f"{self.path}: the video stream holds no frames")
        declared = self.stream.frames
        if declared and len(self.packets) < declared:
            raise DataError(f"{self.path}: truncated: {len(self.packets)} of {declared} video frames present")

    def close(self):
        self.container.close()

    def __len__(self):
        return len(self.pts)

    def time(self, i):
        """Seconds from the first frame to frame i."""
        return float((self.pts[i] - self.pts[0]) * self.time_base)

    def audio_span(self, first, last, num_samples):
        """Samples of a 16 kHz track between frames `first` and `last`, from their timestamps."""
        return (min(round(self.time(first) * SAMPLE_RATE), num_samples),
                min(round(self.time(last) * SAMPLE_RATE), num_samples))

    def read(self, indices):
        """Frames at `indices` as uint8 (T, 3, H, W), decoded from the last keyframe shown at or before the
        first one (from the start if that misses a frame), skipping the non-reference frames not shown."""
        wanted = {self.pts[i] for i in indices}
        first = self.pts[min(indices)]
        keyframe = max((j for j, p in enumerate(self.packets) if p.is_keyframe and p.pts <= first), default=0)
        frames = self._decode(wanted, keyframe)
        if len(frames) < len(wanted) and keyframe > 0:  # a keyframe that does not decode on its own
            frames = self._decode(wanted, 0)
        if len(frames) < len(wanted):
            missing = min(self.pts.index(p) for p in wanted - frames.keys())
            raise DataError(f"{self.path}: frame {missing} of {len(self)} cannot be decoded (truncated or corrupt)")
        return torch.from_numpy(np.stack([frames[self.pts[i]] for i in indices])).permute(0, 3, 1, 2)

    def _decode(self, wanted, begin):
        frames = {}
        # One reformatter per clip keeps its conversion context (frame.to_rgb() rebuilds it per frame);
        # one thread: a reformatter's thread pool does not survive a fork, and a loader worker would hang.
        to_rgb = av.video.reformatter.VideoReformatter()
        codec = self.stream.codec_context
        with reading(self.path, "video"):
            codec.flush_buffers()
            for packet in self.packets[begin:] + [None]:
                if packet is not None:
                    codec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                for frame in codec.decode(packet):
                    if frame.pts in wanted:
                        frames[frame.pts] = to_rgb.reformat(frame, format="rgb24", threads=1).to_ndarray()
                if len(frames) == len(wanted):
                    break
        return frames


def _read_image(path):
    """One frame (jpg, png or bmp) as uint8 (H, W, 3), decoded by Pillow."""
    with reading(path, "image"), Image.open(path) as image:
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # convert copies even RGB


class FrameFolder(_Frames):
    """A folder of jpg/png/bmp frames in name order (OpenFace writes frame_det_00_000001.bmp)."""

    def __init__(self, path):
        self.path = path
        with reading(path, "frame folder"):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_EXTENSIONS))
        if not names:
            raise DataError(f"{path}: no jpg/png/bmp frames in the folder")
        self.files = [os.path.join(path, n) for n in names]
        self.audio = None

    def __len__(self):
        return len(self.files)

    def audio_span(self, first, last, num_samples):
        """Samples between frames `first` and `last`: frame i of n at i / (n - 1) of the audio (the authors')."""
        if len(self) == 1:
            return 0, 0
        return int(first / (len(self) - 1) * num_samples), int(last / (len(self) - 1) * num_samples)

    def read(self, indices):
        """Frames at `indices` as uint8 (T, 3, H, W); a repeated index is read once."""
        images = {i: _read_image(self.files[i]) for i in dict.fromkeys(indices)}
        if len({image.shape for image in images.values()}) > 1:
            raise DataError(f"{self.path}: the frames differ in size")
        return torch.from_numpy(np.stack([images[i] for i in indices])).permute(0, 3, 1, 2)


def open_video(path, audio=False):
    """A VideoFile (with its own audio stream when `audio`) or a FrameFolder, or DataError."""
    if os.path.isdir(path):
        return FrameFolder(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or folder")
    return VideoFile(path, audio)


class Waveform:
    """Decoded 16 kHz mono audio, float32 (1, N); `window(start, stop)` cuts samples from it."""

    def __init__(self, samples):
        self.samples, self.num_samples = samples, samples.shape[1]

    def window(self, start, stop):
        return self.samples[:, start:stop]


class WavFile:
    """A 16 kHz mono 16-bit PCM .wav: a window is read from the file, equal to PyAV's decoding (int16 / 32768)."""

    def __init__(self, path):
        self.path = path
        with reading(path, "audio"), wave.open(path, "rb") as f:
            self.num_samples = f.getnframes()
            f.setpos(max(self.num_samples - 1, 0))
            if self.num_samples and len(f.readframes(1)) < 2:
                raise DataError(f"{path}: truncated: the file ends before its {self.num_samples} declared samples")

    def window(self, start, stop):
        with reading(self.path, "audio"), wave.open(self.path, "rb") as f:
            f.setpos(start)
            pcm = np.frombuffer(f.readframes(stop - start), dtype="<i2")
        return torch.from_numpy(pcm.astype(np.float32) / 32768)[None]


def open_audio(path):
    """A WavFile for a 16 kHz mono 16-bit PCM .wav; otherwise the decoded Waveform (read_audio)."""
    if path.lower().endswith(".wav"):
        try:
            with wave.open(path, "rb") as f:
                if (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, SAMPLE_RATE):
                    return WavFile(path)
        except (wave.Error, EOFError, OSError):
            pass  # read_audio names what is wrong
    return Waveform(read_audio(path))


def read_audio(path):
    """The first audio stream of any container (wav, m4a, mp4, ...) as 16 kHz mono float32 (1, N)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with reading(path, "audio"), open_media(path) as container:
        if not container.streams.audio:
            raise DataError(f"{path}: no audio stream ({AUDIO_HINT})")
        stream = container.streams.audio[0]
        return _decode_audio(path, stream, (p for p in container.demux(stream) if p.size)).samples


def _mono_chunks(stream, packets):
    """The samples of an audio stream's packets, chunk by chunk as they decode (float32 (1, n)): resampled to
    16 kHz, the mean of the channels; the decoder and the resampler flushed at the end."""
    resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
    for packet in itertools.chain((p for p in packets if p.size), [None]):  # as a stream: the packets one by one
        for frame in stream.codec_context.decode(packet):
            for out in resampler.resample(frame):
                yield torch.from_numpy(out.to_ndarray()).mean(0, keepdim=True)
    for out in resampler.resample(None):
        yield torch.from_numpy(out.to_ndarray()).mean(0, keepdim=True)


def _decode_audio(path, stream, packets):
    """A Waveform of an audio stream's packets (_mono_chunks), or DataError if it ends well before its duration."""
    with reading(path, "audio"):
        chunks = list(_mono_chunks(stream, packets))
        declared = float(stream.duration * stream.time_base) if stream.duration else None
    if not chunks:
        raise DataError(f"{path}: the audio stream holds no samples")
    waveform = torch.cat(chunks, 1)
    seconds = waveform.shape[1] / SAMPLE_RATE
    if declared and seconds < declared - max(0.1, 0.02 * declared):
        raise DataError(f"{path}: truncated: {seconds:.2f} s of audio decoded, {declared:.2f} s declared")
    return Waveform(waveform)


# 3. Clip sampling, the audio window, log-Mel features and masks

def random_start(num_available, span, generator):
    """First frame of a training clip, uniform over the starts that fit (0 for a short video)."""
    return int(torch.randint(max(num_available - span, 0) + 1, (1,), generator=generator))


def test_clips(num_available, num_frames, stride, num_clips):
    """The authors' test clips: 0, stride, 2 stride, ... below num_available, padded with the last to num_frames
    (L entries); clip k of K from entry int(k * (L - num_frames) / (K - 1)); one clip: the centre one."""
    index = list(range(0, num_available, stride))
    index += [index[-1]] * (num_frames - len(index))
    room = len(index) - num_frames
    starts = [room // 2] if num_clips == 1 else [int(k * (room / (num_clips - 1))) for k in range(num_clips)]
    return [index[s:s + num_frames] for s in starts]


def clip_indices(num_available, start, num_frames, stride):
    """Frame indices of a training clip: `num_frames` frames `stride` apart from `start`; a video shorter than
    the span gets indices spread over all its frames, then its last frame repeated."""
    if num_available >= num_frames * stride:
        return [start + stride * j for j in range(num_frames)]
    k = max(1, min(num_frames, num_available // stride))
    spread = [j * (num_available - 1) // (k - 1) for j in range(k)] if k > 1 else [0]
    return spread + [num_available - 1] * (num_frames - k)


def audio_window(video, audio, first, last, audio_frames, path):
    """The audio between frames `first` and `last`. A window of MIN_AUDIO_SAMPLES or fewer is the whole
    file when that is shorter than `audio_frames` feature frames (10 ms each), else an error."""
    start, stop = video.audio_span(first, last, audio.num_samples)
    if stop - start > MIN_AUDIO_SAMPLES:
        return audio.window(start, stop)
    if audio.num_samples < audio_frames * SAMPLE_RATE // 100:
        return audio.window(0, audio.num_samples)
    raise DataError(f"{path}: audio window of {stop - start} samples (frames {first}-{last}) in "
                    f"{audio.num_samples / SAMPLE_RATE:.2f} s of audio; is the audio shorter than the video?")


class AudioTimeline(_Frames):
    """AUDIO_ONLY_FPS frames per second of audio without video: its clips follow the rules of a video's."""

    def __init__(self, num_samples):
        self.num_frames = max(1, num_samples * AUDIO_ONLY_FPS // SAMPLE_RATE)

    def __len__(self):
        return self.num_frames

    def audio_span(self, first, last, num_samples):
        return (min(first * SAMPLE_RATE // AUDIO_ONLY_FPS, num_samples),
                min(last * SAMPLE_RATE // AUDIO_ONLY_FPS, num_samples))


def _has_video(path):
    """Whether path is a frame folder or a file holding a video stream."""
    if path is None or os.path.isdir(path):
        return path is not None
    with reading(path, "video"), open_media(path) as container:
        return bool(container.streams.video)


MODALITIES = ("av", "audio", "video")


def open_sample(sample, modality="av"):
    """(frames, audio) of a sample: frames a VideoFile or FrameFolder (audio without video: an AudioTimeline),
    to be closed by the caller; audio a Waveform or WavFile (the video file's own, or the sample's audio file),
    or None for a video model."""
    audio_path = sample.audio or sample.video
    if modality == "audio" and not _has_video(sample.video):  # an audio file alone
        audio = open_audio(audio_path)
        return AudioTimeline(audio.num_samples), audio
    own_audio = sample.audio is None or sample.audio == sample.video
    video = open_video(sample.video, audio=own_audio and modality != "video")
    try:
        if modality == "video":
            return video, None
        if sample.audio is None and isinstance(video, FrameFolder):
            raise DataError(f"{sample.video}: a frame folder has no audio ({AUDIO_HINT})")
        return video, video.audio if own_audio else open_audio(audio_path)
    except BaseException:
        video.close()
        raise


def clip_spans(num_available, num_frames, sampling_rate, generator=None, num_clips=1):
    """[(frame indices, last frame of the audio window)] of the clips of a video: training (a `generator`)
    one clip at a random start, its audio for frames x stride frames; test the authors' `num_clips` clips, the
    audio up to one stride after the last frame; both capped at the last frame."""
    last_frame, span = num_available - 1, num_frames * sampling_rate
    if generator is not None:
        start = random_start(num_available, span, generator)
        return [(clip_indices(num_available, start, num_frames, sampling_rate), min(start + span, last_frame))]
    return [(indices, min(indices[-1] + sampling_rate, last_frame))
            for indices in test_clips(num_available, num_frames, sampling_rate, num_clips)]


def load_clips(sample, num_frames=16, sampling_rate=4, audio_frames=256, generator=None, num_clips=1, modality="av"):
    """Clips of a sample (clip_spans), each file opened once: a list of (frames uint8 (T, 3, H, W), waveform
    (1, n)). Modality "audio": frames None (not decoded); "video": waveforms None (not read)."""
    audio_path = sample.audio or sample.video
    try:
        video, audio = open_sample(sample, modality)
        with video:
            if audio is not None and audio.num_samples <= MIN_AUDIO_SAMPLES:
                raise DataError(f"{audio_path}: only {audio.num_samples} audio samples")
            return [(None if modality == "audio" else video.read(indices),
                     None if audio is None else audio_window(video, audio, indices[0], last, audio_frames, audio_path))
                    for indices, last in clip_spans(len(video), num_frames, sampling_rate, generator, num_clips)]
    except DataError as e:
        raise DataError(f"{sample.row}: {e}" if sample.row else str(e)) from None


# Recordings of any length (evaluate.py --video): a stream of windows, each one clip as the model was trained on.

@dataclass
class Window:
    start_s: float  # seconds, on the recording's clock
    end_s: float  # start_s + the span of a clip (num_frames x stride ticks): its audio's end
    ticks: list[int] | None  # the ticks of its frames (None: no video read)
    frames: list[np.ndarray] | None  # uint8 (H, W, 3) each
    waveform: torch.Tensor | None  # (1, n), 16 kHz


class AudioStream:
    """The 16 kHz mono samples of a file's first audio stream, decoded as far as a window asks and forgotten
    before the next window: memory for a window or two whatever the length (_mono_chunks, as _decode_audio)."""

    def __init__(self, path):
        self.path = path
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        with reading(path, "audio"):
            self.container = open_media(path)
            if not self.container.streams.audio:
                self.container.close()
                raise DataError(f"{path}: no audio stream ({AUDIO_HINT})")
            stream = self.container.streams.audio[0]
            self.chunks_to_come = _mono_chunks(stream, self.container.demux(stream))
        self.chunks, self.first, self.end = [], 0, 0  # the samples held: [first, end)
        self.ended = False

    def _decode_more(self):
        with reading(self.path, "audio"):
            chunk = next(self.chunks_to_come, None)
        if chunk is None:
            self.ended = True
        else:
            self.chunks.append(chunk)
            self.end += chunk.shape[1]

    def window(self, start, stop):
        """Samples [start, stop), fewer where the audio ends (none before what was forgotten)."""
        while self.end < stop and not self.ended:
            self._decode_more()
        held = torch.cat(self.chunks, 1) if self.chunks else torch.zeros(1, 0)
        return held[:, max(start - self.first, 0):max(stop - self.first, 0)]

    def forget_before(self, sample):
        while self.chunks and self.first + self.chunks[0].shape[1] <= sample:
            self.first += self.chunks.pop(0).shape[1]

    def close(self):
        self.container.close()


def _ticks_of_video(path, fps):
    """(tick, seconds, av.VideoFrame) of a video file at `fps` ticks per second: each tick takes the frame
    shown nearest to it by the frames' timestamps (tick 0 is the first frame), so that a 30 fps, 60 fps or
    variable-rate recording keeps the pace of the model's clips. Decoded as a stream."""
    with reading(path, "video"), open_media(path) as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # one recording at a time: the decoder may use the cores
        rate, tick, origin, previous = Fraction(fps).limit_denominator(1001), 0, None, None
        for frame in container.decode(stream):
            if frame.pts is None:
                raise DataError(f"{path}: the video frames carry no timestamps (remux the file, e.g. to .mp4)")
            origin = frame.pts if origin is None else origin
            t = (frame.pts - origin) * stream.time_base
            while tick / rate <= t:
                nearer = previous is not None and tick / rate - previous[0] <= t - tick / rate
                yield tick, float(origin * stream.time_base + tick / rate), previous[1] if nearer else frame
                tick += 1
            previous = (t, frame)
        if previous is None:
            raise DataError(f"{path}: the video stream holds no frames")
        while tick / rate - previous[0] < 1 / (2 * rate):  # the last frame's own tick, if it falls after it
            yield tick, float(origin * stream.time_base + tick / rate), previous[1]
            tick += 1


def _ticks_of_folder(path, fps):
    """(tick, seconds, frame path) of a frame folder, its frames taken to be 1 / fps apart."""
    folder = FrameFolder(path)
    for i, file in enumerate(folder.files):
        yield i, i / fps, file


def _rgb(frame, to_rgb):
    """uint8 (H, W, 3) of an av.VideoFrame or a frame file."""
    if isinstance(frame, str):
        return _read_image(frame)
    return to_rgb.reformat(frame, format="rgb24", threads=1).to_ndarray()


class Recording:
    """A recording of any length as a stream of windows. A window is one clip as the model was trained on:
    num_frames frames `stride` ticks apart and the audio of its span (num_frames x stride ticks); the timeline
    ticks at `fps`; a window starts every `hop` ticks, and one more ends with the recording. Memory holds one
    window's span of frames. After the stream, `ticks` is the recording's length in ticks.
    modality "audio": no video is decoded and the ticks count the audio's samples; "video": no audio is read."""

    def __init__(self, video, audio=None, modality="av", num_frames=16, stride=4, fps=25.0, hop=None):
        self.video, self.audio_path, self.modality, self.fps = video, audio or video, modality, fps
        self.num_frames, self.stride, self.span = num_frames, stride, num_frames * stride
        self.hop = hop or self.span // 2
        self.ticks = None

    def samples(self, tick):
        """The audio sample at a tick."""
        return round(tick * SAMPLE_RATE / self.fps)

    def windows(self):
        if self.modality != "video" and self.audio_path == self.video and os.path.isdir(self.video):
            raise DataError(f"{self.video}: a frame folder has no audio ({AUDIO_HINT})")
        audio = None if self.modality == "video" else AudioStream(self.audio_path)
        try:
            if self.modality == "audio":
                yield from self._audio_windows(audio)
            else:
                yield from self._video_windows(audio)
        finally:
            if audio is not None:
                audio.close()

    def _forget(self, audio, tick):
        """Drop the audio before the last window's start: what the next window, or the last one, needs stays."""
        if audio is not None:
            audio.forget_before(self.samples(tick))

    def _window(self, start, start_s, ring, audio, to_rgb):
        """The window from tick `start` (ring: the span's frames by tick, av.VideoFrame, frame file or RGB once
        converted; None for no video)."""
        frames = ticks = waveform = None
        if ring is not None:
            ticks = [start + self.stride * j for j in range(self.num_frames)]
            for t in ticks:  # converted once, though windows overlap
                ring[t] = ring[t] if isinstance(ring[t], np.ndarray) else _rgb(ring[t], to_rgb)
            frames = [ring[t] for t in ticks]
        if audio is not None:
            first, stop = self.samples(start), self.samples(start + self.span)
            waveform = audio.window(first, stop)
            if waveform.shape[1] <= MIN_AUDIO_SAMPLES:
                raise DataError(f"{self.audio_path}: {waveform.shape[1]} audio samples for the window at "
                                f"{start_s:.2f} s; is the audio shorter than the video?")
        return Window(start_s, start_s + self.span / self.fps, ticks, frames, waveform)

    def _video_windows(self, audio):
        reader = _ticks_of_folder if os.path.isdir(self.video) else _ticks_of_video
        if not os.path.exists(self.video):
            raise DataError(f"{self.video}: no such file or folder")
        to_rgb = av.video.reformatter.VideoReformatter()
        ring, times, start, end = {}, {}, 0, 0  # frames and times of the last span of ticks
        tick = -1
        for tick, seconds, frame in reader(self.video, self.fps):
            ring[tick], times[tick] = frame, seconds
            ring.pop(tick - self.span, None), times.pop(tick - self.span, None)
            if tick == start + self.span - 1:
                yield self._window(start, times[start], ring, audio, to_rgb)
                start, end = start + self.hop, start + self.span
                self._forget(audio, start - self.hop)
        self.ticks = tick + 1
        if self.span <= self.ticks and end < self.ticks:  # the last window ends with the recording
            start = self.ticks - self.span
            yield self._window(start, times[start], ring, audio, to_rgb)

    def _audio_windows(self, audio):
        start, end = 0, 0
        while True:
            first, stop = self.samples(start), self.samples(start + self.span)
            if audio.window(first, stop).shape[1] < stop - first:
                break
            yield self._window(start, start / self.fps, None, audio, None)
            start, end = start + self.hop, start + self.span
            self._forget(audio, start - self.hop)
        self.ticks = int(audio.end * self.fps // SAMPLE_RATE)
        if self.span <= self.ticks and end < self.ticks:
            start = self.ticks - self.span
            yield self._window(start, start / self.fps, None, audio, None)


def fbank(waveform, num_frames=256, num_mel_bins=128):
    """Log-Mel features (num_frames, num_mel_bins) of a 16 kHz waveform (1, N >= 400), as the authors:
    Kaldi fbank, 25 ms windows every 10 ms, cut or zero-padded, then (x - FBANK_MEAN) / (2 * FBANK_STD)."""
    feats = torchaudio.compliance.kaldi.fbank(
        waveform - waveform.mean(), htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False,
        window_type="hanning", num_mel_bins=num_mel_bins, dither=0.0, frame_shift=10, frame_length=25)
    feats = F.pad(feats, (0, 0, 0, max(0, num_frames - feats.shape[0])))[:num_frames]
    return (feats - FBANK_MEAN) / (2 * FBANK_STD)


def random_mask(num_tokens, ratio, generator):
    """int(ratio * num_tokens) masked tokens at random (True = masked)."""
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    mask[torch.randperm(num_tokens, generator=generator)[:int(ratio * num_tokens)]] = True
    return mask


def tube_mask(num_temporal, num_spatial, ratio, generator):
    """One random_mask of the spatial positions, repeated in every temporal slice (token t * num_spatial + s)."""
    return random_mask(num_spatial, ratio, generator).repeat(num_temporal)


# 4. Transforms: one crop and augmentation for all frames of a clip. torchvision's random transforms
# draw from torch's global generator: run them inside seeded_global_rng(generator).

def item_generator(seed, epoch, index):
    """The generator of every random choice of one item."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


@contextmanager
def seeded_global_rng(generator):
    """Seed torch's global CPU generator from `generator`, and restore it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        yield


_SCALE = 1 / (255 * torch.tensor(IMAGENET_STD).view(3, 1, 1))
_SHIFT = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalize(frames):
    """uint8 (..., 3, H, W) -> ImageNet-normalised float (in place: several times faster on clip-sized tensors)."""
    return frames.float().mul_(_SCALE.to(frames.device)).sub_(_SHIFT.to(frames.device))


def multiscale_crop(frames, size, generator):
    """The authors' multi-scale crop: width and height each one of MULTISCALE_SCALES of the short side,
    at most one step apart, at one of the MULTISCALE_POSITIONS, resized to size x size."""
    height, width = frames.shape[-2:]
    sides = [int(min(height, width) * s) for s in MULTISCALE_SCALES]
    pairs = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1]
    crop_h, crop_w = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
    x, y = MULTISCALE_POSITIONS[int(torch.randint(len(MULTISCALE_POSITIONS), (1,), generator=generator))]
    top, left = y * ((height - crop_h) // 4), x * ((width - crop_w) // 4)
    return TF.resized_crop(frames, top, left, crop_h, crop_w, [size, size], antialias=True)


def finetune_train_transform(img_size, scale=(0.08, 1.0), rand_ops=4, rand_magnitude=7):
    """Fine-tuning augmentation of uint8 frames: random resized crop, flip, RandAugment."""
    return v2.Compose([v2.RandomResizedCrop(img_size, scale=scale, ratio=(3 / 4, 4 / 3), antialias=True),
                       v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=rand_ops, magnitude=rand_magnitude)])


def erasing_box(frames, prob):
    """The box (top, left, height, width) of torchvision's RandomErasing(p=prob, value="random") for frames
    (T, 3, H, W), zeros for none, drawn from the global generator as that transform draws."""
    if torch.rand(1) < prob:
        box = v2.RandomErasing(p=prob, value="random").make_params([frames])
        if box["v"] is not None:  # None: no box fitted in ten tries
            return torch.tensor([box["i"], box["j"], box["h"], box["w"]])
    return torch.zeros(4, dtype=torch.long)


def normalize_batch(batch):
    """In the training step, on the device: a batch's uint8 video (B, 3, T, H, W) normalised, then each
    item's `erase` box filled with standard normal noise in every frame, as RandomErasing."""
    video = batch.get("video")
    if video is None or video.dtype != torch.uint8:
        return batch
    video = normalize(video.transpose(-4, -3)).transpose(-4, -3)
    if "erase" in batch:
        top, left, height, width = batch["erase"].T[..., None]  # (B, 1) each
        rows, cols = (torch.arange(n, device=video.device) for n in video.shape[-2:])
        inside = ((rows >= top) & (rows < top + height))[:, :, None] & ((cols >= left) & (cols < left + width))[:, None]
        noise = torch.randn(video.shape[0], 3, 1, *video.shape[-2:], device=video.device)
        video = torch.where(inside[:, None, None], noise, video)
    return dict(batch, video=video)


TEST_VIEWS = ("authors", "short_side")


def test_views(frames, img_size, num_crops, views="authors"):
    """Test-time crops of a clip, uint8 (T, 3, S, S). "authors": the whole frame resized to S x S (Pillow's
    bilinear), num_crops times; "short_side": num_crops squares evenly spaced along the resized long side."""
    if views == "authors":
        size = (img_size, img_size)
        images = frames.permute(0, 2, 3, 1).contiguous().numpy()
        resized = np.stack([np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
                            for image in images])
        return [torch.from_numpy(resized).permute(0, 3, 1, 2)] * num_crops
    frames = TF.resize(frames, img_size, antialias=True)
    height, width = frames.shape[-2:]
    room = max(height, width) - img_size
    offsets = [room // 2] if num_crops == 1 else [round(c * room / (num_crops - 1)) for c in range(num_crops)]
    if height >= width:
        return [frames[..., o:o + img_size, :img_size] for o in offsets]
    return [frames[..., :img_size, o:o + img_size] for o in offsets]


def clip_views(clips, cfg, num_crops, views="authors"):
    """The model's inputs of test clips [(frames uint8 (T, 3, H, W) or None, waveform (1, n) or None)]: video
    (V, 3, T, S, S) normalised and audio (V, 1, frames, bins), V = clips x num_crops, clip-major. A stream a
    one-modality model does not read is black or silent."""
    videos, audios = [], []
    for frames, waveform in clips:
        if waveform is None:  # a video model: silence in place of the audio it does not read
            waveform = torch.zeros(1, cfg.audio_frames * SAMPLE_RATE // 100)
        if frames is None:  # an audio model: black frames in place of the video it does not decode
            frames = torch.zeros(cfg.num_frames, 3, cfg.img_size, cfg.img_size, dtype=torch.uint8)
        audio = fbank(waveform, cfg.audio_frames, cfg.mel_bins)[None]
        for crop in test_views(frames, cfg.img_size, num_crops, views):
            videos.append(normalize(crop).permute(1, 0, 2, 3))
            audios.append(audio)
    return torch.stack(videos), torch.stack(audios)


def roll_and_gain(waveform):
    """Audio augmentation (global RNG): a random circular shift and a gain of Beta(10, 10) + 0.5."""
    shift = int(torch.randint(waveform.shape[1], (1,)))
    gain = torch.distributions.Beta(10.0, 10.0).sample() + 0.5
    return torch.roll(waveform, shift, dims=1) * gain


def spec_mask(feats, freqm, timem):
    """Optional frequency and time masking (global RNG) of normalised features (T, F), with the value of
    a raw log-Mel 0 (the authors mask before normalising)."""
    value = -FBANK_MEAN / (2 * FBANK_STD)
    x = feats.T[None]  # (1, F, T)
    if freqm:
        x = torchaudio.transforms.FrequencyMasking(freqm)(x, mask_value=value)
    if timem:
        x = torchaudio.transforms.TimeMasking(timem)(x, mask_value=value)
    return x[0].T


# 5. Data sets

class _ClipDataset(torch.utils.data.Dataset):
    """What the pre-training and fine-tuning sets share: samples, the clip geometry of the model's
    configuration (cfg), seeding, and the replacement of bad samples during training."""

    def __init__(self, samples, cfg, sampling_rate, seed, strict, max_retries, modality="av"):
        if modality not in MODALITIES:
            raise ValueError(f"modality is one of {MODALITIES}, got {modality!r}")
        self.samples, self.modality, self.cfg = list(samples), modality, cfg
        self.img_size, self.num_frames, self.sampling_rate = cfg.img_size, cfg.num_frames, sampling_rate
        self.audio_frames, self.num_mel_bins = cfg.audio_frames, cfg.mel_bins
        self.seed, self.strict, self.max_retries = seed, strict, max_retries
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # seen by persistent workers

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        """Call before each epoch's iterator is created; the loader's workers, persistent or not, see it."""
        self._epoch.fill_(epoch)

    def _load_training_clip(self, index, generator):
        """(sample, frames, waveform, bad): a failing row is replaced by a random other one, with a warning
        (strict: raises); `bad` counts the replacements."""
        bad = 0
        while True:
            sample = self.samples[index]
            try:
                (frames, waveform), = load_clips(sample, self.num_frames, self.sampling_rate,
                                                 self.audio_frames, generator, modality=self.modality)
                return sample, frames, waveform, bad
            except DataError as e:
                if self.strict:
                    raise
                bad += 1
                if bad > self.max_retries:
                    raise DataError(f"{bad} bad samples in a row, the last: {e}") from None
                warnings.warn(f"replacing a bad sample: {e}", stacklevel=2)
                index = int(torch.randint(len(self), (1,), generator=generator))


class PretrainDataset(_ClipDataset):
    """Pre-training items: a clip with the multi-scale crop (uint8, for normalize_batch), the audio that
    follows it, and masks (tube masking for video, random masking for audio)."""

    def __init__(self, samples, cfg, *, sampling_rate=4, seed=0, strict=False, max_retries=10):
        super().__init__(samples, cfg, sampling_rate, seed, strict, max_retries)
        self.video_tokens, self.audio_tokens = cfg.video_grid, cfg.num_audio_tokens
        self.video_mask_ratio, self.audio_mask_ratio = cfg.video_mask_ratio, cfg.audio_mask_ratio

    def __getitem__(self, index):
        generator = item_generator(self.seed, int(self._epoch), index)
        _, frames, waveform, bad = self._load_training_clip(index, generator)
        video = multiscale_crop(frames, self.img_size, generator)  # uint8: normalize_batch on the device
        return dict(
            video=video.permute(1, 0, 2, 3),
            audio=fbank(waveform, self.audio_frames, self.num_mel_bins)[None],
            video_mask=tube_mask(*self.video_tokens, self.video_mask_ratio, generator),
            audio_mask=random_mask(self.audio_tokens, self.audio_mask_ratio, generator),
            index=index, bad=bad)


def _target_tensor(target):
    return torch.tensor(target, dtype=torch.long if isinstance(target, int) else torch.float32)


class FinetuneDataset(_ClipDataset):
    """Fine-tuning items. train=True: one clip as uint8 video (crop, flip, RandAugment) with its erasing box,
    audio with roll-and-gain and optional frequency/time masking. train=False: num_clips x num_crops views,
    clip-major, normalised; no audio gain (the authors' code draws one there); test rows may be unlabelled.
    A model of one modality reads only its own stream (in a test item the other is black or silent)."""

    def __init__(self, samples, cfg, *, train, sampling_rate=4, num_clips=2, num_crops=2, seed=0, strict=False,
                 max_retries=10, scale=(0.08, 1.0), rand_ops=4, rand_magnitude=7, erase_prob=0.25, roll_gain=True,
                 freqm=0, timem=0, test_views="authors", modality="av"):
        super().__init__(samples, cfg, sampling_rate, seed, strict, max_retries, modality)
        unlabelled = next((s.row for s in self.samples if s.target is None), None)
        if unlabelled and train:
            raise ValueError(f"{unlabelled}: fine-tuning needs a label on every row")
        if test_views not in TEST_VIEWS:
            raise ValueError(f"test views are one of {TEST_VIEWS}, got {test_views!r}")
        self.train, self.num_clips, self.num_crops, self.test_views = train, num_clips, num_crops, test_views
        self.transform = finetune_train_transform(cfg.img_size, scale, rand_ops, rand_magnitude)
        self.erase_prob, self.roll_gain, self.freqm, self.timem = erase_prob, roll_gain, freqm, timem

    def __getitem__(self, index):
        if not self.train:
            return self._test_item(index)
        generator = item_generator(self.seed, int(self._epoch), index)
        sample, frames, waveform, bad = self._load_training_clip(index, generator)
        item = dict(target=_target_tensor(sample.target), index=index, bad=bad)
        with seeded_global_rng(generator):
            if frames is not None:  # uint8: normalize_batch normalises and erases on the device
                video = self.transform(frames)
                item.update(video=video.permute(1, 0, 2, 3), erase=erasing_box(video, self.erase_prob))
            if waveform is not None:
                if self.roll_gain:
                    waveform = roll_and_gain(waveform)
                item["audio"] = spec_mask(fbank(waveform, self.audio_frames, self.num_mel_bins), self.freqm,
                                          self.timem)[None]
        return item

    def _test_item(self, index):
        sample = self.samples[index]
        clips = load_clips(sample, self.num_frames, self.sampling_rate, self.audio_frames, num_clips=self.num_clips,
                           modality=self.modality)
        video, audio = clip_views(clips, self.cfg, self.num_crops, self.test_views)
        item = dict(video=video, audio=audio, index=index)
        if sample.target is not None:  # unlabelled recordings can be tested too (single-video inference)
            item["target"] = _target_tensor(sample.target)
        return item



# 6. Command line: python data.py check|scan|crema-d|folders

class Progress:
    """The progress line of a long job (data.py check, tools/face_crop.py), on stderr:
    `WHAT DONE/TOTAL (F failed), R UNIT/s, T left`. On a terminal it is rewritten in place; in a log, a line
    every 30 s. `note(line)` prints a line to stdout (a failure, a warning) without mixing it into the bar."""

    def __init__(self, what, total, unit):
        self.what, self.total, self.unit = what, total, unit
        self.done = self.failed = self.units = 0
        self.start = self.shown = time.perf_counter()
        self.terminal = sys.stderr.isatty()
        self.width = 0  # of the line on the terminal

    def update(self, failed=False, units=1):
        """One more item done (failed or not) and `units` more of the rate's unit."""
        self.done, self.failed, self.units = self.done + 1, self.failed + bool(failed), self.units + units
        now = time.perf_counter()
        if now - self.shown >= (0.5 if self.terminal else 30) or self.done == self.total:
            self.shown = now
            elapsed = max(now - self.start, 1e-9)
            left = max(self.total - self.done, 0) * elapsed / self.done  # a total may be an estimate
            line = (f"{self.what} {self.done}/{self.total} ({self.failed} failed), "
                    f"{self.units / elapsed:.1f} {self.unit}/s, {_duration(left)} left")
            if self.terminal:
                print(f"\r{line:<{self.width}}", end="", file=sys.stderr, flush=True)
                self.width = len(line)
            else:
                print(line, file=sys.stderr, flush=True)

    def note(self, line):
        if self.terminal and self.width:
            print(f"\r{'':<{self.width}}\r", end="", file=sys.stderr, flush=True)
            self.width = 0
        print(line, flush=True)

    def close(self):
        if self.terminal and self.width:
            print(file=sys.stderr, flush=True)
            self.width = 0


def _duration(seconds):
    """42 s, 3 min 12 s, 5 h 07 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _RowCheck(torch.utils.data.Dataset):
    """Items of a strict data set as (failed, message): the error, or a warning for a video shorter than
    the clip span (its frames repeat); the loader goes on past a bad row."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            self.dataset[index]
        except DataError as e:
            return True, str(e)
        sample, d = self.dataset.samples[index], self.dataset
        frames, span = len(open_video(sample.video)), d.num_frames * d.sampling_rate
        if frames < span:
            return False, (f"warning: {sample.row}: {sample.video}: {frames} frames, shorter than the clip span of "
                           f"{span} ({d.num_frames} frames {d.sampling_rate} apart): frames repeat")
        return False, None


def check(manifest, root_map=(), workers=0, task=None, num_frames=16, sampling_rate=4):
    """Decode every row as training does; print each failing row and short video, then `N ok, M failed`;
    the progress line on stderr. Returns the number of failed rows."""
    task = task or guess_task(manifest)
    errors = []
    samples = read_manifest(manifest, root_map, task, errors=errors)
    for e in errors:
        print(e, flush=True)
    cfg = HiCMAEConfig(num_frames=num_frames)
    if task == "pretrain":
        dataset = PretrainDataset(samples, cfg, sampling_rate=sampling_rate, strict=True)
    else:
        dataset = FinetuneDataset(samples, cfg, train=True, sampling_rate=sampling_rate, strict=True)
    loader = torch.utils.data.DataLoader(_RowCheck(dataset), batch_size=None, num_workers=workers)
    failed = len(errors)
    progress = Progress("check:", len(samples), "rows")
    for bad, message in loader:
        if message is not None:
            progress.note(message)
        failed += bad
        progress.update(bad)
    progress.close()
    print(f"{len(samples) + len(errors) - failed} ok, {failed} failed")
    return failed


def _no_whitespace(path):
    if any(ch.isspace() for ch in str(path)):
        raise DataError(f"{path}: the path must not contain whitespace (manifests are space separated)")


def scan(root, out, audio_root=None):
    """Write a pre-training manifest for a VoxCeleb2-style tree ROOT/idXXXXX/<youtube id>/NNNNN.mp4; the audio
    is the .m4a or .wav of the same relative name under `audio_root` if any, else the video's own stream."""
    videos = sorted(Path(root).glob("*/*/*.mp4"))
    separate = 0
    with open(out, "w") as f:
        for video in videos:
            audio = video
            if audio_root is not None:
                rel = video.relative_to(root)
                found = [p for p in (Path(audio_root) / rel.with_suffix(s) for s in (".m4a", ".wav")) if p.is_file()]
                if found:
                    audio, separate = found[0], separate + 1
            f.write(f"{video.absolute()} {Path(audio).absolute()}\n")
    print(f"{len(videos)} clips ({separate} with a separate audio file) written to {out}")
    return len(videos)


# CREMA-D's five folds as the authors' split files hold them (github.com/sunlicai/HiCMAE,
# saved/data/crema-d/audio_visual/split0K): every clip but five, in the order of their names
# (actor_sentence_emotion_level); fold K tests the 18 actors from 1001 + 18 (K - 1) (fold 5: 19) and trains on the rest.
CREMAD_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")  # class indices 0..5, the authors' order
CREMAD_CLASSES = ("anger", "disgust", "fear", "happy", "neutral", "sad")
CREMAD_NAME = re.compile(r"(\d{4})_[A-Z]{3}_(ANG|DIS|FEA|HAP|NEU|SAD)_[A-Z]{2}")
CREMAD_LEFT_OUT = {  # the clips the authors' files leave out, and why
    "1064_IEO_DIS_MD": "about a minute long, every emotion in turn (CREMA-D's list of broken clips)",
    "1064_TIE_SAD_XX": "no duration (CREMA-D's list of broken clips)",
    "1076_MTI_NEU_XX": "very short, no sound (CREMA-D's list of broken clips)",
    "1076_MTI_SAD_XX": "no face, no sound (CREMA-D's list of broken clips)",
    "1040_ITH_SAD_XX": "its wav was named 1040_ITH_SAD_X.wav until October 2022, so the authors' copy had no audio",
}


def cremad_fold(name):
    """The fold (1..5) whose test set holds the clip NAME."""
    return min((int(name[:4]) - 1001) // 18, 4) + 1


def _cremad_clips(folder, audio):
    """{NAME: path} of one listing of a folder, and how many other entries it holds. Audio: the files NAME.wav;
    video: the frame folders NAME/, else the first file NAME.* by name."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder ({'AudioWAV, the audio' if audio else 'the videos'} of CREMA-D)")
    found, ignored = {}, 0
    with os.scandir(folder) as listing:
        entries = sorted((not e.is_dir(), e.name, e.path) for e in listing)  # frame folders first
    for is_file, entry, path in entries:
        name, ext = os.path.splitext(entry) if is_file else (entry, "")
        match = CREMAD_NAME.fullmatch(name)
        if not match or not 1001 <= int(match[1]) <= 1091 or (audio and ext != ".wav"):
            ignored += 1
        elif name not in found:
            found[name] = path
    return found, ignored


def crema_d(root, out_dir, video_dir=None):
    """Write out_dir/split0K/{train,test}.csv with classes.txt beside them and in out_dir, for the copy of
    CREMA-D at root (audio root/AudioWAV/NAME.wav, video in video_dir, default root/VideoFlash). A clip that
    lacks its audio or its video is printed and left out; returns how many were."""
    audio_dir = os.path.join(os.path.abspath(root), "AudioWAV")
    video_dir = os.path.abspath(video_dir or os.path.join(root, "VideoFlash"))
    for path in (audio_dir, video_dir):
        _no_whitespace(path)
    audio, ignored_audio = _cremad_clips(audio_dir, audio=True)
    video, ignored_video = _cremad_clips(video_dir, audio=False)
    found = audio.keys() | video.keys()
    rows, missing = [], 0
    for name in sorted(found - CREMAD_LEFT_OUT.keys()):
        if name not in video:
            print(f"{os.path.join(video_dir, name)}: no video file or frame folder for this clip")
        elif name not in audio:
            print(f"{os.path.join(audio_dir, name)}.wav: no audio file for this clip")
        else:
            rows.append((name, f"{video[name]} {audio[name]} {CREMAD_EMOTIONS.index(name[9:12])}\n"))
            continue
        missing += 1
    classes = "".join(name + "\n" for name in CREMAD_CLASSES)
    for fold in range(1, 6):
        split = Path(out_dir) / f"split{fold:02d}"
        split.mkdir(parents=True, exist_ok=True)
        (split / "classes.txt").write_text(classes)
        (split / "train.csv").write_text("".join(row for name, row in rows if cremad_fold(name) != fold))
        (split / "test.csv").write_text("".join(row for name, row in rows if cremad_fold(name) == fold))
    (Path(out_dir) / "classes.txt").write_text(classes)
    actors = len({name[:4] for name, _ in rows})
    print(f"{len(rows)} clips of {actors} actors written to {out_dir}/split01..split05; "
          f"{len(found & CREMAD_LEFT_OUT.keys())} left out by the authors' rule, {missing} missing their audio or "
          f"video, {ignored_audio + ignored_video} other names ignored")
    return missing


# Class folders: ROOT/<class>/<clip>, a clip being a video file (VIDEO_EXTENSIONS) or a frame folder, with NAME.wav
# beside it as its audio when there is one. Class indices follow the sorted folder names. The split assigns whole
# groups (--group's match, or else each clip alone) to splits, so a group never sits on both sides.

@dataclass
class _Clip:
    name: str  # the file's name without its extension, or the frame folder's name
    path: str  # the video file or frame folder in its class folder
    audio: str | None  # NAME.wav beside it, else the video file itself (None: a frame folder without a wav)
    label: int
    video: str  # what the manifest names: the path, or FACES_DIR/NAME
    group: str  # the unit of the split: --group's match, or the path


def _listing(folder):
    """(name, is a folder, path) of each entry of a folder, by name."""
    with os.scandir(folder) as listing:
        return sorted((e.name, e.is_dir(), e.path) for e in listing)


def _class_clips(folder, label):
    """The clips of one class folder, and its entries that are neither a clip nor a clip's wav (ignored)."""
    clips, wavs, other = [], {}, []
    for name, is_dir, path in _listing(folder):
        stem, ext = (name, "") if is_dir else os.path.splitext(name)
        if name.startswith("."):
            other.append(path)
        elif is_dir or ext.lower() in VIDEO_EXTENSIONS:
            clips.append(_Clip(stem, path, None if is_dir else path, label, path, path))
        elif ext.lower() == ".wav":
            wavs[stem] = path
        else:
            other.append(path)
    for clip in clips:
        clip.audio = wavs.pop(clip.name, clip.audio)
    if not clips:
        raise DataError(f"{folder}: an empty class folder: no video file and no frame folder in it "
                        f"({len(other) + len(wavs)} other entries); remove it or add its clips")
    return clips, other + list(wavs.values())


def _find_clips(root, skip):
    """Every clip under root/<class>/ (by class, then name), the class folders, and the entries ignored (those
    in `skip` among them: the output and crops folders where they lie in root)."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    _no_whitespace(root)
    entries = _listing(root)
    classes = [path for name, is_dir, path in entries if is_dir and not name.startswith(".") and path not in skip]
    if not classes:
        raise DataError(f"{root}: no class folders in it (ROOT/<class>/<clip>: one folder per class)")
    clips, ignored = [], [path for _, _, path in entries if path not in classes]
    for label, folder in enumerate(classes):
        _no_whitespace(folder)
        found, other = _class_clips(folder, label)
        clips, ignored = clips + found, ignored + other
    return clips, classes, ignored


def _group_key(name, group):
    """--group's match in a clip's name (its first group, or the whole match without one), or None."""
    match = group.search(name)
    return match and match.group(1 if group.groups else 0)


def _name_clips(clips, video_dir, group):
    """Check that no two clips share a name; set each clip's video (FACES_DIR/NAME) and group (--group's match)."""
    first = {}
    for clip in clips:
        if clip.name in first:
            again = len(clips) - len({c.name for c in clips})
            raise DataError(f"{first[clip.name]} and {clip.path}: two clips named {clip.name} ({again} in all share "
                            "an earlier clip's name); a clip's wav, face crops and predictions are found by its name: "
                            "rename one")
        first[clip.name] = clip.path
        if video_dir:
            clip.video = os.path.join(video_dir, clip.name)
    for clip in clips if group else ():
        clip.group = _group_key(clip.name, group)
        if not clip.group:
            unmatched = sum(not _group_key(c.name, group) for c in clips)
            raise DataError(f"{clip.path}: the name {clip.name} does not match --group '{group.pattern}' "
                            f"({unmatched} of {len(clips)} clips do not)")


def _probe(path, kind, hint=""):
    """DataError unless path holds a `kind` stream ("video" or "audio"; a frame folder: frames). The container is
    opened and its streams looked at; nothing is decoded."""
    if os.path.isdir(path):
        if not any(n.lower().endswith(FRAME_EXTENSIONS) for n in os.listdir(path)):
            raise DataError(f"{path}: no jpg/png/bmp frames in the folder")
        return
    with reading(path, kind), open_media(path) as container:
        if not getattr(container.streams, kind):
            raise DataError(f"{path}: no {kind} stream{hint}")


def _clip_problem(clip):
    """("crops" or "unreadable", why the clip cannot be used), or None."""
    if clip.video != clip.path and not os.path.isdir(clip.video):
        return "crops", (f"{clip.path}: no face crops: {clip.video} is missing (tools/face_crop.py names the clips "
                         "it could not crop)")
    if clip.audio is None:
        return "unreadable", f"{clip.path}: a frame folder without its audio: put it beside it as {clip.name}.wav"
    try:
        _no_whitespace(clip.path)
        _no_whitespace(clip.audio)
        _probe(clip.video, "video")
        _probe(clip.audio, "audio", f" (and no {clip.name}.wav beside it)" if clip.audio == clip.path else "")
    except DataError as e:
        return "unreadable", str(e)
    return None


def _usable(clips):
    """The clips that can be read, and a Counter of the others' problems; each of them is printed, with its reason."""
    progress = Progress("folders:", len(clips), "clips")
    usable, problems = [], Counter()
    for clip in clips:
        problem = _clip_problem(clip)
        if problem:
            progress.note(problem[1])
            problems[problem[0]] += 1
        else:
            usable.append(clip)
        progress.update(problem is not None)
    progress.close()
    return usable, problems


def _plural(count, noun):
    return f"{count} {noun}{'s' * (count != 1)}"


def _split_names(folds):
    """(name, bin of its test set) of each split: the single split tests bin 1 (bin 0 trains); fold K tests bin K-1."""
    return [("", 1)] if folds is None else [(f"split{k + 1:02d}", k) for k in range(folds)]


def _check_sizes(clips, classes, folds, grouped):
    """DataError for a class with fewer clips (groups) than the split has sides or folds."""
    bins = 2 if folds is None else folds
    for label, folder in enumerate(classes):
        members = [c for c in clips if c.label == label]
        groups = len({c.group for c in members})
        if groups < bins:
            what = f"{_plural(len(members), 'usable clip')}"
            what += f" of {_plural(groups, 'group')} (--group)" if grouped else ""
            need = ("a train and a test side" if folds is None
                    else f"{folds} folds (every fold's test set needs one of each class)")
            raise DataError(f"{folder}: {what}, too few for {need}")


def _placement(sizes, count, weight, totals):
    """The rank of a bin for a group holding sizes[c] clips of class c, the bin holding count[c] of them: first the
    classes that would get their first clip there (more first), then the increase of the squared error of the
    bin's shares of the classes (count[c] / totals[c]) against its weight (less first)."""
    new = sum(count[c] == 0 for c in sizes)
    cost = sum(s / totals[c] * (2 * (count[c] / totals[c] - weight) + s / totals[c]) for c, s in sizes.items())
    return -new, cost


def _assign(clips, weights, seed):
    """({group: bin}, a Counter of classes per bin): the groups, shuffled by random.Random(seed) and then the
    largest first, each go to the best-placed bin (_placement; the first of equals). Each clip alone (no --group),
    every class's count in a bin ends within one clip of its weight times the class's clips."""
    members = {}
    for clip in clips:
        members.setdefault(clip.group, []).append(clip.label)
    order = sorted(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: the shuffle orders the groups of one size
    totals, counts, bins = Counter(c.label for c in clips), [Counter() for _ in weights], {}
    for g in order:
        sizes = Counter(members[g])
        bins[g] = min(range(len(weights)), key=lambda b: _placement(sizes, counts[b], weights[b], totals))
        counts[bins[g]].update(sizes)
    return bins, counts


def _check_coverage(counts, classes, folds):
    """DataError for a class without a clip in a bin (its groups went elsewhere with those of other classes)."""
    for label, folder in enumerate(classes):
        for b, count in enumerate(counts):
            if not count[label]:
                where = f"split{b + 1:02d}'s test set" if folds else ("the training set", "the test set")[b]
                raise DataError(f"{folder}: no clip in {where}: its groups went elsewhere with the other classes "
                                "they hold (another --seed may find a split; else fewer folds or another fraction)")


def _write_splits(out_dir, clips, bins, classes, folds, grouped):
    """OUT/{train,test}.csv (or OUT/split0K/) with classes.txt beside them and in OUT; a line per split."""
    names = "".join(os.path.basename(folder) + "\n" for folder in classes)
    totals = Counter(c.label for c in clips)
    lines = []
    for name, test in _split_names(folds):
        split = Path(out_dir) / name
        split.mkdir(parents=True, exist_ok=True)
        sides = {part: [c for c in clips if (bins[c.group] == test) == (part == "test")] for part in ("train", "test")}
        for part, members in sides.items():
            (split / f"{part}.csv").write_text("".join(f"{c.video} {c.audio} {c.label}\n" for c in members))
        (split / "classes.txt").write_text(names)
        shares = [n / totals[c] for c, n in Counter(c.label for c in sides["test"]).items()]
        counts = [f"{len(m)} {part}" + (f" ({len({c.group for c in m})} groups)" if grouped else "")
                  for part, m in sides.items()]
        lines.append(f"{split}: {' and '.join(counts)} clips; each class's test share "
                     f"{min(shares):.1%} to {max(shares):.1%}")
    (Path(out_dir) / "classes.txt").write_text(names)
    return lines


def folders(root, out_dir, test_fraction=0.2, folds=None, seed=0, group=None, video_dir=None):
    """Write OUT/{train,test}.csv and classes.txt (with `folds`: OUT/split01..split0K/ of them) for the class folders
    ROOT/<class>/<clip> (see the note above); the frames from video_dir/NAME/ when given. A clip that cannot be read
    or lacks its crops is printed and left out; returns how many were. DataError for what stops the split."""
    root, group = os.path.abspath(root), group and re.compile(group)
    if video_dir:
        video_dir = os.path.abspath(video_dir)
        if not os.path.isdir(video_dir):
            raise DataError(f"{video_dir}: no such folder (the face crops, tools/face_crop.py --out)")
        _no_whitespace(video_dir)
    clips, classes, ignored = _find_clips(root, (os.path.abspath(out_dir), video_dir))
    _name_clips(clips, video_dir, group)
    usable, problems = _usable(clips)
    _check_sizes(usable, classes, folds, bool(group))
    bins, counts = _assign(usable, [1 - test_fraction, test_fraction] if folds is None else [1 / folds] * folds, seed)
    _check_coverage(counts, classes, folds)
    lines = _write_splits(out_dir, usable, bins, classes, folds, bool(group))
    names = [os.path.basename(folder) for folder in classes]
    print(f"{len(usable)} clips of {len(classes)} classes written to {out_dir}; classes.txt: {', '.join(names)} "
          "(class indices 0, 1, ... in the sorted order of the folder names)")
    if group:
        print(f"split by --group '{group.pattern}': {len(bins)} groups, each on one side of every split")
    else:
        print("the split is by clip, not by speaker: one speaker's clips can be on both sides (--group REGEX keeps "
              "them together)")
    print("\n".join(lines))
    left_out = sum(problems.values())
    named = f" (named above: {problems['unreadable']} unreadable, {problems['crops']} without face crops)"
    example = f" (e.g. {ignored[0]})" if ignored else ""
    print(f"{_plural(left_out, 'clip')} left out{named if left_out else ''}, {sum(c.audio != c.path for c in usable)} "
          f"with a wav beside them; other entries ignored: {len(ignored)}{example}")
    return left_out


def _fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a fraction between 0 and 1 (both excluded), got {text}")
    return value


def _fold_count(text):
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"a number of folds, 2 or more, got {text}")
    return int(text)


def _regex(text):
    try:
        return re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression: {e}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("check", help="decode every row as training does and list the failing ones")
    p.add_argument("manifest")
    add_root_map(p)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--task", choices=TASKS, help="default: from the first row")
    p.add_argument("--num_frames", type=int, default=16, help="frames of a clip, as the model's (default 16)")
    p.add_argument("--sampling_rate", type=int, default=4, help="frame stride of a clip (default 4)")
    p = commands.add_parser("scan", help="write a pre-training manifest for a VoxCeleb2-style tree")
    p.add_argument("root")
    p.add_argument("--out", required=True)
    p.add_argument("--audio_root", help="a parallel tree of .m4a/.wav files with the same relative names")
    p = commands.add_parser("crema-d", help="write the authors' five CREMA-D folds: OUT/split01..05/{train,test}.csv")
    p.add_argument("root", help="the CREMA-D folder, holding AudioWAV/ (and VideoFlash/)")
    p.add_argument("--out", required=True, help="folder of the folds and classes.txt")
    p.add_argument("--videos", metavar="VIDEO_DIR", help="the clips' frame folders NAME/ (OpenFace's aligned faces) "
                   "or videos NAME.* (default: ROOT/VideoFlash)")
    p = commands.add_parser("folders", help="write manifests and a split for class folders ROOT/<class>/<clip>")
    p.add_argument("root", help="a folder per class holding its clips: video files or frame folders, NAME.wav "
                   "beside a clip being its audio")
    p.add_argument("--out", required=True, help="folder of train.csv, test.csv and classes.txt (or of the folds)")
    sides = p.add_mutually_exclusive_group()
    sides.add_argument("--test_fraction", type=_fraction, default=0.2,
                       help="each class's share in test.csv (default 0.2)")
    sides.add_argument("--folds", type=_fold_count, metavar="K", help="write OUT/split01..split0K instead, each "
                       "clip in one fold's test set")
    p.add_argument("--seed", type=int, default=0, help="the split's random order (default 0)")
    p.add_argument("--group", type=_regex, metavar="REGEX", help="clips whose names give the same match (its first "
                   "group) stay on one side of every split, e.g. '^(spk\\d+)_' for the speaker of spk03_take2.mp4")
    p.add_argument("--videos", metavar="FACES_DIR", help="each clip's frames from FACES_DIR/NAME/ "
                   "(tools/face_crop.py's crops); the audio stays the clip's own")
    args = parser.parse_args(argv)
    try:
        if args.command == "crema-d":
            return 1 if crema_d(args.root, args.out, args.videos) else 0
        if args.command == "folders":
            left_out = folders(args.root, args.out, args.test_fraction, args.folds, args.seed, args.group, args.videos)
            return 1 if left_out else 0
    except DataError as e:
        raise SystemExit(f"data.py {args.command}: {e}") from None
    if args.command == "check":
        failed = check(args.manifest, args.root_map, args.workers, args.task, args.num_frames,
                       args.sampling_rate)
        return 1 if failed else 0
    scan(args.root, args.out, args.audio_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
