"""ReID data: the folder layout, transforms, the identity-balanced sampler, loaders, and a
synthetic hand-identity dataset.

Layout: ``root/{train,query,gallery}/<pid>/<image>``. A ``c<N>`` part of an image's file name
(``0002_c1s1_000451.jpg``, ``hand_c2_07.png``) gives its camera. Classes are the training pids
sorted by name; query and gallery identities are compared by name.

Validation (model selection off the test split) is either a seeded hold-out of training
identities or an optional ``root/val`` folder: ``val/{query,gallery}/<pid>/`` or ``val/<pid>/``.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from .distributed import ShardSampler
from .errors import DataError, UsageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CAMERA = re.compile(r"(?:^|[_\-])c(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Record:
    path: str
    pid: str
    camid: int  # -1 when the file name carries no camera


@dataclass
class ReIDData:
    """The splits of a ReID dataset; ``classnames[i]`` is the pid of training label i.

    ``val_query``/``val_gallery`` are the validation split ("holdout": identities taken out of
    ``train``; "folder": ``root/val``; "none": empty), never used for training."""

    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    classnames: list[str]
    val_query: list[Record] = field(default_factory=list)
    val_gallery: list[Record] = field(default_factory=list)
    val_source: str = "none"  # "none" | "holdout" | "folder"

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classnames)}

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def train_labels(self) -> list[int]:
        index = self.class_to_idx
        return [index[r.pid] for r in self.train]

    @property
    def has_cameras(self) -> bool:
        return all(r.camid >= 0 for r in self.query + self.gallery)

    @property
    def has_validation(self) -> bool:
        return bool(self.val_query) and bool(self.val_gallery)

    @property
    def val_has_cameras(self) -> bool:
        return all(r.camid >= 0 for r in self.val_query + self.val_gallery)

    @property
    def unmatched_query_pids(self) -> list[str]:
        """Query identities absent from the gallery (reported, and skipped by the metrics)."""
        gallery = {r.pid for r in self.gallery}
        return sorted({r.pid for r in self.query} - gallery)


def camera_of(filename: str) -> int:
    match = _CAMERA.search(Path(filename).stem)
    return int(match.group(1)) if match else -1


def scan_split(folder: Path) -> list[Record]:
    """Records of one split folder holding one sub-folder per identity."""
    if not folder.is_dir():
        raise DataError(f"dataset folder not found: {folder}")
    records = []
    for pid_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for image in sorted(pid_dir.iterdir()):
            if image.suffix.lower() in IMAGE_EXTENSIONS:
                records.append(Record(str(image), pid_dir.name, camera_of(image.name)))
    if not records:
        raise DataError(f"no images found under {folder} (expected {folder}/<pid>/<image>)")
    return records


MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")  # 0002_c1s1_000451_03.jpg: pid 2, camera 1


def detect_format(root: Path) -> str:
    """``market1501`` when ``root`` holds bounding_box_train/, else ``folders``."""
    return "market1501" if (root / "bounding_box_train").is_dir() else "folders"


def scan_market_split(folder: Path, role: str) -> list[Record]:
    """Records of a Market-1501 folder (``pppp_cXsY_...jpg``), as torchreid reads it: junk images
    (pid -1) dropped, distractors (pid 0000) kept; they match no query."""
    if not folder.is_dir():
        raise DataError(f"Market-1501 folder not found: {folder}")
    records = []
    for image in sorted(folder.iterdir()):
        if image.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        match = MARKET_NAME.match(image.name)
        if match is None:
            raise DataError(f"{image}: not a Market-1501 file name (expected pppp_cX..., e.g. 0002_c1s1_000451_03.jpg)")
        pid, camera = int(match.group(1)), int(match.group(2))
        if pid == -1 or (pid == 0 and role != "gallery"):
            continue
        records.append(Record(str(image), f"{pid:04d}", camera))
    if not records:
        raise DataError(f"no images found in {folder}")
    return records


def split_folders(root: Path, split: int) -> tuple[Path, Path]:
    """The query and gallery folders of test split ``split``: prepared trees have query<i>/gallery<i>;
    a plain query/ and gallery/ pair is split 0."""
    numbered = (root / f"query{split}", root / f"gallery{split}")
    if numbered[0].is_dir() or numbered[1].is_dir():
        return numbered
    if split == 0:
        return root / "query", root / "gallery"
    found = available_splits(root)
    raise DataError(f"split: {root} has no query{split}/gallery{split} " + (
        f"(prepared splits: {found[0]}..{found[-1]})" if (root / f"query{found[0]}").is_dir()
        else "(it has one test split: use split 0)"))


def records_digest(records: Sequence[Record], root: str | Path) -> str:
    """A short digest of a set of images (paths relative to ``root``, identities and file sizes):
    equal digests, equal data."""
    import hashlib

    root = Path(root)
    lines = sorted(f"{Path(r.path).relative_to(root)}\t{r.pid}\t{Path(r.path).stat().st_size}" for r in records)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def available_splits(root: str | Path) -> list[int]:
    """The test splits of a dataset folder: 0..N-1 for prepared query<i>/gallery<i> folders, [0]
    for a single query/gallery pair or a Market-1501 folder."""
    root = Path(root)
    numbered = sorted(int(p.name[5:]) for p in root.glob("query*") if p.name[5:].isdigit() and p.is_dir())
    return numbered or [0]


def load_test_split(root: str | Path, split: int, layout: str = "auto") -> tuple[list[Record], list[Record]]:
    """(query, gallery) records of test split ``split``."""
    root = Path(root)
    if (detect_format(root) if layout == "auto" else layout) == "market1501":
        if split != 0:
            raise DataError(f"split: a Market-1501 folder has one test split (0), not {split}")
        return scan_market_split(root / "query", "query"), scan_market_split(root / "bounding_box_test", "gallery")
    query_dir, gallery_dir = split_folders(root, split)
    return scan_split(query_dir), scan_split(gallery_dir)


def load_reid_dataset(root: str | Path, val_identities: float = 0, val_seed: int = 0, split: int = 0,
                      layout: str = "auto") -> ReIDData:
    """Scan ``root/{train,query,gallery}`` (and the validation source) and return a ``ReIDData``.

    ``layout`` ``folders``: one folder per identity under train/, query/ and gallery/ (or the
    prepared query<i>/gallery<i> of test split ``split``); ``market1501``: the Market-1501 folders
    bounding_box_train/, query/ and bounding_box_test/; ``auto`` detects which.

    ``val_identities > 0`` holds out training identities for validation: that many when >= 1,
    that fraction of them when < 1. Each held-out identity gives one image to ``val_gallery`` and
    the rest to ``val_query`` (one gallery image per identity, the hand protocol); an identity
    with one image is a gallery distractor. ``val_seed`` fixes the draw. With ``val_identities``
    0, ``root/val`` is used if present; otherwise there is no validation."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    market = (detect_format(root) if layout == "auto" else layout) == "market1501"
    train = scan_market_split(root / "bounding_box_train", "train") if market else scan_split(root / "train")
    query, gallery = load_test_split(root, split, layout)
    val_query: list[Record] = []
    val_gallery: list[Record] = []
    val_source = "none"
    if val_identities < 0:
        raise DataError(f"val_identities must be >= 0, got {val_identities}")
    if val_identities > 0:
        held = _draw_holdout_pids(sorted({r.pid for r in train}), val_identities, val_seed)
        held_records = [r for r in train if r.pid in held]
        train = [r for r in train if r.pid not in held]
        val_query, val_gallery = _one_gallery_image_per_identity(held_records, val_seed)
        val_source = "holdout"
    elif (root / "val").is_dir():
        val_query, val_gallery = _load_val_folder(root / "val", val_seed, train)
        val_source = "folder"
    if val_source != "none" and not {r.pid for r in val_query} & {r.pid for r in val_gallery}:
        raise DataError(f"validation ({val_source}) has no query identity with a gallery image; nothing to "
                        f"evaluate (held-out identities need at least 2 images)")
    classnames = sorted({r.pid for r in train})
    if len(classnames) < 2:
        raise DataError(f"{root / 'train'} has {len(classnames)} identity; at least 2 are needed")
    return ReIDData(train, query, gallery, classnames, val_query, val_gallery, val_source)


