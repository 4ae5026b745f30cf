"""The teacher cache (engine/teacher_cache.py): every view's output is the teacher's on that view,
a KD epoch reads it instead of running the teacher and ends where it would have, and the cache is
kept, keyed, reused, refused and never left half-written."""
import glob
import os

import pytest
import torch

import engine.loop
import engine.teacher_cache
from conftest import DEVICE, assert_user_error, make_cifar10, run_script
from data import DATASETS, OFFSETS, PAD, VIEWS, DeviceLoader, every_view, pad_images, random_crop_flip, view_code
from engine import Teacher
from engine.teacher_cache import build_cache
from kd_losses import METHODS
from models import build_model


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """20 training images (3,240 views) and 20 test images: a cache built in about a second."""
    return make_cifar10(str(tmp_path_factory.mktemp("small")), per_batch=4, test=20)


def kd(teacher, root, out, method, *args, check=True):
    return run_script("train_kd.py", "--teacher", teacher, "--method", method, "--student", "resnet8",
                      "--data-root", root, "--output-dir", out, "--epochs", 1, "--batch-size", 8, *args,
                      *(("--crd-negatives", 4) if method == "crd" else ()), check=check)


def cache_files(folder):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "teacher-cache-*")))


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_every_view_is_its_crop_and_flip_and_what_the_loader_draws(mode):
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views, padded = every_view(images, mode), pad_images(images, mode)
    assert views.shape == (5, VIEWS, 3, 32, 32) and VIEWS == 162 and OFFSETS == 2 * PAD + 1 == 9
    for dy in range(OFFSETS):
        for dx in range(OFFSETS):
            crop = padded[:, :, dy:dy + 32, dx:dx + 32]
            assert torch.equal(views[:, view_code(dy, dx, 0)], crop)
            assert torch.equal(views[:, view_code(dy, dx, 1)], crop.flip(-1))
    crops, drawn = random_crop_flip(images.repeat(40, 1, 1, 1), torch.Generator().manual_seed(1), mode)
    assert torch.equal(crops, views.repeat(40, 1, 1, 1, 1)[torch.arange(200), drawn])
    assert len(drawn.unique()) > 100  # the codes cover the views


def test_a_cached_view_is_the_teachers_output_on_that_view_cropped_by_hand():
    torch.manual_seed(0)
    teacher = Teacher(build_model("resnet8", 10))
    spec = DATASETS["cifar10"]
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    loader = DeviceLoader(images, torch.arange(3), 3, spec.mean, spec.std, train=True, padding="reflect")
    tables = build_cache(teacher, images, loader.normalize, "reflect", ("logits", "pool"))
    assert tables["logits"].shape == (3 * VIEWS, 10) and tables["pool"].shape == (3 * VIEWS, 64)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4), mode="reflect")
    for image, dy, dx, flip in ((0, 0, 0, 0), (1, 8, 3, 1), (2, 4, 8, 0), (2, 7, 0, 1)):
        crop = padded[image:image + 1, :, dy:dy + 32, dx:dx + 32]
        crop = crop.flip(-1) if flip else crop
        expected = teacher.outputs(loader.normalize(crop), ["pool"])
        row = image * VIEWS + (dy * 9 + dx) * 2 + flip
        for name in ("logits", "pool"):
            assert torch.allclose(tables[name][row], expected[name][0], rtol=1e-5, atol=1e-6), (name, image, dy, dx)


@pytest.mark.parametrize("method", ["st", "rkd", "crd"])
def test_a_kd_epoch_with_the_cache_is_the_epoch_without_it(teacher, small_root, tmp_path, monkeypatch, method):
    """Same seed, same batches (with 4 images held out, so the run's samples are not the training
    files' positions): every step's loss within 1e-5 relative, the final weights within 1e-5
    relative norm, and no teacher forward in a cached step."""
    record = {}
    train_step, outputs = engine.loop.train_step, Teacher.outputs

    def recorded_step(*args, **kwargs):
        record["in_step"] = True
        result = train_step(*args, **kwargs)
        record["in_step"] = False
        record.setdefault("losses", []).append(result[1].item())
        return result

    def counted_outputs(self, *args, **kwargs):
        record["teacher_in_step"] = record.get("teacher_in_step", 0) + record.get("in_step", False)
        return outputs(self, *args, **kwargs)
    monkeypatch.setattr(engine.loop, "train_step", recorded_step)
    monkeypatch.setattr(Teacher, "outputs", counted_outputs)
    runs = {}
    for cache in ("off", "on"):
        record.clear()
        proc = kd(teacher, small_root, tmp_path / cache, method, "--val-split", 4, "--teacher-cache", cache,
                  "--teacher-cache-dir", tmp_path / "caches")
        runs[cache] = dict(record, weights=torch.load(tmp_path / cache / "last.pt", weights_only=True)["model"])
        assert ("teacher cache: off" in proc.stdout) == (cache == "off")
    assert runs["off"]["teacher_in_step"] == 2 and runs["on"].get("teacher_in_step", 0) == 0  # 16 images: 2 steps
    assert runs["on"]["losses"] == pytest.approx(runs["off"]["losses"], rel=1e-5)
    a, b = (torch.cat([w.flatten().double() for k, w in runs[c]["weights"].items() if w.is_floating_point()])
            for c in ("on", "off"))
    assert 0 < (a - b).norm() / b.norm() < 1e-5 or torch.equal(a, b)


