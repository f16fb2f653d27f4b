import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.errors import UsageError

from workbench.data import (CLIP_MEAN, CLIP_STD, DataError, IdentitySampler, ImageDataset, build_loaders, build_transforms,
                            camera_of, load_reid_dataset, synthesize_dataset)


def test_layout_classes_and_cameras(synth_root):
    data = load_reid_dataset(synth_root)
    assert data.classnames == sorted({r.pid for r in data.train}) and data.num_classes == 8
    assert data.class_to_idx[data.classnames[3]] == 3
    assert data.has_cameras and {r.camid for r in data.query} == {1}
    assert not data.unmatched_query_pids
    assert not {r.pid for r in data.train} & {r.pid for r in data.query}
    assert camera_of("0002_c1s1_000451_03.jpg") == 1 and camera_of("hand_007.png") == -1


def test_synthetic_is_deterministic(tmp_path):
    a = synthesize_dataset(tmp_path / "a", 2, 2, seed=3, size=(32, 16))
    b = synthesize_dataset(tmp_path / "b", 2, 2, seed=3, size=(32, 16))
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png")) and len(files) == 2 * 2 + 2 * (2 + 2)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        synthesize_dataset(tmp_path / "a", 2, 2, seed=3, size=(32, 16))


def test_missing_folder_and_corrupt_image(tmp_path, synth_root):
    with pytest.raises(DataError, match="not found"):
        load_reid_dataset(tmp_path / "nowhere")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    data = load_reid_dataset(synth_root)
    record = type(data.train[0])(str(bad), "x", -1)
    with pytest.raises(DataError, match="cannot read image"):
        ImageDataset([record], build_transforms((64, 32), False))[0]