def _draw_holdout_pids(pids: list[str], val_identities: float, seed: int) -> set[str]:
    """The training pids held out for validation: a seeded draw from the sorted pids."""
    if val_identities >= 1:
        if not float(val_identities).is_integer():
            raise DataError(f"val_identities={val_identities}: a count (>= 1) must be a whole number, "
                            f"a fraction must be < 1")
        count = int(val_identities)
    else:
        count = max(1, round(val_identities * len(pids)))
    if len(pids) - count < 2:
        shown = int(val_identities) if val_identities >= 1 else val_identities  # 200, not 200.0
        raise DataError(f"val_identities={shown} holds out {count} of {len(pids)} training identities; "
                        f"at least 2 must remain for training")
    rng = np.random.default_rng(seed)
    return {pids[i] for i in rng.choice(len(pids), size=count, replace=False)}


def _one_gallery_image_per_identity(records: Sequence[Record], seed: int) -> tuple[list[Record], list[Record]]:
    """(query, gallery): one seeded image per identity to the gallery, the others to the query.

    The gallery image is drawn among the identity's images from its least-seen camera: queries
    from the gallery image's own camera have no match once same-camera matches are removed, so
    this keeps the most queries evaluable (without cameras every image is a candidate)."""
    rng = np.random.default_rng(seed)
    by_pid: dict[str, list[Record]] = {}
    for r in records:
        by_pid.setdefault(r.pid, []).append(r)
    query, gallery = [], []
    for pid in sorted(by_pid):
        images = by_pid[pid]
        per_camera = Counter(r.camid for r in images)
        rarest = min(per_camera.values())
        candidates = [i for i, r in enumerate(images) if per_camera[r.camid] == rarest]
        pick = candidates[int(rng.integers(len(candidates)))]
        gallery.append(images[pick])
        query.extend(r for i, r in enumerate(images) if i != pick)
    return query, gallery