def test_the_cache_is_kept_reused_by_other_runs_and_methods_and_keyed(teacher, small_root, tmp_path):
    caches = tmp_path / "caches"
    flags = ("--teacher-cache", "on", "--teacher-cache-dir", caches)
    assert "teacher cache: building" in kd(teacher, small_root, tmp_path / "a", "st", *flags).stdout
    [logits_only] = cache_files(caches)
    assert logits_only.endswith("-logits.pt")
    proc = kd(teacher, small_root, tmp_path / "b", "st", "--seed", 1, "--val-split", 4, *flags)
    assert f"teacher cache: using {caches / logits_only}" in proc.stdout  # another seed and split: the same cache
    assert "teacher cache: building" in kd(teacher, small_root, tmp_path / "c", "rkd", *flags).stdout
    assert len(cache_files(caches)) == 2
    # auto finds an existing cache whatever the epoch count; crd reads the rkd one; st the smaller one
    proc = kd(teacher, small_root, tmp_path / "d", "crd", "--teacher-cache-dir", caches)
    assert "teacher cache: using" in proc.stdout
    assert f"using {caches / logits_only}" in kd(teacher, small_root, tmp_path / "e", "st", *flags).stdout
    # what changes the teacher's outputs changes the key: here the padding
    proc = kd(teacher, small_root, tmp_path / "f", "st", "--padding", "zeros", *flags)
    assert "teacher cache: building" in proc.stdout and len(cache_files(caches)) == 3
    # a file whose key is not the run's is never used, whatever its name says
    for other in cache_files(caches):
        if other != logits_only and other.endswith("-logits.pt"):
            os.replace(caches / other, caches / logits_only)
    proc = kd(teacher, small_root, tmp_path / "g", "st", *flags)
    assert "its key differs from this run's" in proc.stdout and "teacher cache: building" in proc.stdout
    # nor is a damaged one
    with open(caches / logits_only, "r+b") as f:
        f.truncate(1000)
    proc = kd(teacher, small_root, tmp_path / "h", "st", *flags)
    assert "it cannot be read" in proc.stdout and "teacher cache: building" in proc.stdout
    assert not glob.glob(str(caches / "*.tmp*"))


def test_the_cache_is_written_beside_the_teacher_by_default(teacher, small_root, tmp_path):
    kd(teacher, small_root, tmp_path / "a", "pkt", "--teacher-cache", "on")
    [built] = cache_files(teacher.parent)
    assert built.endswith("-logits+pool.pt")
    os.remove(teacher.parent / built)


def test_auto_builds_only_when_the_run_makes_more_teacher_forwards(teacher, small_root, tmp_path, monkeypatch):
    """Building costs 162 forwards per training image: from 162 epochs on a run makes as many."""
    monkeypatch.setattr("train_kd.fit", lambda *args: None)  # the decision alone, not 162 epochs
    caches = tmp_path / "caches"
    for epochs, built in ((161, False), (162, True)):
        proc = kd(teacher, small_root, tmp_path / str(epochs), "st", "--epochs", epochs, "--teacher-cache-dir", caches)
        assert bool(cache_files(caches)) == built
        if not built:
            assert ("not built: its 162 x 20 = 3,240 teacher forwards are more than the run's 161 epochs x 20 "
                    "images") in proc.stdout


def test_methods_declare_whether_they_can_use_the_cache(teacher, small_root, tmp_path):
    usable = [name for name, cls in METHODS.items() if not cls.teacher_cache_refusal()]
    assert usable == ["logits", "st", "pkt", "rkd", "cc", "crd", "dkd", "dist", "ctkd", "nkd"]
    for method, reason in (("bss", "it runs the teacher itself"), ("sobolev", "it runs the teacher itself"),
                           ("dml", "it reads no teacher outputs"), ("at", "the teacher's stages")):
        proc = kd(teacher, small_root, tmp_path / method, method, "--teacher-cache", "on", check=False)
        assert_user_error(proc, f"--teacher-cache on cannot serve --method {method}", reason)
        assert not os.path.exists(tmp_path / method)
    proc = kd(teacher, small_root, tmp_path / "ft", "ft", "--ft-epochs", 1)
    assert "not used: --method ft cannot use it (it reads the teacher's last stage" in proc.stdout
    proc = kd(teacher, small_root, tmp_path / "zero", "st", "--kd-weight", 0, "--teacher-cache", "on")
    assert "not used: with --kd-weight 0 the teacher does not run" in proc.stdout


