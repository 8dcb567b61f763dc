"""Test media: small real files written with PyAV (video, audio) and Pillow (frame folders). Every frame
carries its own index as a row of black and white stripes, so a test can read back which frames were sampled."""

import fractions

import av
import numpy as np
import pytest
import torch
from PIL import Image

try:  # the optional face-crop extra (requirements-faces.txt)
    import dlib  # noqa: F401
    import face_recognition_models  # noqa: F401
    HAVE_EXTRA = True
except ImportError:
    HAVE_EXTRA = False


def needs_extra(test):
    """A test that needs the face-crop extra: marked `faces` (pytest -m faces runs these alone), skipped without it."""
    skip = pytest.mark.skipif(not HAVE_EXTRA, reason="needs the face-crop extra: pip install -r requirements-faces.txt")
    return pytest.mark.faces(skip(test))


def pytest_configure(config):
    config.addinivalue_line("markers", "faces: needs the face-crop extra (requirements-faces.txt)")


STRIPES = 10  # bits of the frame index, one 8-pixel-wide stripe each
WIDTH, HEIGHT = 8 * STRIPES, 48


def frame_image(i, width=WIDTH, height=HEIGHT):
    """uint8 (H, W, 3): stripe b is white when bit b of i is set."""
    bits = (i >> np.arange(STRIPES)) & 1
    row = np.repeat(bits * 255, width // STRIPES).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(row[None, :, None], (height, width, 3)))


def frame_ids(frames):
    """The indices written by frame_image, read back from uint8 frames (T, 3, H, W)."""
    step = frames.shape[-1] // STRIPES
    centres = frames[..., step // 2::step].float().mean(dim=(1, 2))  # (T, STRIPES)
    return ((centres > 127).long() << torch.arange(STRIPES)).sum(1).tolist()


def tone(seconds, rate, amplitudes, freq=440.0):
    """float32 (channels, n): a sine of `freq` Hz, one amplitude per channel."""
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([a * np.sin(2 * np.pi * freq * t) for a in amplitudes]).astype(np.float32)


def ramp(seconds, rate, channels=2):
    """float32 (channels, n) rising linearly from 0 to 1 over the file: a sample's value is its time."""
    return np.tile(np.linspace(0, 1, int(seconds * rate), dtype=np.float32), (channels, 1))


def _add_audio(container, codec, rate, channels):
    stream = container.add_stream(codec, rate=rate)
    stream.layout = "stereo" if channels == 2 else "mono"
    return stream


def _encode_audio(container, stream, samples):
    layout = stream.layout.name
    for start in range(0, samples.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + 1024]),
                                           format="fltp", layout=layout)
        frame.sample_rate, frame.pts = stream.rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


class Media:
    """Writers of test media into a folder."""

    ids = staticmethod(frame_ids)
    image = staticmethod(frame_image)
    tone = staticmethod(tone)
    ramp = staticmethod(ramp)

    def __init__(self, root):
        self.root = root

    def video(self, name, num_frames, fps=25, codec="libx264", audio=None, faststart=False,
              width=WIDTH, height=HEIGHT, options=None):
        """A video whose frame i shows index i. `audio`: (codec, rate, samples (channels, n)) muxed
        into the same container, or None for a video without audio; `options`: the encoder's."""
        path = self.root / name
        muxer = {"movflags": "faststart"} if faststart else {}
        with av.open(str(path), "w", options=muxer) as container:
            stream = container.add_stream(codec, rate=fractions.Fraction(fps), options=options or {})
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
            if audio is not None:
                codec_a, rate, samples = audio
                audio_stream = _add_audio(container, codec_a, rate, samples.shape[0])
            for i in range(num_frames):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame_image(i, width, height), format="rgb24")))
            container.mux(stream.encode(None))
            if audio is not None:
                _encode_audio(container, audio_stream, samples)
        return str(path)

    def audio(self, name, rate, samples, codec="pcm_s16le"):
        """An audio file (the container from the name's suffix) holding samples (channels, n)."""
        path = self.root / name
        with av.open(str(path), "w") as container:
            _encode_audio(container, _add_audio(container, codec, rate, samples.shape[0]), samples)
        return str(path)

    def frames(self, name, num_frames, ext="jpg", pattern="{:06d}"):
        """A folder of frames; frame i is named pattern.format(i + 1) + '.' + ext."""
        folder = self.root / name
        folder.mkdir()
        for i in range(num_frames):
            Image.fromarray(frame_image(i)).save(folder / f"{pattern.format(i + 1)}.{ext}", quality=95)
        return str(folder)

    def file(self, name, content=b""):
        path = self.root / name
        path.write_bytes(content)
        return str(path)


@pytest.fixture
def media(tmp_path):
    return Media(tmp_path)
