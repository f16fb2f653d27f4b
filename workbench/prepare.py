"""Prepare the real hand datasets, 11k Hands and HD, as workbench ReID folder trees.

Neither download ships a ReID split. This module writes the split of the original hand ReID
work (Baisa et al., ``prepare_train_val_test_11k_r_l.py`` and ``..._HD.py``), but seeded, so the
same seed gives the same tree (the original drew unseeded).

11k Hands (``src/Hands/Hand_0000002.jpg`` ... and ``src/HandInfo.csv``), per aspect ``dorsal_r``,
``dorsal_l``, ``palmar_r``, ``palmar_l`` (the CSV's aspectOfHand "dorsal right", ...):

1. images with accessories (``accessories == 1``) are left out;
2. the identities that remain, sorted by id, are split in halves: the first ceil(n/2) train, the
   rest test. On the full download this gives the published counts: dorsal right 143 identities
   -> 72 train / 71 test, dorsal left 146 -> 73/73, palmar right 143 -> 72/71, palmar left
   151 -> 76/75;
3. ``val`` holds one random image of each training identity with more than one image, left out
   of ``train`` as in the original's ``train`` folder (its ``train_all`` kept every image). The
   identities are the training ones, so this validation measures how well seen people are
   recognised on unseen images, not re-identification of new people: for model selection prefer
   ``val_identities`` (identities held out of training), which the experiments use;
4. for each split i < ``splits`` (10 Monte Carlo runs by default), one random image of each test
   identity goes to ``gallery<i>`` and its other images to ``query<i>``. A test identity with one
   image is then a gallery identity without queries.

HD, Hong Kong PolyU hand dorsal (``src/1-501/<id>_<n>.jpg`` and ``src/502-712/<id>_<n>.jpg``; in
the download ``src`` is ``HD/Original Images``), one aspect ``dorsal``: the subjects of ``1-501``
are split as in steps 2-4 by numeric id; every image of ``502-712`` joins every gallery as a
distractor, its id plus 1000 (502 -> 1502) so that it never matches a query.

Output, per aspect: ``out/<aspect>/{train,val,query0..,gallery0..}/<pid>/<original file name>``
(pids: 7 digits for 11k as in the CSV, 4 for HD: 0001, distractors 1502), plus ``manifest.csv``
(one row per placed image), ``summary.csv`` (identities and images per role) and ``prepare.json``
(dataset, seed, splits, rule, counts, workbench version). Files are hard links to the download by
default (ten splits would otherwise copy the test images ten times); where a link is impossible
(another device) they are copied, with a note. Each aspect is built in ``<aspect>.partial`` and
renamed when complete; an existing ``out/<aspect>`` is refused before any work.

Randomness: each draw has its own stream, ``numpy.random.default_rng([seed, crc32(aspect),
stream])`` with stream 0 for ``val`` and i + 1 for split i, so an aspect's tree does not depend on
which other aspects or how many splits were prepared with it.

To test on split i the loader reads ``query<i>``/``gallery<i>`` in place of ``query``/``gallery``
(``load_reid_dataset(root, split=i)``, the ``split`` config key); a plain
``root/{train,query,gallery}`` view made of symbolic links works with any loader.
"""
from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from workbench import __version__

from .data import IMAGE_EXTENSIONS
from .errors import DataError, ResourceError, UsageError, os_error_message

ASPECTS_11K = ("dorsal_r", "dorsal_l", "palmar_r", "palmar_l")
ASPECT_HD = "dorsal"
ASPECT_OF_HAND = {"dorsal right": "dorsal_r", "dorsal left": "dorsal_l", "palmar right": "palmar_r",
                  "palmar left": "palmar_l"}  # HandInfo.csv's aspectOfHand -> short name
HANDINFO_COLUMNS = ("id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand", "imageName",
                    "irregularities")
NEEDED_COLUMNS = ("id", "accessories", "aspectOfHand", "imageName")
HD_SUBJECTS, HD_DISTRACTORS = "1-501", "502-712"
DISTRACTOR_OFFSET = 1000
MANIFEST_COLUMNS = ("image", "source", "pid", "aspect", "role", "distractor")
SUMMARY_COLUMNS = ("role", "identities", "images", "distractors")
MODES = ("link", "copy")
RULE = ("identities sorted, the first ceil(n/2) train and the rest test; val: one random image per training "
        "identity with more than one, left out of train; split i: one random image per test identity in gallery<i>, the rest in "
        "query<i>")
# A hard link is impossible across devices and on some file systems; then copy instead.
_LINK_REFUSED = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}