def _load_val_folder(folder: Path, seed: int, train: Sequence[Record]) -> tuple[list[Record], list[Record]]:
    """``val/{query,gallery}/<pid>/`` as is; ``val/<pid>/`` split one gallery image per identity;
    or, when every identity in ``val/`` has a single image (the hand protocol's validation set,
    one image per training identity), those images as queries against the other training images
    of their identities (closed-set: it measures fit to seen people)."""
    if (folder / "query").is_dir() or (folder / "gallery").is_dir():
        return scan_split(folder / "query"), scan_split(folder / "gallery")
    records = scan_split(folder)
    if max(Counter(r.pid for r in records).values()) > 1:
        return _one_gallery_image_per_identity(records, seed)
    names = {(r.pid, Path(r.path).name) for r in records}
    pids = {r.pid for r in records}
    return records, [r for r in train if r.pid in pids and (r.pid, Path(r.path).name) not in names]


# ----------------------------------------------------------------------------- transforms

class ReIDTransform:
    """The transforms after ``decode`` (which resizes), on a uint8 (3, H, W) tensor. Train: flip,
    pad + random crop, scale to [0, 1], normalise, random erasing (BoT). Test: scale, normalise.

    They draw the same random numbers, in the same order, and give the same values bit for bit
    as torchvision's PIL pipeline (Resize, RandomHorizontalFlip, Pad, RandomCrop, ToTensor,
    Normalize, RandomErasing(value=0)): a test holds them to it. Written as plain tensor
    operations because torchvision's v2 containers cost about 0.2 ms per image in Python, a
    sixth of the quickstart's step time.

    ``mean``/``std`` must match the backbone's pretraining (the official CLIP-ReID ViT uses 0.5/0.5)."""

    ERASE_SCALE = (0.02, 0.33)  # torchvision's RandomErasing defaults, as BoT and CLIP-ReID use them
    ERASE_RATIO = (0.3, 3.3)

    def __init__(self, image_size: Sequence[int], train: bool, flip_prob: float = 0.5, pad: int = 10,
                 random_erasing: float = 0.5, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.size = (int(image_size[0]), int(image_size[1]))
        self.train, self.flip_prob, self.pad, self.random_erasing = train, flip_prob, int(pad), random_erasing
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self._log_ratio = torch.log(torch.tensor(self.ERASE_RATIO))

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``image`` transformed; training draws from ``generator`` (None: torch's global one)."""
        g = generator
        if self.train:
            if self.flip_prob > 0 and torch.rand(1, generator=g) < self.flip_prob:
                image = image.flip(-1)
            if self.pad > 0:
                image = self._pad_and_crop(image, g)
        x = image.float().div(255).sub_(self.mean).div_(self.std)  # ToTensor, Normalize: the same numbers
        if self.train and self.random_erasing > 0 and torch.rand(1, generator=g) < self.random_erasing:
            self._erase(x, g)
        return x

    def _pad_and_crop(self, image: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        height, width = self.size
        padded = torch.nn.functional.pad(image, (self.pad,) * 4)
        top = int(torch.randint(0, padded.shape[1] - height + 1, size=(1,), generator=g))
        left = int(torch.randint(0, padded.shape[2] - width + 1, size=(1,), generator=g))
        return padded[:, top:top + height, left:left + width]

    def _erase(self, x: torch.Tensor, g: torch.Generator | None) -> None:
        """A rectangle of 2-33% of the area set to 0 (the mean after normalising); ten tries at a
        shape that fits, else nothing (torchvision's rule)."""
        img_h, img_w = x.shape[-2:]
        for _ in range(10):
            area = img_h * img_w * torch.empty(1).uniform_(*self.ERASE_SCALE, generator=g).item()
            aspect = torch.exp(torch.empty(1).uniform_(self._log_ratio[0], self._log_ratio[1], generator=g)).item()
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if h < img_h and w < img_w:
                i = int(torch.randint(0, img_h - h + 1, size=(1,), generator=g))
                j = int(torch.randint(0, img_w - w + 1, size=(1,), generator=g))
                x[..., i:i + h, j:j + w] = 0
                return


def build_transforms(image_size: Sequence[int], train: bool, flip_prob: float = 0.5, pad: int = 10,
                     random_erasing: float = 0.5, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> ReIDTransform:
    """Training (``train``) or test transforms: see ``ReIDTransform``."""
    return ReIDTransform(image_size, train, flip_prob, pad, random_erasing, mean, std)


def decode(path: str, size: Sequence[int]) -> torch.Tensor:
    """An image file as RGB, resized to ``size`` (H, W) with PIL's bicubic filter: uint8 (3, H, W).
    A file that is not a readable image is a DataError naming it."""
    try:
        with Image.open(path) as img:
            image = img.convert("RGB").resize((int(size[1]), int(size[0])), Image.BICUBIC)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


class DecodedImages:
    """Every image of a run decoded and resized once (``decode``), kept in memory as one uint8
    tensor (N, 3, H, W): loaders read pixels instead of files (worker processes share it through
    fork). ``get`` returns the last one built for the same files (path, size, mtime) and size, so
    the trials of a study in one process decode once."""

    _last: tuple[tuple, "DecodedImages"] | None = None
    _lock = threading.Lock()

    def __init__(self, paths: Sequence[str], size: Sequence[int], threads: int | None = None):
        self.index = {path: i for i, path in enumerate(paths)}
        self.images = torch.empty((len(paths), 3, int(size[0]), int(size[1])), dtype=torch.uint8)
        threads = threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(threads) as pool:  # PIL decodes outside the GIL
            for i, image in enumerate(pool.map(lambda path: decode(path, size), paths)):
                self.images[i] = image

    def __getitem__(self, path: str) -> torch.Tensor:
        return self.images[self.index[path]]

    @staticmethod
    def nbytes(count: int, size: Sequence[int]) -> int:
        return count * 3 * int(size[0]) * int(size[1])

    @classmethod
    def get(cls, paths: Sequence[str], size: Sequence[int]) -> "DecodedImages":
        paths = list(dict.fromkeys(paths))
        stats = []
        for path in paths:
            try:
                info = os.stat(path)
            except OSError as err:
                raise DataError(f"cannot read image {path}: {err.strerror}") from None
            stats.append((path, info.st_size, info.st_mtime_ns))
        key = (tuple(stats), tuple(int(s) for s in size))
        with cls._lock:
            if cls._last is None or cls._last[0] != key:
                cls._last = None  # free the previous images before decoding the next ones
                cls._last = (key, cls(paths, size))
            return cls._last[1]


class ImageDataset(Dataset):
    """(image tensor, label, camid, index) for each record; label is -1 for unknown pids. Images
    come from ``images`` (a DecodedImages) when given, else are decoded (and resized to
    ``size``) on every read."""

    def __init__(self, records: Sequence[Record], transform, class_to_idx: dict[str, int] | None = None,
                 size: Sequence[int] = (256, 128), images: DecodedImages | None = None):
        self.records = list(records)
        self.transform = transform
        self.labels = [(class_to_idx or {}).get(r.pid, -1) for r in self.records]
        self.size, self.images = tuple(size), images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]):
        """``item`` is an index, or (index, seed) from ``SeededBatches``: the transform then draws
        from a generator seeded with it."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        record = self.records[index]
        image = self.images[record.path] if self.images is not None else decode(record.path, self.size)
        draws = None if seed is None else torch.Generator().manual_seed(seed)
        return self.transform(image, draws), self.labels[index], record.camid, index


class IdentitySampler(Sampler[list[int]]):
    """Batches of P identities x K images (``num_instances``), as batch-hard triplet loss needs.

    Each epoch every identity's images are shuffled and cut into groups of K (identities with
    fewer than K images are sampled with replacement); batches draw P identities at random among
    those with groups left. Deterministic for (seed, epoch): call ``set_epoch`` each epoch.

    With ``ranks`` > 1 (DDP) every rank draws the same global batches and yields its share of
    each: identities ``which * P / ranks`` up to the next rank's, all K images of each.

    ``len()`` is the number of batches this epoch really yields (the draw stops early when fewer
    than P identities have groups left), so per-epoch means divide by the right count; it runs
    the epoch's draw once (index arithmetic only) and caches it."""

    def __init__(self, labels: Sequence[int], batch_size: int, num_instances: int, seed: int = 0,
                 ranks: int = 1, which: int = 0):
        self.labels = np.asarray(labels)
        self.ranks, self.which = ranks, which
        self.num_instances = num_instances
        self.num_ids_per_batch = batch_size // num_instances
        self.seed, self.epoch = seed, 0
        self.index_by_id = {pid: np.flatnonzero(self.labels == pid) for pid in np.unique(self.labels)}
        if len(self.index_by_id) < self.num_ids_per_batch:
            raise DataError(f"batch_size {batch_size} needs {self.num_ids_per_batch} identities per batch but the "
                            f"training set has {len(self.index_by_id)}; lower batch_size")
        if self.num_ids_per_batch % ranks:
            raise DataError(f"batch_size {batch_size} holds {self.num_ids_per_batch} identities of num_instances "
                            f"{num_instances} images, which {ranks} processes cannot share equally; make "
                            f"batch_size / num_instances a multiple of {ranks}")
        groups = sum(max(1, len(ix) // num_instances) for ix in self.index_by_id.values())
        self._max_batches = groups // self.num_ids_per_batch
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._epoch_batches())

    def __iter__(self):
        if self.ranks == 1:
            yield from self._epoch_batches()
            return
        share = len(self._epoch_batches()[0]) // self.ranks if self._epoch_batches() else 0
        for batch in self._epoch_batches():  # this rank's identities of each global batch
            yield batch[self.which * share:(self.which + 1) * share]

    def _epoch_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, list(self._draw(self.epoch)))
        return self._cache[1]

    def _draw(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        k = self.num_instances
        groups: dict[int, list[np.ndarray]] = {}
        for pid, ix in self.index_by_id.items():
            ix = rng.choice(ix, size=k, replace=True) if len(ix) < k else rng.permutation(ix)
            groups[pid] = [ix[i:i + k] for i in range(0, len(ix) - k + 1, k)]
        available = [pid for pid in groups if groups[pid]]
        for _ in range(self._max_batches):
            if len(available) < self.num_ids_per_batch:
                break
            chosen = rng.choice(len(available), size=self.num_ids_per_batch, replace=False)
            batch = []
            for pos in chosen:
                batch.extend(groups[available[pos]].pop().tolist())
            available = [pid for pid in available if groups[pid]]
            yield batch


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """``sampler``'s batches, each image paired with the seed of its augmentation: the seeds of
    an epoch come from (``seed``, epoch) in the order of the global batches, and every image
    draws its flip, crop and erasing from a generator of its own seeded with its seed.

    So an image's augmentation depends on where the sampler put it, not on which process
    transforms it: every ``num_workers`` gives the same batches bit for bit, a resumed run the
    same epochs as an uninterrupted one, and DDP ranks (each yielding its share of a global
    batch) the images a single process would make."""

    STREAM = 0xA06  # keeps these draws apart from the sampler's own ((seed, epoch))

    def __init__(self, sampler: IdentitySampler, seed: int):
        self.sampler, self.seed = sampler, seed

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        sampler = self.sampler
        rng = np.random.default_rng([self.seed, sampler.epoch, self.STREAM])
        size = sampler.num_ids_per_batch * sampler.num_instances  # a global batch
        for batch in sampler:
            seeds = rng.integers(0, 2**63, size=size) & 0xFFFFFFFF  # a CPU generator keeps 32 bits of its seed
            offset = sampler.which * len(batch) if sampler.ranks > 1 else 0
            yield [(index, int(s)) for index, s in zip(batch, seeds[offset:offset + len(batch)])]


def loader_workers(setting: int | str, *, on_gpu: bool, sharing: int = 1) -> int:
    """DataLoader worker processes for ``num_workers`` ``setting``: a count as it is; ``auto``
    on a GPU from the cores this run may use (its share among ``sharing`` runs side by side, and
    among DDP ranks: ``LOCAL_WORLD_SIZE``), one left to the training loop, at most 8, at least 1.
    On the CPU ``auto`` is 0: the model computes on the cores a worker would take (with images
    in memory the transforms cost about 5% of a step, BENCHMARKS.md "Data pipeline"; ``workbench
    eval`` of the quickstart took 7.5-7.6 s with one worker against 7.0-7.2 s with none). The
    count never changes the numbers (``SeededBatches``)."""
    if setting != "auto":
        return int(setting)
    if not on_gpu:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // max(1, sharing) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, share - 1))


@dataclass
class Loaders:
    """Everything the stages need from the data."""

    train: DataLoader  # PK batches, training transforms
    train_eval: DataLoader  # every training image once, test transforms (feature caching)
    query: DataLoader
    gallery: DataLoader
    data: ReIDData
    sampler: IdentitySampler
    val_query: DataLoader | None = None  # None without validation; test transforms like query/gallery
    val_gallery: DataLoader | None = None


def test_loader(records: Sequence[Record], *, image_size: Sequence[int], batch_size: int,
                num_workers: int | str = 0, pixel_mean: Sequence[float] = CLIP_MEAN,
                pixel_std: Sequence[float] = CLIP_STD, pin_memory: bool = False) -> DataLoader:
    """The images of ``records`` in order, with test transforms (for feature extraction), each
    decoded when read; ``pin_memory`` for a GPU."""
    workers = loader_workers(num_workers, on_gpu=pin_memory)
    return DataLoader(ImageDataset(records, build_transforms(image_size, False, mean=pixel_mean, std=pixel_std),
                                   size=image_size),
                      batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)


def build_loaders(data: ReIDData, *, image_size: Sequence[int], batch_size: int, num_instances: int,
                  test_batch_size: int, num_workers: int | str, seed: int, flip_prob: float = 0.5, pad: int = 10,
                  random_erasing: float = 0.5, pin_memory: bool = False,
                  pixel_mean: Sequence[float] = CLIP_MEAN, pixel_std: Sequence[float] = CLIP_STD,
                  cache_images: bool = False, log: Callable[[str], None] | None = None,
                  shard: tuple[int, int] = (1, 0)) -> Loaders:
    """Train (PK batches), train_eval, query, gallery and, when ``data.has_validation``, val loaders.
    ``shard`` = (ranks, this rank) under DDP: the training batches are this rank's share of each
    global batch, and the other loaders read this rank's contiguous share of their images.
    With ``cache_images`` every image is decoded once (``DecodedImages``) unless they would take
    more than half of the memory available, which ``log`` then says. ``num_workers``: a count
    or ``auto`` (``loader_workers``; ``pin_memory`` means a GPU); training augmentation is
    seeded per image (``SeededBatches``), so the count never changes the numbers."""
    images = None
    if cache_images:
        paths = list(dict.fromkeys(r.path for r in [*data.train, *data.query, *data.gallery, *data.val_query,
                                                    *data.val_gallery]))
        need = DecodedImages.nbytes(len(paths), image_size)
        available = _available_memory()
        if available is not None and need > available // 2:
            if log is not None:
                log(f"cache_images: {len(paths)} images need {need / 2**30:.1f} GiB, more than half of the "
                    f"{available / 2**30:.1f} GiB available; decoding them on every read instead")
        else:
            started = time.perf_counter()
            images = DecodedImages.get(paths, image_size)
            if log is not None:
                log(f"images: {len(paths)} decoded and resized once ({need / 2**20:.0f} MiB in memory, "
                    f"{time.perf_counter() - started:.1f}s)")
    train_tf = build_transforms(image_size, True, flip_prob, pad, random_erasing, pixel_mean, pixel_std)
    test_tf = build_transforms(image_size, False, mean=pixel_mean, std=pixel_std)
    index = data.class_to_idx
    ranks, which = shard
    sampler = IdentitySampler(data.train_labels, batch_size, num_instances, seed, ranks, which)
    workers = loader_workers(num_workers, on_gpu=pin_memory)
    if num_workers == "auto" and log is not None:
        log(f"num_workers auto: {workers} loader worker process{'' if workers == 1 else 'es'}")
    common = dict(num_workers=workers, pin_memory=pin_memory)

    # Every DataLoader iterator draws a seed for its workers; from a generator of its own, so that
    # whether a loader runs (features cached or not) never shifts the global RNG of training.
    # Workers stay up between epochs for the loaders read every epoch (training, the selection
    # split); the others (features, the test split) read once or twice and let theirs go.
    def plain(records, labels, every_epoch=False):
        dataset = ImageDataset(records, test_tf, labels, image_size, images)
        order = dict(sampler=ShardSampler(len(dataset), ranks, which)) if ranks > 1 else dict(shuffle=False)
        return DataLoader(dataset, batch_size=test_batch_size, **order, persistent_workers=every_epoch and workers > 0,
                          generator=torch.Generator().manual_seed(seed), **common)

    train = DataLoader(ImageDataset(data.train, train_tf, index, image_size, images),
                       batch_sampler=SeededBatches(sampler, seed), generator=torch.Generator().manual_seed(seed),
                       persistent_workers=workers > 0, **common)
    val = data.has_validation
    return Loaders(train=train, train_eval=plain(data.train, index), query=plain(data.query, None, not val),
                   gallery=plain(data.gallery, None, not val), data=data, sampler=sampler,  # selection without val
                   val_query=plain(data.val_query, None, every_epoch=True) if val else None,
                   val_gallery=plain(data.val_gallery, None, every_epoch=True) if val else None)


def _available_memory() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


# ----------------------------------------------------------------------------- synthetic data

SKIN_TONES = np.array([[224, 172, 140], [198, 134, 100], [160, 110, 80], [236, 192, 160], [120, 80, 60]], float)
MARK_COLOURS = np.array([[40, 40, 40], [200, 30, 30], [30, 60, 200], [30, 150, 60], [230, 200, 40],
                         [150, 40, 160]], float)
CAMERA_CASTS = np.array([[1.0, 1.0, 1.0], [1.08, 0.98, 0.92], [0.92, 0.98, 1.08], [1.0, 1.06, 0.94]])


def _identity(rng: np.random.Generator) -> dict:
    """The fixed appearance of one synthetic hand: shape, skin tone and distinctive marks."""
    return {
        "skin": SKIN_TONES[rng.integers(len(SKIN_TONES))] + rng.normal(0, 8, 3),
        "finger_len": rng.uniform(0.55, 1.0, 5),
        "finger_w": rng.uniform(0.09, 0.15),
        "palm": (rng.uniform(0.36, 0.48), rng.uniform(0.32, 0.44)),
        "spread": rng.uniform(0.12, 0.3),
        # marks: (finger index or -1 for the palm, position along it, colour index, radius)
        "marks": [(int(rng.integers(-1, 5)), rng.uniform(0.2, 0.9), int(rng.integers(len(MARK_COLOURS))),
                   rng.uniform(0.035, 0.06)) for _ in range(int(rng.integers(2, 4)))],
        "band": (int(rng.integers(0, 5)), int(rng.integers(len(MARK_COLOURS)))),  # a ring
        "tattoo": (int(rng.integers(3)), rng.uniform(30, 250, 3), rng.uniform(-0.15, 0.15, 2)),  # shape, colour, offset
        "nails": rng.uniform(40, 240, 3),
    }


def render_hand(ident: dict, rng: np.random.Generator, camera: int, size: tuple[int, int] = (128, 64)) -> Image.Image:
    """One view of a synthetic hand: the identity's shape and marks under a random pose, scale,
    position, background, camera colour cast, brightness and noise."""
    h, w = size
    scale = 2  # draw large, then downsample: anti-aliased edges
    H, W = h * scale, w * scale
    bg = rng.uniform(40, 220, 3)
    img = Image.new("RGB", (W, H), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(img)
    # background clutter independent of identity
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.uniform(0, W), rng.uniform(0, H)
        r = rng.uniform(5, 25) * scale
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=tuple(int(c) for c in rng.uniform(30, 230, 3)))
    unit = W * rng.uniform(0.76, 0.84)
    cx, cy = W / 2 + rng.normal(0, 0.02) * W, H * 0.66 + rng.normal(0, 0.02) * H
    angle = rng.normal(0, 0.07)
    skin = np.clip(ident["skin"] * rng.uniform(0.9, 1.1), 0, 255)
    pw, ph = ident["palm"][0] * unit, ident["palm"][1] * unit
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def to_img(x, y):
        vx, vy = rot @ np.array([x, y])
        return cx + vx, cy + vy

    palm_poly = [to_img(pw * math.cos(t), ph * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 32)]
    draw.polygon(palm_poly, fill=tuple(int(c) for c in skin))
    shape, colour, (ox, oy) = ident["tattoo"]
    tx0, ty0 = to_img(ox * pw, oy * ph)
    r = 0.55 * min(pw, ph)
    fill = tuple(int(c) for c in colour)
    if shape == 0:
        draw.ellipse([tx0 - r, ty0 - r, tx0 + r, ty0 + r], fill=fill)
    elif shape == 1:
        draw.polygon([to_img(ox * pw + dx * r, oy * ph + dy * r) for dx, dy in ((-1, -1), (1, -1), (1, 1), (-1, 1))], fill=fill)
    else:
        draw.polygon([to_img(ox * pw + dx * r, oy * ph + dy * r) for dx, dy in ((0, -1.2), (1.1, 0.9), (-1.1, 0.9))], fill=fill)
    finger_w = ident["finger_w"] * unit
    tips = []
    for i in range(5):
        spread = ident["spread"] + rng.normal(0, 0.03)
        theta = -math.pi / 2 + (i - 2) * spread + (0.5 if i == 0 else 0)
        base = (pw * 0.8 * math.cos(theta), ph * 0.9 * math.sin(theta))
        length = ident["finger_len"][i] * unit * (0.55 if i == 0 else 0.7)
        tip = (base[0] + length * math.cos(theta), base[1] + length * math.sin(theta))
        draw.line([to_img(*base), to_img(*tip)], fill=tuple(int(c) for c in skin), width=int(finger_w))
        r = finger_w / 2
        tx, ty = to_img(*tip)
        draw.ellipse([tx - r, ty - r, tx + r, ty + r], fill=tuple(int(c) for c in ident["nails"]))
        tips.append((base, tip))
    band_finger, band_colour = ident["band"]
    (bx, by), (tx_, ty_) = tips[band_finger]
    p, q = to_img(bx + 0.35 * (tx_ - bx), by + 0.35 * (ty_ - by)), to_img(bx + 0.45 * (tx_ - bx), by + 0.45 * (ty_ - by))
    draw.line([p, q], fill=tuple(int(c) for c in MARK_COLOURS[band_colour]), width=int(finger_w))
    for where, pos, colour, radius in ident["marks"]:
        if where < 0:
            mx, my = to_img((pos - 0.55) * pw * 1.2, (pos - 0.5) * ph * 0.8)
        else:
            (bx, by), (tx_, ty_) = tips[where]
            mx, my = to_img(bx + pos * (tx_ - bx), by + pos * (ty_ - by))
        r = radius * unit * 0.6
        draw.ellipse([mx - r, my - r, mx + r, my + r], fill=tuple(int(c) for c in MARK_COLOURS[colour]))
    img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, 1.5))).resize((w, h), Image.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels * CAMERA_CASTS[camera % len(CAMERA_CASTS)] * rng.uniform(0.9, 1.1)
    pixels += rng.normal(0, rng.uniform(2, 10), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


SYNTHETIC_SETTINGS = "synthetic.json"  # what synthesize_dataset was asked for, beside the splits


def synthetic_settings(root: str | Path) -> dict | None:
    """The settings a synthetic dataset was made with, or None (not synthetic, or made before
    they were written down)."""
    path = Path(root) / SYNTHETIC_SETTINGS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def synthesize_dataset(out: str | Path, identities: int = 60, images_per_identity: int = 8, seed: int = 0,
                       size: tuple[int, int] = (128, 64), test_identities: int | None = None) -> Path:
    """Write a synthetic hand ReID dataset in the folder layout and return its root.

    ``identities`` training identities and ``test_identities`` (default: as many) disjoint test
    identities; each training
    identity gets ``images_per_identity`` images from cameras 1-3; each test identity gets 2
    query images from camera 1 and ``images_per_identity`` gallery images from cameras 2-3.
    The same arguments always give the same images. Written to a temporary folder first, so an
    interrupted run never leaves a half-made dataset."""
    import shutil

    out = Path(out)
    if identities < 2 or images_per_identity < 2:
        raise UsageError(f"synthetic data needs at least 2 identities and 2 images per identity, got {identities} "
                         f"identities of {images_per_identity} images")
    if min(size) < 16:
        raise UsageError(f"synthetic images need a height and width of at least 16 pixels, got {size[0]}x{size[1]}")
    if out.exists():
        raise UsageError(f"{out} already exists; remove it or choose another folder")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"cannot create {out}: {blocking} is a file")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    rng = np.random.default_rng(seed)
    test_identities = identities if test_identities is None else test_identities
    if test_identities < 1:
        raise UsageError("synthetic data needs at least 1 test identity")
    people = [_identity(rng) for _ in range(identities + test_identities)]
    try:
        for number, ident in enumerate(people):
            pid = f"{number + 1:04d}"
            views = ([("train", 1 + i % 3) for i in range(images_per_identity)] if number < identities else
                     [("query", 1)] * 2 + [("gallery", 2 + i % 2) for i in range(images_per_identity)])
            view_rng = np.random.default_rng([seed, number])
            for i, (split, camera) in enumerate(views):
                folder = tmp / split / pid
                folder.mkdir(parents=True, exist_ok=True)
                render_hand(ident, view_rng, camera, size).save(folder / f"{pid}_c{camera}_{i:03d}.png")
        settings = {"identities": identities, "images_per_identity": images_per_identity,
                    "test_identities": test_identities, "seed": seed, "size": list(size)}
        (tmp / SYNTHETIC_SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")
    except BaseException:  # interrupted or out of space: no half-made dataset stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # made meanwhile by another process
        shutil.rmtree(tmp)
        raise DataError(f"{out} already exists; remove it or choose another folder")
    tmp.rename(out)
    return out
