from collections import Counter

import numpy as np
import pytest
import torch

from workbench.data import (DataError, IdentitySampler, ImageDataset, build_loaders, build_transforms,
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
    with pytest.raises(DataError, match="already exists"):
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
