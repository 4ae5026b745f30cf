"""The teacher cache: the frozen teacher's outputs on every augmented view of every training image,
computed once and kept for later runs.

A training image has exactly data.VIEWS = 162 augmented views (9 x 9 crop offsets, flipped or not),
and an eval-mode teacher's output on each never changes. For a method that reads only the
teacher's logits and pooled vector (KDMethod.teacher_cache_refusal says which), the KD step then
gathers them from a table at the batch's (sample, view) instead of running the teacher, and costs
what the baseline's step costs. The outputs equal the teacher's up to floating-point rounding: the
batches that computed them hold other images.

The table covers every image of the data set's training files, held-out ones too, so that one
cache serves every --val-split and seed. It is stored in the teacher's compute precision (bf16 under
--amp bf16), beside the teacher checkpoint or in --teacher-cache-dir, in a file named after its key
(the teacher's sha256, the training files' sha256, the normalisation, the padding and the precision) and
the outputs it
holds; a cache holding more outputs than a method reads serves it too. Each output's sha256 is stored
with it and checked when the cache is loaded: a corrupt file is never used (it is built again).
"""
import glob
import hashlib
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from data import DATASETS, VIEWS, every_view, load_cifar, training_files_sha256
from utils import UserError, barrier, is_main, log, make_writable_folder

from .checkpoint import save_atomic

FORMAT = 2  # 2: each output's sha256 stored and checked
IMAGES_PER_CHUNK = 64   # images whose views are cut at once: 64 x 162 views, 32 MB of uint8
HEADROOM = 1 << 30      # device memory left beside the cache for training itself


class TeacherCache:
    """The cached outputs of the teacher, read at a training batch's samples and views."""

    def __init__(self, tables, positions):
        self.tables = tables          # output name -> (training files' images x VIEWS) x C, on the device
        self.positions = positions    # the run's sample -> its image's position in the training files

    def outputs(self, indices, views):
        """What Teacher.outputs gives on the batch, from the table: indices and views as the training
        loader yields them (indices N x (1 + K) with contrastive negatives: column 0 the sample)."""
        samples = indices[:, 0] if indices.dim() == 2 else indices
        rows = self.positions[samples] * VIEWS + views
        return {name: table[rows] for name, table in self.tables.items()}


def cache_key(cfg):
    """What decides every cached output, except which outputs are kept (they are in the file name)."""
    spec = DATASETS[cfg.dataset]
    return {"format": FORMAT, "teacher_sha256": cfg.teacher_sha256, "dataset": cfg.dataset,
            "training_files_sha256": training_files_sha256(cfg.dataset, cfg.data_root),
            "mean": list(spec.mean), "std": list(spec.std),
            "padding": cfg.padding, "precision": "bf16" if cfg.amp == "bf16" else "fp32"}


def cache_folder(cfg):
    return cfg.teacher_cache_dir or os.path.dirname(os.path.abspath(cfg.teacher))


def file_prefix(key):
    return "teacher-cache-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + "-"


def cache_path(folder, key, names):
    return os.path.join(folder, file_prefix(key) + "+".join(names) + ".pt")


def find_cache(folder, key, names):
    """The smallest cache file in `folder` with this key and at least these outputs, or None."""
    prefix = file_prefix(key)
    found = [path for path in glob.glob(os.path.join(glob.escape(folder), prefix + "*.pt"))
             if set(names) <= set(os.path.basename(path)[len(prefix):-len(".pt")].split("+"))]
    return min(found, key=os.path.getsize, default=None)


def table_sha256(table):
    """sha256 of a table's bytes (bf16 included), read through once."""
    return hashlib.sha256(table.contiguous().view(torch.uint8).numpy()).hexdigest()


def load_cache(path, key, names):
    """The cache's tables of `names` (memory-mapped on the CPU), or None, with the reason logged, when
    the file does not hold exactly this key or a table's bytes differ from the sha256 stored when it
    was written (a corrupt file: reading it costs about a second per GB)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        tables = {name: saved["outputs"][name] for name in names}
        matches = saved["key"] == key
        corrupt = matches and [name for name in names if table_sha256(tables[name]) != saved["sha256"][name]]
    except Exception as e:  # truncated by hand, another format, a missing output: never used
        log(f"teacher cache: {path} is not used: it cannot be read ({type(e).__name__}: {e})")
        return None
    if not matches:
        log(f"teacher cache: {path} is not used: its key differs from this run's")
        return None
    if corrupt:
        log(f"teacher cache: {path} is not used: its {', '.join(corrupt)} differ from the checksum stored with "
            f"them (the file is corrupt)")
        return None
    return tables


def on_device(tables, device):
    """A loaded file's images x VIEWS x C tables as the (images x VIEWS) x C rows TeacherCache reads."""
    return {name: t.to(device).flatten(0, 1) for name, t in tables.items()}