Log = Callable[[str], None]


@dataclass(frozen=True)
class SourceImage:
    """One image of a download: its path relative to the download folder and its identity."""

    source: str  # POSIX path relative to src
    pid: str
    distractor: bool = False


# ----------------------------------------------------------------------------- the split

def split_identities(pids: Iterable[str]) -> tuple[list[str], list[str]]:
    """(train, test): the distinct pids sorted, the first ceil(n/2) for training, the rest for test."""
    ordered = sorted(set(pids))
    half = math.ceil(len(ordered) / 2)
    return ordered[:half], ordered[half:]


def roles(splits: int) -> list[str]:
    """The roles in output order: train, val, query0, gallery0, query1, gallery1, ..."""
    return ["train", "val"] + [f"{kind}{i}" for i in range(splits) for kind in ("query", "gallery")]


def assign_roles(images: Sequence[SourceImage], aspect: str, splits: int, seed: int,
                 distractors: Sequence[SourceImage] = ()) -> list[dict]:
    """The manifest rows of one aspect: each image placed in train, val and query<i>/gallery<i>
    as the module docstring says, ``distractors`` in every gallery; sorted by role, then path."""
    by_pid: dict[str, list[SourceImage]] = defaultdict(list)
    for image in sorted(images, key=lambda im: im.source):
        by_pid[image.pid].append(image)
    train_pids, test_pids = split_identities(by_pid)
    val_rng = _rng(seed, aspect, 0)
    rows = []
    for pid in train_pids:
        pick = int(val_rng.integers(len(by_pid[pid]))) if len(by_pid[pid]) > 1 else -1
        rows += [_row(image, aspect, "val" if k == pick else "train") for k, image in enumerate(by_pid[pid])]
    for i in range(splits):
        rng = _rng(seed, aspect, i + 1)
        for pid in test_pids:
            pick = int(rng.integers(len(by_pid[pid])))
            rows += [_row(image, aspect, f"gallery{i}" if k == pick else f"query{i}")
                     for k, image in enumerate(by_pid[pid])]
        rows += [_row(image, aspect, f"gallery{i}") for image in distractors]
    order = {role: k for k, role in enumerate(roles(splits))}
    return sorted(rows, key=lambda row: (order[row["role"]], row["image"]))


def _rng(seed: int, aspect: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(aspect.encode()), stream])


def _row(image: SourceImage, aspect: str, role: str) -> dict:
    name = image.source.rsplit("/", 1)[-1]
    return {"image": f"{role}/{image.pid}/{name}", "source": image.source, "pid": image.pid, "aspect": aspect,
            "role": role, "distractor": int(image.distractor)}


def summarize(rows: Sequence[dict], splits: int) -> list[dict]:
    """Per role, in output order: identities, images, and how many identities are distractors."""
    pids, images, distractors = defaultdict(set), defaultdict(int), defaultdict(set)
    for row in rows:
        pids[row["role"]].add(row["pid"])
        images[row["role"]] += 1
        if row["distractor"]:
            distractors[row["role"]].add(row["pid"])
    return [{"role": role, "identities": len(pids[role]), "images": images[role],
             "distractors": len(distractors[role])} for role in roles(splits)]


def format_summary(rows: Sequence[dict]) -> str:
    """Summary rows as an aligned text table, header first: the first column left-aligned, the others right."""
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [columns] + [[str(row[column]) for column in columns] for row in rows]
    widths = [max(len(line[k]) for line in cells) for k in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) if k == 0 else cell.rjust(width)
                               for k, (cell, width) in enumerate(zip(line, widths))) for line in cells)


# ----------------------------------------------------------------------------- 11k Hands

def prepare_11k(src: str | Path, out: str | Path, aspects: Sequence[str] | str = ASPECTS_11K, splits: int = 10,
                seed: int = 0, mode: str = "link", log: Log = print) -> dict[str, list[dict]]:
    """Write ``out/<aspect>`` for each 11k Hands aspect (module docstring) from the download in ``src``
    and return each aspect's summary rows. ``aspects`` may be a comma-separated string.

    Every check (arguments, existing output, CSV, listed images, identity counts) runs before
    anything is written."""
    src, out = Path(src), Path(out)
    aspects = _check_aspects(aspects)
    _check_options(splits, seed, mode)
    _refuse_existing(out, aspects)
    images, excluded = _hand_images(src, aspects)
    plans = {}
    for aspect in aspects:
        pids = {image.pid for image in images[aspect]}
        if len(pids) < 2:
            raise DataError(f"11k aspect {aspect} has {_count(len(pids), 'identity', 'identities')} without "
                            f"accessories; at least 2 are needed (one to train, one to test)")
        train, test = split_identities(pids)
        log(f"{aspect}: {len(images[aspect])} images of {len(pids)} identities ({len(train)} train, {len(test)} "
            f"test); {_count(excluded[aspect], 'image', 'images')} with accessories left out")
        plans[aspect] = assign_roles(images[aspect], aspect, splits, seed)
    meta = {"dataset": "11k Hands", "seed": seed, "splits": splits, "rule": "per aspect: images with accessories "
            "left out; " + RULE, "source": str(src.resolve())}
    return {aspect: _write_aspect(src, out, aspect, plans[aspect], splits, mode, log,
                                  {**meta, "excluded_with_accessories": excluded[aspect]}) for aspect in aspects}