def test_a_cache_that_does_not_fit_is_an_error_with_on_and_skipped_with_auto(teacher, small_root, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr("train_kd.fit", lambda *args: None)
    monkeypatch.setattr(engine.teacher_cache, "memory_available", lambda device: 10**9)
    monkeypatch.setattr(engine.teacher_cache, "HEADROOM", 10**9)
    proc = kd(teacher, small_root, tmp_path / "on", "st", "--teacher-cache", "on", "--teacher-cache-dir",
              tmp_path / "caches", check=False)
    assert_user_error(proc, "--teacher-cache on: the teacher cache needs 0.1 MB of", "memory plus 1.00 GB for "
                      "training, and 1.00 GB is free")
    proc = kd(teacher, small_root, tmp_path / "auto", "st", "--epochs", 162, "--teacher-cache-dir", tmp_path / "caches",
              check=False)
    assert "teacher cache: not used: the teacher cache needs 0.1 MB" in proc.stdout
    assert not os.path.exists(tmp_path / "caches")


@pytest.mark.parametrize("when", ["building", "saving"])
def test_an_interrupted_build_leaves_no_cache(teacher, small_root, tmp_path, monkeypatch, when):
    """Ctrl-C in the third teacher forward of the build, or halfway through writing the file."""
    calls, outputs = [], Teacher.outputs

    def interrupt_third(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return outputs(self, *args)

    def interrupt_writing(obj, f):
        calls.append(1)
        f.write(b"half a cache")
        raise KeyboardInterrupt
    if when == "building":
        monkeypatch.setattr(Teacher, "outputs", interrupt_third)
    else:
        monkeypatch.setattr(torch, "save", interrupt_writing)
    with pytest.raises(KeyboardInterrupt):
        kd(teacher, small_root, tmp_path / "run", "st", "--teacher-cache", "on", "--teacher-cache-dir", tmp_path)
    assert calls and cache_files(tmp_path) == [] and not glob.glob(str(tmp_path / "*.tmp*"))


def test_a_resumed_run_may_switch_the_cache_on(teacher, small_root, tmp_path):
    out, caches = tmp_path / "run", tmp_path / "caches"
    kd(teacher, small_root, out, "rkd", "--teacher-cache", "off")
    proc = kd(teacher, small_root, out, "rkd", "--epochs", 2, "--resume", "auto", "--teacher-cache", "on",
              "--teacher-cache-dir", caches)
    assert "resuming with --teacher-cache on" in proc.stdout and "teacher cache: building" in proc.stdout
    assert len(open(out / "metrics.csv").readlines()) == 3


def test_the_cache_is_stored_in_the_teachers_precision(teacher, small_root, tmp_path):
    if DEVICE == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16")
    kd(teacher, small_root, tmp_path / "run", "rkd", "--amp", "bf16", "--teacher-cache", "on",
       "--teacher-cache-dir", tmp_path)
    [name] = cache_files(tmp_path)
    saved = torch.load(tmp_path / name, weights_only=True)
    assert saved["key"]["precision"] == "bf16" and saved["outputs"]["logits"].shape == (20, VIEWS, 10)
    assert {t.dtype for t in saved["outputs"].values()} == {torch.bfloat16}


def test_a_corrupt_cache_is_never_used(teacher, small_root, tmp_path):
    """A cache whose tables were overwritten with other values of the same size (key and stored sha256
    untouched) is refused by its checksum and built again: the run's KD term is the uncached run's."""
    caches = tmp_path / "caches"
    flags = ("--teacher-cache", "on", "--teacher-cache-dir", caches)
    kd(teacher, small_root, tmp_path / "a", "st", *flags)
    [name] = cache_files(caches)
    saved = torch.load(caches / name, weights_only=True)
    saved["outputs"]["logits"] = torch.randn_like(saved["outputs"]["logits"])
    torch.save(saved, caches / name)
    proc = kd(teacher, small_root, tmp_path / "b", "st", *flags)
    assert "differ from the checksum stored with them (the file is corrupt)" in proc.stdout
    assert "teacher cache: building" in proc.stdout and "teacher cache: using" not in proc.stdout
    kd(teacher, small_root, tmp_path / "c", "st", "--teacher-cache", "off")
    rebuilt, uncached = (float(read_rows(tmp_path / run)[0]["train_kd"]) for run in ("b", "c"))
    assert rebuilt == pytest.approx(uncached, rel=1e-5)
    assert "teacher cache: using" in kd(teacher, small_root, tmp_path / "d", "st", *flags).stdout  # the rebuilt one


def read_rows(out):
    import csv
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))