def test_pk_sampler_yields_p_ids_times_k_images():
    labels = np.repeat(np.arange(10), [6, 6, 4, 4, 3, 8, 5, 2, 4, 4])
    sampler = IdentitySampler(labels, batch_size=12, num_instances=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        counts = Counter(labels[batch].tolist())
        assert len(batch) == 12 and len(counts) == 3 and set(counts.values()) == {4}
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches


def test_transforms_and_loaders(synth_root):
    data = load_reid_dataset(synth_root)
    loaders = build_loaders(data, image_size=(64, 32), batch_size=8, num_instances=2, test_batch_size=16,
                            num_workers=0, seed=0)
    images, labels, cams, idx = next(iter(loaders.train))
    assert images.shape == (8, 3, 64, 32) and labels.dtype == torch.long and len(set(labels.tolist())) == 4
    q = next(iter(loaders.query))[0]
    assert q.shape[1:] == (3, 64, 32)
    assert loaders.train_eval.dataset.labels == data.train_labels


def _check_holdout(data, expected_ids: int, images_per_id: int = 4):
    held = {r.pid for r in data.val_gallery}
    assert data.val_source == "holdout" and data.has_validation and data.val_has_cameras
    assert len(held) == len(data.val_gallery) == expected_ids  # one gallery image per held-out identity
    assert {r.pid for r in data.val_query} == held and len(data.val_query) == expected_ids * (images_per_id - 1)
    assert not {r.path for r in data.val_query} & {r.path for r in data.val_gallery}
    assert not held & {r.pid for r in data.train} and not held & set(data.classnames)
    assert data.classnames == sorted({r.pid for r in data.train}) and data.num_classes == 8 - expected_ids
    assert sorted(set(data.train_labels)) == list(range(data.num_classes))
    assert len(data.train) + len(data.val_query) + len(data.val_gallery) == 8 * images_per_id


def _split(data):
    return [r.path for r in data.val_query], [r.path for r in data.val_gallery]


def test_holdout_by_count_is_seeded_and_identity_disjoint(synth_root):
    data = load_reid_dataset(synth_root, val_identities=3, val_seed=0)
    _check_holdout(data, 3)
    assert _split(load_reid_dataset(synth_root, val_identities=3, val_seed=0)) == _split(data)
    assert _split(load_reid_dataset(synth_root, val_identities=3, val_seed=1)) != _split(data)
    plain = load_reid_dataset(synth_root)
    assert plain.val_source == "none" and not plain.has_validation and plain.num_classes == 8


def test_holdout_by_fraction(synth_root):
    _check_holdout(load_reid_dataset(synth_root, val_identities=0.25, val_seed=5), 2)
    _check_holdout(load_reid_dataset(synth_root, val_identities=0.01), 1)  # rounds to 0, at least 1


def test_holdout_errors_and_single_image_distractor(synth_root, tmp_path):
    for bad in (7, 8, 2.5, -1):
        with pytest.raises(DataError, match="val_identities"):
            load_reid_dataset(synth_root, val_identities=bad)
    held = sorted(r.pid for r in load_reid_dataset(synth_root, val_identities=3).val_gallery)
    root = tmp_path / "d"
    shutil.copytree(synth_root, root)
    for pid in held[1:]:  # single-image identities: gallery distractors
        for image in sorted((root / "train" / pid).iterdir())[1:]:
            image.unlink()
    data = load_reid_dataset(root, val_identities=3)
    assert sorted(r.pid for r in data.val_gallery) == held
    assert {r.pid for r in data.val_query} == {held[0]} and len(data.val_query) == 3
    for image in sorted((root / "train" / held[0]).iterdir())[1:]:
        image.unlink()
    with pytest.raises(DataError, match="nothing to evaluate"):
        load_reid_dataset(root, val_identities=3)


def _with_val(synth_root, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("query", "gallery"))
    for split in ("query", "gallery"):
        (root / split).symlink_to(synth_root / split)
    return root


def test_val_folder_query_gallery_layout(synth_root, tmp_path):
    root = _with_val(synth_root, tmp_path)
    pids = sorted(p.name for p in (synth_root / "query").iterdir())[:3]
    for split in ("query", "gallery"):
        for pid in pids:
            shutil.copytree(synth_root / split / pid, root / "val" / split / pid)
    data = load_reid_dataset(root)
    assert data.val_source == "folder" and data.has_validation and data.val_has_cameras
    assert {r.pid for r in data.val_query} == {r.pid for r in data.val_gallery} == set(pids)
    assert len(data.val_query) == 3 * 2 and len(data.val_gallery) == 3 * 4  # used as is
    assert data.num_classes == 8 and len(data.train) == 32
    assert load_reid_dataset(root, val_identities=2).val_source == "holdout"  # an explicit hold-out wins


def test_val_folder_identity_layout(synth_root, tmp_path):
    root = _with_val(synth_root, tmp_path)
    pids = sorted(p.name for p in (synth_root / "gallery").iterdir())[:3]
    for pid in pids:
        shutil.copytree(synth_root / "gallery" / pid, root / "val" / pid)
    data = load_reid_dataset(root, val_seed=0)
    assert data.val_source == "folder" and data.has_validation
    assert sorted(r.pid for r in data.val_gallery) == pids and len(data.val_query) == 3 * 3
    assert {r.pid for r in data.val_query} == set(pids)
    assert _split(load_reid_dataset(root, val_seed=0)) == _split(data)
    assert data.num_classes == 8


def test_loaders_expose_validation(synth_root):
    kwargs = dict(image_size=(64, 32), batch_size=8, num_instances=2, test_batch_size=16, num_workers=0, seed=0)
    plain = build_loaders(load_reid_dataset(synth_root), **kwargs)
    assert plain.val_query is None and plain.val_gallery is None
    data = load_reid_dataset(synth_root, val_identities=2)
    loaders = build_loaders(data, **kwargs)
    assert loaders.val_query.dataset.records == data.val_query
    assert loaders.val_gallery.dataset.records == data.val_gallery
    assert set(loaders.val_query.dataset.labels) == {-1}  # never scored against training classes
    images = next(iter(loaders.val_gallery))[0]
    assert images.shape == (2, 3, 64, 32)


def test_pixel_mean_and_std(synth_root):
    grey = torch.tensor([51, 102, 204], dtype=torch.uint8).view(3, 1, 1).expand(3, 64, 32)
    x = build_transforms((64, 32), False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(grey)
    assert torch.allclose(x[:, 0, 0], torch.tensor([-0.6, -0.2, 0.6]), atol=1e-5)
    kwargs = dict(image_size=(64, 32), batch_size=8, num_instances=2, test_batch_size=4, num_workers=0, seed=0)
    data = load_reid_dataset(synth_root)
    clip = next(iter(build_loaders(data, **kwargs).query))[0]
    half = next(iter(build_loaders(data, pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3, **kwargs).query))[0]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose((clip * std + mean - 0.5) / 0.5, half, atol=1e-5)
    torch.manual_seed(0)
    train_half = next(iter(build_loaders(data, pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3, flip_prob=0, pad=0,
                                         random_erasing=0, **kwargs).train))[0]
    assert train_half.min() >= -1 - 1e-5 and train_half.max() <= 1 + 1e-5 and train_half.min() < -0.75


@pytest.mark.parametrize("labels, batch_size, num_instances", [
    (np.repeat(np.arange(10), [6, 6, 4, 4, 3, 8, 5, 2, 4, 4]), 8, 2),  # today len 5, yields 4 in epoch 0
    (np.repeat(np.arange(10), [6, 6, 4, 4, 3, 8, 5, 2, 4, 4]), 4, 2),
    (np.repeat(np.arange(10), [6, 6, 4, 4, 3, 8, 5, 2, 4, 4]), 12, 4),
] + [(np.repeat(np.arange(n), np.random.default_rng(seed).integers(1, 20, n)), 8, 4)
     for seed, n in ((2, 13), (3, 12), (4, 11), (7, 6))])
def test_pk_sampler_length_matches_batches(labels, batch_size, num_instances):
    sampler = IdentitySampler(labels, batch_size=batch_size, num_instances=num_instances, seed=0)
    for epoch in range(6):
        sampler.set_epoch(epoch)
        announced = len(sampler)
        batches = list(sampler)
        assert announced == len(batches) > 0
        for batch in batches:
            counts = Counter(labels[batch].tolist())
            assert len(counts) == batch_size // num_instances and set(counts.values()) == {num_instances}
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(3)
    sampler.set_epoch(2)
    assert list(sampler) == first


def test_holdout_gallery_image_comes_from_the_rarest_camera():
    from workbench.data import Record, _one_gallery_image_per_identity

    records = [Record(f"a{i}.png", "a", cam) for i, cam in enumerate([1, 1, 1, 2])] + \
              [Record(f"b{i}.png", "b", cam) for i, cam in enumerate([3, 1, 1, 3, 3])]
    for seed in range(5):
        query, gallery = _one_gallery_image_per_identity(records, seed)
        assert [(r.pid, r.camid) for r in gallery] == [("a", 2), ("b", 1)]
        assert len(query) == 7  # every query now has a match from another camera


def _market_fixture(root):
    """A tiny Market-1501 folder: 3 training ids, 2 test ids over 2 cameras, a distractor (0000)
    and a junk image (-1) in the gallery, a junk image in the query."""
    names = {
        "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c1s1_000101_01.jpg",
                               "0007_c3s1_000201_02.jpg", "0010_c2s2_000301_01.jpg", "0010_c4s2_000401_01.jpg"],
        "query": ["0001_c1s1_001051_00.jpg", "0003_c2s1_000151_00.jpg", "-1_c1s1_000001_00.jpg"],
        "bounding_box_test": ["0001_c2s1_000301_01.jpg", "0001_c1s1_001101_02.jpg", "0003_c1s1_000201_01.jpg",
                              "0000_c3s1_000001_01.jpg", "-1_c1s1_000011_01.jpg"],
    }
    for folder, files in names.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            Image.new("RGB", (16, 32), (120, 60, 30)).save(root / folder / name)
    return root


def test_market1501_layout_is_read_as_torchreid_reads_it(tmp_path):
    root = _market_fixture(tmp_path / "market")
    data = load_reid_dataset(root)  # detected
    assert data.classnames == ["0002", "0007", "0010"]
    assert sorted((r.pid, r.camid) for r in data.query) == [("0001", 1), ("0003", 2)]  # junk -1 dropped
    gallery = sorted((r.pid, r.camid) for r in data.gallery)
    assert gallery == [("0000", 3), ("0001", 1), ("0001", 2), ("0003", 1)]  # distractor kept, junk dropped
    assert data.has_cameras
    (root / "bounding_box_train" / "bad_name.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="bad_name.jpg: not a Market-1501 file name"):
        load_reid_dataset(root, layout="market1501")
    with pytest.raises(DataError, match="not found"):
        load_reid_dataset(root, layout="folders")


def test_prepared_splits_are_chosen_by_number(tmp_path, synth_root):
    root = tmp_path / "prepared"
    shutil.copytree(synth_root / "train", root / "train")
    for i, (query, gallery) in enumerate([("query", "gallery"), ("gallery", "query")]):
        shutil.copytree(synth_root / query, root / f"query{i}")
        shutil.copytree(synth_root / gallery, root / f"gallery{i}")
    zero, one = load_reid_dataset(root, split=0), load_reid_dataset(root, split=1)
    assert {r.path.split("/")[-1] for r in zero.query} == {r.path.split("/")[-1] for r in one.gallery}
    with pytest.raises(DataError, match=r"no query5/gallery5 \(prepared splits: 0..1\)"):
        load_reid_dataset(root, split=5)
    with pytest.raises(DataError, match="it has one test split: use split 0"):
        load_reid_dataset(synth_root, split=1)


def test_a_val_folder_of_one_image_per_training_identity(tmp_path, synth_root):
    """The hand protocol's validation set: queries against the other training images of their ids."""
    root = tmp_path / "handval"
    shutil.copytree(synth_root, root)
    first = {}
    for image in sorted((root / "train").rglob("*.png")):
        first.setdefault(image.parent.name, image)
    for pid, image in first.items():
        (root / "val" / pid).mkdir(parents=True)
        shutil.copy(image, root / "val" / pid / image.name)
    data = load_reid_dataset(root)
    assert data.val_source == "folder" and len(data.val_query) == len(first)
    assert {r.pid for r in data.val_gallery} == set(first)
    assert not {Path(r.path).name for r in data.val_query} & {Path(r.path).name for r in data.val_gallery}


def _pil_pipeline(size, train, flip_prob=0.5, pad=10, random_erasing=0.5):
    """The former transforms: torchvision's PIL pipeline, the reference of the uint8 one."""
    from torchvision import transforms as T

    steps = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        steps += [T.RandomHorizontalFlip(flip_prob)] if flip_prob > 0 else []
        steps += [T.Pad(pad), T.RandomCrop(size)] if pad > 0 else []
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    if train and random_erasing > 0:
        steps.append(T.RandomErasing(p=random_erasing, value=0))
    return T.Compose(steps)


@pytest.mark.parametrize("train,flip_prob,pad,random_erasing", [
    (False, 0.5, 10, 0.5), (True, 0.5, 10, 0.5), (True, 0.5, 2, 0.0), (True, 0.0, 0, 1.0), (True, 1.0, 30, 0.0)])
def test_uint8_transforms_equal_the_pil_pipeline_bit_for_bit(synth_root, train, flip_prob, pad, random_erasing):
    from workbench.data import decode

    paths = sorted(str(p) for p in (synth_root / "train").rglob("*.png"))[:24]
    ours = build_transforms((64, 32), train, flip_prob, pad, random_erasing)
    reference = _pil_pipeline((64, 32), train, flip_prob, pad, random_erasing)
    changed = 0
    for seed, path in enumerate(paths):
        with Image.open(path) as img:
            torch.manual_seed(seed)
            expected = reference(img.convert("RGB"))
            after_reference = torch.rand(1)
        torch.manual_seed(seed)
        got = ours(decode(path, (64, 32)))
        assert torch.equal(got, expected), path
        assert torch.equal(torch.rand(1), after_reference), "the same number of random draws"
        torch.manual_seed(seed)
        changed += not torch.equal(got, build_transforms((64, 32), False)(decode(path, (64, 32))))
    assert changed == 0 if not train else changed >= len(paths) - 2  # training transforms do change images


def test_cached_images_give_the_same_batches_as_fresh_decoding(synth_root):
    kwargs = dict(image_size=(64, 32), batch_size=8, num_instances=2, test_batch_size=16, num_workers=0, seed=3)
    data = load_reid_dataset(synth_root, val_identities=2)
    fresh, cached = build_loaders(data, **kwargs), build_loaders(data, cache_images=True, **kwargs)
    assert fresh.train.dataset.images is None and cached.train.dataset.images is not None
    for a, b in ((fresh.train, cached.train), (fresh.query, cached.query), (fresh.val_gallery, cached.val_gallery)):
        torch.manual_seed(0)
        first = [batch[0] for batch in a]
        torch.manual_seed(0)
        second = [batch[0] for batch in b]
        assert len(first) == len(second) and all(torch.equal(x, y) for x, y in zip(first, second))


def test_decoded_images_are_reused_until_a_file_changes(synth_root, tmp_path):
    from workbench.data import DecodedImages

    folder = tmp_path / "imgs"
    shutil.copytree(synth_root / "train", folder)
    paths = sorted(str(p) for p in folder.rglob("*.png"))[:6]
    first = DecodedImages.get(paths, (64, 32))
    assert DecodedImages.get(paths, (64, 32)) is first  # the next trial of a study decodes nothing
    assert DecodedImages.get(paths, (32, 16)) is not first
    Image.new("RGB", (32, 64), (0, 0, 0)).save(paths[0])  # a file rewritten: decoded again
    again = DecodedImages.get(paths, (64, 32))
    assert again is not first and int(again[paths[0]].max()) == 0 and torch.equal(again[paths[1]], first[paths[1]])
    bad = folder / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        DecodedImages.get([*paths, str(bad)], (64, 32))


def _epochs(loaders, epochs):
    out = []
    for epoch in epochs:
        loaders.sampler.set_epoch(epoch)
        out.append([(images, labels) for images, labels, _, _ in loaders.train])
    return out


def test_training_batches_do_not_depend_on_the_worker_count_or_on_resuming(synth_root):
    """Every image's augmentation is seeded by its place in the epoch (SeededBatches): worker
    processes give the batches the main process gives, and an epoch started fresh (a resumed run)
    the batches it gives after the earlier ones."""
    kwargs = dict(image_size=(64, 32), batch_size=8, num_instances=2, test_batch_size=16, seed=5, random_erasing=0.5,
                  cache_images=True)
    data = load_reid_dataset(synth_root, val_identities=2)
    torch.manual_seed(0)
    main = _epochs(build_loaders(data, num_workers=0, **kwargs), [0, 1, 2])
    torch.manual_seed(1)  # the global generator plays no part
    workers = _epochs(build_loaders(data, num_workers=2, **kwargs), [0, 1, 2])
    resumed = _epochs(build_loaders(data, num_workers=2, **kwargs), [2])
    for ours, theirs in [*zip(main, workers, strict=True), (main[2], resumed[0])]:
        assert len(ours) == len(theirs) > 0
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, theirs))
    assert not torch.equal(main[1][0][0], main[2][0][0])  # epochs differ ...
    plain = build_loaders(data, num_workers=0, **{**kwargs, "random_erasing": 0.0, "flip_prob": 0.0, "pad": 0})
    plain.sampler.set_epoch(0)
    untouched = next(iter(plain.train))[0]
    assert not torch.equal(main[0][0][0], untouched)  # ... and the augmentation does change the images
    assert len({main[0][0][0][i].sum().item() - untouched[i].sum().item() for i in range(8)}) > 1  # per image