def read_handinfo(path: str | Path) -> list[dict[str, str]]:
    """The rows of ``HandInfo.csv`` as stripped strings (ids keep their zero padding).

    Raises ``DataError`` naming any of the needed columns (id, accessories, aspectOfHand,
    imageName) that is missing."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in NEEDED_COLUMNS if name not in columns]
            if missing:
                raise DataError(f"{path} has no column {', '.join(missing)} (its columns: "
                                f"{', '.join(columns) or 'none'})")
            return [{key.strip(): (value or "").strip() for key, value in row.items() if key is not None}
                    for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path} is not a readable CSV file: {err}") from err


def _hand_images(src: Path, aspects: Sequence[str]) -> tuple[dict[str, list[SourceImage]], dict[str, int]]:
    """(images, excluded): the images without accessories and the count left out, per wanted aspect."""
    if not src.is_dir():
        raise UsageError(f"11k Hands download not found: {src} (expected {src}/Hands/ and {src}/HandInfo.csv)")
    hands, info = src / "Hands", src / "HandInfo.csv"
    if not hands.is_dir():
        raise DataError(f"{hands} not found: unpack Hands.zip of the 11k Hands download there")
    if not info.is_file():
        raise DataError(f"{info} not found: put the 11k Hands HandInfo.csv next to {hands}")
    images: dict[str, list[SourceImage]] = {aspect: [] for aspect in aspects}
    excluded = dict.fromkeys(aspects, 0)
    seen: set[str] = set()
    for line, row in enumerate(read_handinfo(info), start=2):
        aspect = ASPECT_OF_HAND.get(row["aspectOfHand"].lower())
        if aspect is None:
            raise DataError(f"{info} line {line}: unknown aspectOfHand {row['aspectOfHand']!r} (known: "
                            f"{', '.join(ASPECT_OF_HAND)})")
        if row["accessories"] not in ("0", "1"):
            raise DataError(f"{info} line {line}: accessories is {row['accessories']!r}, expected 0 or 1")
        if not row["id"].isdigit():
            raise DataError(f"{info} line {line}: id {row['id']!r} is not a number")
        if row["imageName"] in seen:
            raise DataError(f"{info} line {line}: {row['imageName']} is listed twice")
        seen.add(row["imageName"])
        if aspect not in images:
            continue
        if row["accessories"] == "1":
            excluded[aspect] += 1
            continue
        # zfill restores the padding a spreadsheet round trip strips ("2" -> "0000002")
        images[aspect].append(SourceImage(f"Hands/{row['imageName']}", row["id"].zfill(7)))
    missing = [image.source for aspect in aspects for image in images[aspect] if not (src / image.source).is_file()]
    if missing:
        shown = ", ".join(name.split("/")[-1] for name in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(f"{_count(len(missing), 'image', 'images')} listed in {info.name} missing from {hands}: "
                        f"{shown}")
    return images, excluded


def _check_aspects(aspects: Sequence[str] | str) -> list[str]:
    names = aspects.split(",") if isinstance(aspects, str) else list(aspects)
    names = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    unknown = [name for name in names if name not in ASPECTS_11K]
    if unknown or not names:
        what = f"unknown 11k aspect {', '.join(unknown)}" if unknown else "no 11k aspect given"
        raise UsageError(f"{what}; known aspects: {', '.join(ASPECTS_11K)}")
    return names


# ----------------------------------------------------------------------------- HD

def prepare_hd(src: str | Path, out: str | Path, splits: int = 10, seed: int = 0, mode: str = "link",
               log: Log = print) -> dict[str, list[dict]]:
    """Write ``out/dorsal`` from the HD download in ``src`` (the folder holding ``1-501/`` and
    ``502-712/``) and return ``{"dorsal": summary rows}``; the split is the module docstring's."""
    src, out = Path(src), Path(out)
    _check_options(splits, seed, mode)
    _refuse_existing(out, [ASPECT_HD])
    if not src.is_dir():
        raise UsageError(f"HD download not found: {src} (expected {src}/{HD_SUBJECTS}/ and {src}/{HD_DISTRACTORS}/)")
    for name in (HD_SUBJECTS, HD_DISTRACTORS):
        if not (src / name).is_dir():
            raise DataError(f"{src / name} not found: the HD download holds {HD_SUBJECTS}/ and {HD_DISTRACTORS}/ "
                            f"(in 'HD/Original Images')")
    subjects = _hd_images(src, HD_SUBJECTS, distractor=False)
    distractors = _hd_images(src, HD_DISTRACTORS, distractor=True)
    pids = {image.pid for image in subjects}
    clash = pids & {image.pid for image in distractors}
    if clash:
        raise DataError(f"HD subject ids {', '.join(sorted(clash)[:3])} of {HD_SUBJECTS} equal distractor ids "
                        f"({HD_DISTRACTORS} + {DISTRACTOR_OFFSET})")
    if len(pids) < 2:
        raise DataError(f"{src / HD_SUBJECTS} has {_count(len(pids), 'subject', 'subjects')}; at least 2 are "
                        f"needed (one to train, one to test)")
    train, test = split_identities(pids)
    distractor_pids = {image.pid for image in distractors}
    log(f"{ASPECT_HD}: {len(subjects)} images of {len(pids)} subjects ({len(train)} train, {len(test)} test); "
        f"{len(distractors)} images of {len(distractor_pids)} distractor subjects in every gallery")
    rows = assign_roles(subjects, ASPECT_HD, splits, seed, distractors)
    meta = {"dataset": "HD", "seed": seed, "splits": splits,
            "rule": RULE + f"; every image of {HD_DISTRACTORS} in every gallery, id + {DISTRACTOR_OFFSET}",
            "source": str(src.resolve()), "distractor_identities": len(distractor_pids),
            "distractor_images": len(distractors)}
    return {ASPECT_HD: _write_aspect(src, out, ASPECT_HD, rows, splits, mode, log, meta)}


