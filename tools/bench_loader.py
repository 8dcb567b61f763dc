"""The loader's speed: clips per second, and per core from CPU time.

    python tools/bench_loader.py MANIFEST [--workers N] [--batch_size 8] [--num_batches 20] [--task T]
                                 [--modality av] [--root_map OLD=NEW]

Items are the training items of the task at the paper's geometry (16 frames of 160 x 160, 256 x 128
log-Mel): pre-training items, or fine-tuning training items.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for python tools/bench_loader.py
from data import (MODALITIES, TASKS, FinetuneDataset, PretrainDataset, add_root_map, guess_task,  # noqa: E402
                  read_manifest)
from model import HiCMAEConfig  # noqa: E402


class Timed(torch.utils.data.Dataset):
    """Items of a data set with `cpu_s`: the CPU time of the process that made the item."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        start = time.process_time()
        item = self.dataset[index]
        return dict(item, cpu_s=time.process_time() - start)


def bench(manifest, root_map=(), workers=0, batch_size=8, num_batches=20, task=None, modality="av"):
    """Print the loader's clips per second over num_batches batches (after one warm-up), and the clips
    per second one core makes: 1 / the mean CPU time of an item in its worker's process (one thread,
    as the loader's workers run), which stays comparable on a busy machine. Returns clips/s."""
    task = task or guess_task(manifest)
    samples = read_manifest(manifest, root_map, task)
    if task == "pretrain":
        dataset = PretrainDataset(samples, HiCMAEConfig())
    else:
        dataset = FinetuneDataset(samples, HiCMAEConfig(), train=True, modality=modality)
    dataset = Timed(dataset)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=(num_batches + 1) * batch_size,
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader's worker
    try:
        batches = iter(loader)
        next(batches)
        start, cpu = time.perf_counter(), []
        for batch in batches:
            cpu += batch["cpu_s"].tolist()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    clips, per_item = len(cpu), sum(cpu) / len(cpu)
    print(f"{task}: {clips} clips in {seconds:.1f} s = {clips / seconds:.1f} clips/s with {workers} workers "
          f"(batch {batch_size}); {per_item * 1000:.1f} ms CPU per item = {1 / per_item:.1f} clips/s per core")
    return clips / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    add_root_map(parser)
    parser.add_argument("--workers", type=int, default=0, help="loader workers (default 0: in this process)")
    parser.add_argument("--batch_size", type=int, default=8, help="default 8")
    parser.add_argument("--num_batches", type=int, default=20, help="batches timed after one warm-up (default 20)")
    parser.add_argument("--task", choices=TASKS, help="pretrain: pre-training items; classification or regression: "
                        "fine-tuning training items (default: from the first row)")
    parser.add_argument("--modality", choices=MODALITIES, default="av", help="fine-tuning items' modality (default av)")
    args = parser.parse_args(argv)
    bench(args.manifest, args.root_map, args.workers, args.batch_size, args.num_batches, args.task,
          args.modality)


if __name__ == "__main__":
    main()