@pytest.mark.parametrize("setting, on_gpu, sharing, ranks, cores, expected", [
    (3, True, 1, 1, 16, 3),  # a count is a count
    (3, False, 1, 1, 16, 3),
    ("auto", False, 1, 1, 16, 0),  # the CPU: the model computes on the cores a worker would take
    ("auto", True, 1, 1, 16, 8),  # a GPU: at most 8
    ("auto", True, 1, 1, 6, 5),  # one core left to the training loop
    ("auto", True, 2, 1, 6, 2),  # two trials side by side share the cores
    ("auto", True, 1, 4, 16, 3),  # four DDP ranks on the machine
    ("auto", True, 1, 1, 1, 1),  # never 0 where workers are wanted
])
def test_num_workers_auto_takes_the_cores_it_may_use(monkeypatch, setting, on_gpu, sharing, ranks, cores, expected):
    import os

    from workbench.data import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert loader_workers(setting, on_gpu=on_gpu, sharing=sharing) == expected


def test_only_loaders_read_every_epoch_keep_their_workers(synth_root):
    kwargs = dict(image_size=(64, 32), batch_size=8, num_instances=2, test_batch_size=16, seed=0, num_workers=1)
    loaders = build_loaders(load_reid_dataset(synth_root, val_identities=2), **kwargs)
    every_epoch = {name for name in ("train", "train_eval", "query", "gallery", "val_query", "val_gallery")
                   if getattr(loaders, name).persistent_workers}
    assert every_epoch == {"train", "val_query", "val_gallery"}
    plain = build_loaders(load_reid_dataset(synth_root), **kwargs)  # no hold-out: the test split selects
    assert plain.query.persistent_workers and plain.gallery.persistent_workers
    assert not build_loaders(load_reid_dataset(synth_root), **{**kwargs, "num_workers": 0}).train.persistent_workers