def memory_available(device):
    """Bytes free for the cache on the device, or None where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def size_text(n_bytes):
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def fits(needed, device, asked):
    """True when `needed` bytes fit in the device's free memory beside HEADROOM for training. When
    they do not: an error with --teacher-cache on, a logged reason with auto."""
    free = memory_available(device)
    if free is None or needed + HEADROOM <= free:
        return True
    message = (f"the teacher cache needs {size_text(needed)} of {device.type.upper()} memory plus "
               f"{size_text(HEADROOM)} for training, and {size_text(free)} is free")
    if asked == "on":
        raise UserError(f"--teacher-cache on: {message}; use --teacher-cache off.")
    log(f"teacher cache: not used: {message}")
    return False


def build_cache(teacher, images, normalize, padding, names, progress=True):
    """Runs the teacher on every view of every image: {name: (images x VIEWS) x C} on the teacher's
    device, in its compute precision. normalize: the training loader's (the same float images);
    progress: a progress bar (in the main process)."""
    device = teacher.device
    # views per forward: all views of 2 images on a CPU (the fastest measured), of 32 on an accelerator;
    # a chunk is a whole number of forwards, so that a compiled forward sees one shape (and the last chunk's)
    batch = (2 if device.type == "cpu" else 32) * VIEWS
    images, features = images.to(device), [name for name in names if name != "logits"]
    tables = None
    on_terminal = sys.stderr.isatty()  # in a log file (a sweep's), one line a minute
    with tqdm(total=len(images) * VIEWS, unit="view", unit_scale=True, desc="teacher cache", dynamic_ncols=True,
              disable=not (progress and is_main()), mininterval=0.1 if on_terminal else 60) as bar:
        for first in range(0, len(images), IMAGES_PER_CHUNK):
            views = every_view(images[first:first + IMAGES_PER_CHUNK], padding).flatten(0, 1)
            for start in range(0, len(views), batch):
                out = teacher.outputs(normalize(views[start:start + batch]), features)
                if tables is None:
                    tables = {name: torch.empty(len(images) * VIEWS, *out[name].shape[1:], dtype=out[name].dtype,
                                                device=device) for name in names}
                row = first * VIEWS + start
                for name in names:
                    tables[name][row:row + len(out[name])] = out[name]
                bar.update(len(out["logits"]))
    return tables


def prepare_teacher_cache(cfg, method, teacher, train_loader, epochs_left):
    """The TeacherCache this run reads, or None; as --teacher-cache asks (config.resolve has refused
    on for a method that cannot use it). Logs which it is and why. Under torchrun process 0 builds
    the cache and the others load the file it writes."""
    asked, device = cfg.teacher_cache, train_loader.labels.device
    if asked == "off":
        log("teacher cache: off (--teacher-cache off): the teacher runs at every step")
        return None
    if cfg.kd_weight == 0:
        log("teacher cache: not used: with --kd-weight 0 the teacher does not run")
        return None
    refusal = method.teacher_cache_refusal()
    if refusal:
        log(f"teacher cache: not used: --method {method.name} cannot use it ({refusal})")
        return None
    names, key, folder = ("logits", *method.features), cache_key(cfg), cache_folder(cfg)
    path = find_cache(folder, key, names)
    tables = path and load_cache(path, key, names)
    if tables:
        if not fits(sum(t.nbytes for t in tables.values()), device, asked):
            return None
        log(f"teacher cache: using {path}: the teacher does not run in training")
        return TeacherCache(on_device(tables, device), train_loader.positions)

    images = load_cifar(cfg.dataset, cfg.data_root, download=False)[0]
    build_forwards, run_forwards = VIEWS * len(images), epochs_left * len(train_loader.labels)
    if asked == "auto" and build_forwards > run_forwards:
        log(f"teacher cache: not built: its {VIEWS} x {len(images)} = {build_forwards:,} teacher forwards are "
            f"more than the run's {epochs_left} epochs x {len(train_loader.labels)} images = {run_forwards:,}; "
            f"--teacher-cache on builds it for later runs too")
        return None
    probe = teacher.outputs(train_loader.normalize(images[:2].to(device)), names[1:])
    needed = sum(len(images) * VIEWS * t[0].numel() * t.element_size() for t in probe.values())
    if not fits(needed, device, asked):
        return None
    path = cache_path(folder, key, names)
    if is_main():
        make_writable_folder(folder, "teacher cache folder")
        reason = "--teacher-cache on" if asked == "on" else \
            f"no cache for this teacher and data yet, and the run's {run_forwards:,} teacher forwards are more"
        log(f"teacher cache: building {path} ({size_text(needed)}; {reason})")
        start = time.perf_counter()
        tables = build_cache(teacher, images, train_loader.normalize, cfg.padding, names)
        seconds = time.perf_counter() - start
        outputs = {name: t.view(len(images), VIEWS, *t.shape[1:]).cpu() for name, t in tables.items()}
        save_atomic({"key": key, "outputs": outputs, "sha256": {name: table_sha256(t) for name, t in outputs.items()},
                     "teacher": os.path.abspath(cfg.teacher), "data_root": os.path.abspath(cfg.data_root),
                     "build_seconds": seconds}, path)
        log(f"teacher cache: {build_forwards:,} views in {seconds:.0f} s ({build_forwards / seconds:.0f} views/s), "
            f"kept in {path}")
    barrier()
    if not is_main():
        tables = load_cache(path, key, names)
        if tables is None:
            raise UserError(f"Process 0 built the teacher cache {path}, which this process cannot read: under "
                            f"torchrun every process must see --teacher-cache-dir.")
        tables = on_device(tables, device)
    return TeacherCache(tables, train_loader.positions)