def _hd_images(src: Path, folder: str, distractor: bool) -> list[SourceImage]:
    """The images of one HD folder; the id is the number before the first '_' of the file name,
    plus ``DISTRACTOR_OFFSET`` for distractors."""
    images = []
    for path in sorted((src / folder).iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        head, _, rest = path.stem.partition("_")
        if not head.isdigit() or not rest:
            raise DataError(f"{path}: HD image names are <id>_<n>.jpg (e.g. 1_1.jpg)")
        number = int(head) + (DISTRACTOR_OFFSET if distractor else 0)
        images.append(SourceImage(f"{folder}/{path.name}", f"{number:04d}", distractor))
    if not images:
        raise DataError(f"no images in {src / folder} (expected <id>_<n>.jpg)")
    return images


# ----------------------------------------------------------------------------- writing

def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _check_options(splits: int, seed: int, mode: str) -> None:
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise UsageError(f"splits must be a whole number >= 1, got {splits!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a whole number >= 0, got {seed!r}")
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def _refuse_existing(out: Path, aspects: Iterable[str]) -> None:
    taken = [str(out / aspect) for aspect in aspects if (out / aspect).exists()]
    if taken:
        raise DataError(f"{', '.join(taken)} already exists; remove it or choose another --out")


def _write_aspect(src: Path, out: Path, aspect: str, rows: list[dict], splits: int, mode: str, log: Log,
                  meta: dict) -> list[dict]:
    """Place the files and write manifest.csv, summary.csv and prepare.json in ``out/<aspect>.partial``,
    then rename it to ``out/<aspect>``; returns the summary rows. Nothing stays behind on failure."""
    final, partial = out / aspect, out / f"{aspect}.partial"
    summary = summarize(rows, splits)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by an interrupted run
            shutil.rmtree(partial)
        used = _place_files(src, partial, rows, mode, log)
        _write_csv(partial / "manifest.csv", MANIFEST_COLUMNS, rows)
        _write_csv(partial / "summary.csv", SUMMARY_COLUMNS, summary)
        record = {**meta, "aspect": aspect, "mode": used, "counts": summary, "workbench_version": __version__}
        (partial / "prepare.json").write_text(json.dumps(record, indent=2) + "\n")
        if final.exists():  # made meanwhile by another process
            raise DataError(f"{final} already exists; remove it or choose another --out")
        partial.rename(final)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise ResourceError(os_error_message(err, f"cannot write {partial}")) from err
    except BaseException:  # interrupted or refused: no half-made tree stays behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(f"{aspect}: wrote {final} ({'hard links' if used == 'link' else 'copies'})")
    return summary


def _place_files(src: Path, dest: Path, rows: Sequence[dict], mode: str, log: Log) -> str:
    """Hard-link (``mode="link"``) or copy each row's source to ``dest/<image>``; returns the mode
    used, "copy" once a hard link was refused."""
    for row in rows:
        origin, target = src / row["source"], dest / row["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == "link":
            try:
                os.link(origin, target)
                continue
            except OSError as err:
                if err.errno not in _LINK_REFUSED:
                    raise
                log(f"note: cannot hard-link {src} into {dest.parent} ({err.strerror}); copying instead")
                mode = "copy"
        shutil.copy2(origin, target)
    return mode


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------- look-alike downloads

def synthesize_11k_download(folder: str | Path, identities: int = 7, images_per_aspect: int = 3, seed: int = 0,
                            size: tuple[int, int] = (32, 24)) -> Path:
    """Write a tiny look-alike of the 11k Hands download into ``folder`` and return it:
    ``Hands/Hand_0000002.jpg``, ... and ``HandInfo.csv`` with the real file's 9 columns.

    Identity k has id ``2 + 3k`` as 7 digits and ``images_per_aspect`` images of each aspect,
    except where ``k + aspect index`` is a multiple of 4, so that the aspects hold different
    numbers of identities. The last image of every identity with ``k % 3 == 1`` and all palmar
    left images of the last identity have accessories; with the defaults the aspects keep 5, 6, 5
    and 4 identities without accessories. The same arguments give the same files."""
    folder = Path(folder)
    _refuse_download(folder, ["Hands", "HandInfo.csv"])
    rng = np.random.default_rng(seed)
    (folder / "Hands").mkdir(parents=True)
    rows, number = [], 2
    for k in range(identities):
        pid, colour = f"{2 + 3 * k:07d}", rng.uniform(40, 220, 3)
        person = {"age": int(rng.integers(18, 76)), "gender": ("male", "female")[k % 2],
                  "skinColor": ("fair", "medium", "dark", "very fair")[k % 4]}
        for a, aspect_of_hand in enumerate(ASPECT_OF_HAND):
            if (k + a) % 4 == 0:
                continue
            for j in range(images_per_aspect):
                accessories = (j == images_per_aspect - 1 and k % 3 == 1) or (a == 3 and k == identities - 1)
                name = f"Hand_{number:07d}.jpg"
                _tiny_jpeg(folder / "Hands" / name, colour, rng, size)
                rows.append({**person, "id": pid, "accessories": int(accessories), "nailPolish": int(rng.integers(2)),
                             "aspectOfHand": aspect_of_hand, "imageName": name,
                             "irregularities": int(rng.integers(2))})
                number += 1
    _write_csv(folder / "HandInfo.csv", HANDINFO_COLUMNS, rows)
    return folder


def synthesize_hd_download(folder: str | Path, subjects: int = 7, distractors: int = 3, images_per_subject: int = 3,
                           seed: int = 0, size: tuple[int, int] = (32, 24)) -> Path:
    """Write a tiny look-alike of the HD download into ``folder`` and return it: ``1-501/<id>_<n>.jpg``
    for ids 1..subjects and ``502-712/<id>_<n>.jpg`` for ``distractors`` ids from 502; an odd id has
    one image more than ``images_per_subject``. The same arguments give the same files."""
    folder = Path(folder)
    _refuse_download(folder, [HD_SUBJECTS, HD_DISTRACTORS])
    rng = np.random.default_rng(seed)
    ids = {HD_SUBJECTS: range(1, subjects + 1), HD_DISTRACTORS: range(502, 502 + distractors)}
    for name, numbers in ids.items():
        (folder / name).mkdir(parents=True)
        for number in numbers:
            colour = rng.uniform(40, 220, 3)
            for n in range(1, images_per_subject + number % 2 + 1):
                _tiny_jpeg(folder / name / f"{number}_{n}.jpg", colour, rng, size)
    return folder


def _refuse_download(folder: Path, parts: Sequence[str]) -> None:
    if any((folder / part).exists() for part in parts):
        raise DataError(f"{folder} already holds a download ({', '.join(parts)}); choose an empty folder")


def _tiny_jpeg(path: Path, colour: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> None:
    """An image of one identity's colour plus noise: content differs per file, cost stays tiny."""
    pixels = colour + rng.normal(0, 12, (size[0], size[1], 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
