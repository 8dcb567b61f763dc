"""Copy the reference files computed with the authors' code into tests/fixtures/, keeping what the tests read.

    python tools/slim_reference.py SRC_DIR tests/fixtures

SRC_DIR holds the files as their generator wrote them. Three things are made smaller, none of which the
tests read in another form:
* the two checkpoints saved the authors' way lose the optimiser's per-parameter moments (`optimizer["state"]`
  becomes {}); the model, the param groups, epoch, scaler and args stay as they were saved;
* authors_test_views.pt keeps per view the video as uint8 (`video_uint8`, the resized frames before
  ToTensor and Normalize): (video_uint8 / 255 - mean) / std gives the authors' float32 tensor bit for bit,
  which is checked here before writing; views with equal frames share one tensor; the source frames,
  the waveform and the audio with the authors' random gain are left out (the frames and the wav are
  the files in authors_test_views_media/);
* everything else is copied byte for byte.
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch

COPIED = ["official_tiny.pt", "official_keys_base.txt", "speech_16k.wav", "fbank_reference.pt"]
CHECKPOINTS = ["official_tiny_checkpoint-99.pth", "official_tiny_finetuned_checkpoint-best.pth"]


def slim_views(views, mean, std):
    kept, seen = [], []
    for view in views:
        u8 = ((view["video"] * std + mean) * 255).round().to(torch.uint8)
        if not torch.equal((u8.float() / 255 - mean) / std, view["video"]):
            sys.exit(f"view {view['sample_id']} segment {view['segment']} is not an exact uint8 image")
        u8 = next((s for s in seen if torch.equal(s, u8)), u8)
        seen.append(u8)
        kept.append({k: v for k, v in view.items() if k not in ("video", "audio")} | {"video_uint8": u8})
    return kept


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args()
    args.dst.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(args.src / name, args.dst / name)
    shutil.copytree(args.src / "authors_test_views_media", args.dst / "authors_test_views_media", dirs_exist_ok=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        for name in CHECKPOINTS:
            ckpt = torch.load(args.src / name, weights_only=True)
            ckpt["optimizer"]["state"] = {}
            torch.save(ckpt, args.dst / name)
    views = torch.load(args.src / "authors_test_views.pt", weights_only=True)
    mean = torch.tensor(views["settings"]["video_mean"]).view(3, 1, 1, 1)
    std = torch.tensor(views["settings"]["video_std"]).view(3, 1, 1, 1)
    views["samples"] = [{k: v for k, v in s.items() if k not in ("frames", "wav")}
                        | {"views": slim_views(s["views"], mean, std)} for s in views["samples"]]
    torch.save(views, args.dst / "authors_test_views.pt")
    for path in sorted(args.dst.rglob("*")):
        if path.is_file() and path.parent == args.dst:
            print(f"{path.stat().st_size / 1e6:7.2f} MB  {path.name}")


if __name__ == "__main__":
    main()
