import csv
import errno
import inspect
import json
import math
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from workbench import prepare
from workbench.data import load_reid_dataset
from workbench.errors import DataError, ResourceError, UsageError
from workbench.prepare import (ASPECT_HD, ASPECTS_11K, format_summary, prepare_11k, prepare_hd, read_handinfo,
                               split_identities, synthesize_11k_download, synthesize_hd_download)

SPLITS = 3


def quiet(_line):
    pass


def manifest(root: Path) -> list[dict]:
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def by_role(rows: list[dict]) -> dict[str, dict[str, set[str]]]:
    """role -> pid -> the source paths placed there."""
    out: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for row in rows:
        out[row["role"]][row["pid"]].add(row["source"])
    return out


def expected_11k(src: Path) -> dict[str, dict[str, set[str]]]:
    """aspect -> pid -> sources, straight from the CSV: what the split should partition."""
    names = {"dorsal right": "dorsal_r", "dorsal left": "dorsal_l", "palmar right": "palmar_r",
             "palmar left": "palmar_l"}
    out: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    with open(src / "HandInfo.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["accessories"] == "0":
                out[names[row["aspectOfHand"]]][row["id"]].add(f"Hands/{row['imageName']}")
    return out


@pytest.fixture(scope="module")
def hands_src(tmp_path_factory) -> Path:
    return synthesize_11k_download(tmp_path_factory.mktemp("download") / "11k")


@pytest.fixture(scope="module")
def hands_out(hands_src, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare_11k(hands_src, out, splits=SPLITS, seed=5, log=quiet)


@pytest.fixture(scope="module")
def hd_src(tmp_path_factory) -> Path:
    return synthesize_hd_download(tmp_path_factory.mktemp("download") / "HD" / "Original Images")


@pytest.fixture(scope="module")
def hd_out(hd_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare_hd(hd_src, out, splits=SPLITS, seed=5, log=quiet)
    return out / ASPECT_HD


def test_split_identities_reproduces_the_published_counts():
    for n, (train, test) in {143: (72, 71), 146: (73, 73), 151: (76, 75), 2: (1, 1), 3: (2, 1)}.items():
        pids = [f"{k:07d}" for k in range(n, 0, -1)]
        first, rest = split_identities(pids)
        assert (len(first), len(rest)) == (train, test)
        assert first + rest == sorted(pids)


def test_handinfo_ids_stay_zero_padded(hands_src, tmp_path):
    rows = read_handinfo(hands_src / "HandInfo.csv")
    assert list(rows[0]) == list(prepare.HANDINFO_COLUMNS)
    assert rows[0]["id"] == "0000002" and all(len(row["id"]) == 7 for row in rows)
    stripped = tmp_path / "src"
    shutil.copytree(hands_src, stripped)
    text = (stripped / "HandInfo.csv").read_text().replace("\n0000002,", "\n2 ,")  # a spreadsheet round trip
    (stripped / "HandInfo.csv").write_text(text)
    prepare_11k(stripped, tmp_path / "out", aspects="dorsal_l", splits=1, log=quiet)
    assert (tmp_path / "out" / "dorsal_l" / "train" / "0000002").is_dir()


def test_11k_split_partitions_each_aspect(hands_src, hands_out):
    out, summaries = hands_out
    expected = expected_11k(hands_src)
    assert set(summaries) == set(ASPECTS_11K)
    for aspect in ASPECTS_11K:
        roles = by_role(manifest(out / aspect))
        pids = sorted(expected[aspect])
        train, test = set(roles["train"]), set(roles["query0"]) | set(roles["gallery0"])
        assert len(train) == math.ceil(len(pids) / 2) and sorted(train) + sorted(test) == pids
        assert not train & test
        for pid in train:  # one image of each training identity (with more than one) is validation only
            assert roles["train"][pid] | roles["val"].get(pid, set()) == expected[aspect][pid]
            assert len(roles["val"].get(pid, ())) == (len(expected[aspect][pid]) > 1)
            assert not roles["val"].get(pid, set()) & roles["train"][pid]
        assert set(roles["val"]) == {pid for pid in train if len(expected[aspect][pid]) > 1}
        for i in range(SPLITS):
            assert set(roles[f"gallery{i}"]) == test
            for pid in test:
                gallery, query = roles[f"gallery{i}"][pid], roles[f"query{i}"].get(pid, set())
                assert len(gallery) == 1 and not gallery & query
                assert gallery | query == expected[aspect][pid]


def test_accessories_are_left_out(hands_src, hands_out):
    out, _ = hands_out
    with open(hands_src / "HandInfo.csv", newline="") as f:
        with_accessories = {f"Hands/{row['imageName']}" for row in csv.DictReader(f) if row["accessories"] == "1"}
    assert with_accessories
    placed = {row["source"] for aspect in ASPECTS_11K for row in manifest(out / aspect)}
    assert not placed & with_accessories
    # the last identity wears accessories in every palmar left image: it is gone from that aspect
    assert "0000020" not in {row["pid"] for row in manifest(out / "palmar_l")}
    assert "0000020" in {row["pid"] for row in manifest(out / "dorsal_l")}


def test_tree_manifest_summary_and_record_agree(hands_out):
    out, summaries = hands_out
    root = out / "dorsal_r"
    rows = manifest(root)
    assert list(rows[0]) == list(prepare.MANIFEST_COLUMNS)
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}
    assert on_disk == {row["image"] for row in rows}
    assert all(row["image"] == f"{row['role']}/{row['pid']}/{Path(row['source']).name}" for row in rows)
    assert {p.name for p in root.iterdir()} == {"manifest.csv", "summary.csv", "prepare.json", "train", "val"} | {
        f"{kind}{i}" for i in range(SPLITS) for kind in ("query", "gallery")}
    summary = summaries["dorsal_r"]
    assert [row["role"] for row in summary[:4]] == ["train", "val", "query0", "gallery0"]
    assert len(summary) == 2 + 2 * SPLITS
    with open(root / "summary.csv", newline="") as f:
        assert [{k: v if k == "role" else int(v) for k, v in row.items()} for row in csv.DictReader(f)] == summary
    record = json.loads((root / "prepare.json").read_text())
    assert (record["dataset"], record["seed"], record["splits"], record["mode"]) == ("11k Hands", 5, SPLITS, "link")
    assert record["counts"] == summary and "ceil(n/2)" in record["rule"] and record["workbench_version"]
    assert not list(out.glob("*.partial"))


def test_format_summary_aligns_columns(hands_out):
    _, summaries = hands_out
    lines = format_summary(summaries["dorsal_r"]).splitlines()
    assert lines[0].split() == ["role", "identities", "images", "distractors"]
    assert len(lines) == 1 + 2 + 2 * SPLITS and len({len(line) for line in lines}) == 1
    assert format_summary([]) == ""


def test_prepared_split_loads(hands_out, tmp_path):
    """A prepared aspect loads as split i once query/ and gallery/ point at query<i>/gallery<i>."""
    out, summaries = hands_out
    root = out / "dorsal_l"
    view = tmp_path / "view"
    view.mkdir()
    for name, target in (("train", "train"), ("query", "query1"), ("gallery", "gallery1")):
        (view / name).symlink_to(root / target, target_is_directory=True)
    data = load_reid_dataset(view)
    counts = {row["role"]: row for row in summaries["dorsal_l"]}
    assert (len(data.train), len(data.query), len(data.gallery)) == tuple(
        counts[role]["images"] for role in ("train", "query1", "gallery1"))
    assert data.num_classes == counts["train"]["identities"] and not data.unmatched_query_pids


def test_prepared_tree_loads_with_split_key(hands_out):
    if "split" not in inspect.signature(load_reid_dataset).parameters:
        pytest.skip("load_reid_dataset has no split argument yet")
    out, summaries = hands_out
    data = load_reid_dataset(out / "dorsal_l", split=2)
    counts = {row["role"]: row for row in summaries["dorsal_l"]}
    assert (len(data.query), len(data.gallery)) == (counts["query2"]["images"], counts["gallery2"]["images"])
    assert data.val_source == "folder" and len(data.val_query) == counts["val"]["images"]


def test_hd_split_and_distractors(hd_src, hd_out):
    rows = manifest(hd_out)
    roles = by_role(rows)
    subjects = sorted(f"{int(p.name.split('_')[0]):04d}" for p in (hd_src / "1-501").iterdir())
    subjects = sorted(set(subjects))
    distractors = {f"{int(p.name.split('_')[0]) + 1000:04d}" for p in (hd_src / "502-712").iterdir()}
    assert distractors == {"1502", "1503", "1504"} and subjects[0] == "0001"
    train = set(roles["train"])
    assert sorted(train) == subjects[:math.ceil(len(subjects) / 2)]
    test = set(subjects) - train
    for i in range(SPLITS):
        assert set(roles[f"gallery{i}"]) == test | distractors
        assert all(len(roles[f"gallery{i}"][pid]) == 1 for pid in test)
        assert sum(len(roles[f"gallery{i}"][pid]) for pid in distractors) == len(list((hd_src / "502-712").iterdir()))
        assert set(roles[f"query{i}"]) == test
    elsewhere = {row["pid"] for row in rows if not row["role"].startswith("gallery")}
    assert elsewhere and not elsewhere & distractors
    assert {row["pid"] for row in rows if row["distractor"] == "1"} == distractors
    assert set(roles["val"]) == train
    summary = json.loads((hd_out / "prepare.json").read_text())["counts"]
    assert {row["role"]: row["distractors"] for row in summary}["gallery0"] == len(distractors)


def test_same_seed_same_tree_other_seed_other_galleries(hands_src, hands_out, tmp_path):
    out, _ = hands_out
    prepare_11k(hands_src, tmp_path / "same", aspects=["dorsal_r"], splits=SPLITS, seed=5, log=quiet)
    prepare_11k(hands_src, tmp_path / "other", aspects=["dorsal_r"], splits=SPLITS, seed=6, log=quiet)
    assert (tmp_path / "same/dorsal_r/manifest.csv").read_bytes() == (out / "dorsal_r/manifest.csv").read_bytes()
    galleries = [[row for row in manifest(root) if row["role"].startswith("gallery")]
                 for root in (out / "dorsal_r", tmp_path / "other/dorsal_r")]
    assert galleries[0] != galleries[1]


def test_link_copy_and_fallback(hands_src, hands_out, tmp_path, monkeypatch):
    out, _ = hands_out
    row = manifest(out / "dorsal_r")[0]
    assert os.path.samefile(out / "dorsal_r" / row["image"], hands_src / row["source"])
    prepare_11k(hands_src, tmp_path / "copied", aspects="dorsal_r", splits=1, seed=5, mode="copy", log=quiet)
    copied = tmp_path / "copied/dorsal_r" / row["image"]
    assert not os.path.samefile(copied, hands_src / row["source"])
    assert copied.read_bytes() == (hands_src / row["source"]).read_bytes()

    def refuse(*_args, **_kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(prepare.os, "link", refuse)
    notes = []
    prepare_11k(hands_src, tmp_path / "fallback", aspects="dorsal_r", splits=1, seed=5, log=notes.append)
    assert sum("copying instead" in note for note in notes) == 1
    assert json.loads((tmp_path / "fallback/dorsal_r/prepare.json").read_text())["mode"] == "copy"
    assert (tmp_path / "fallback/dorsal_r" / row["image"]).is_file()


def test_existing_output_is_refused_before_any_work(hands_src, tmp_path, monkeypatch):
    (tmp_path / "out" / "palmar_l").mkdir(parents=True)
    monkeypatch.setattr(prepare, "read_handinfo", lambda _path: pytest.fail("read the CSV before refusing"))
    with pytest.raises(DataError, match="palmar_l already exists"):
        prepare_11k(hands_src, tmp_path / "out", log=quiet)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["palmar_l"]


def test_a_failed_write_leaves_nothing(hands_src, tmp_path, monkeypatch):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare.shutil, "copy2", full)
    with pytest.raises(ResourceError, match="No space left"):
        prepare_11k(hands_src, tmp_path / "out", aspects="dorsal_r", splits=1, mode="copy", log=quiet)
    assert list((tmp_path / "out").iterdir()) == []


def broken_11k(src: Path, tmp: Path, how: str) -> Path:
    """A copy of the look-alike download, broken as ``how`` says."""
    bad = tmp / "bad"
    shutil.copytree(src, bad)
    info = bad / "HandInfo.csv"
    if how == "no src":
        shutil.rmtree(bad)
    elif how == "no csv":
        info.unlink()
    elif how == "no column":
        info.write_text(info.read_text().replace("aspectOfHand", "aspect", 1))
    elif how == "missing images":
        for name in ("Hand_0000002.jpg", "Hand_0000003.jpg"):  # identity 0000002, dorsal left
            (bad / "Hands" / name).unlink()
    elif how == "one identity":
        rows = read_handinfo(info)
        for row in rows:
            if row["aspectOfHand"] == "palmar right" and row["id"] != "0000002":
                row["accessories"] = "1"
        with open(info, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(prepare.HANDINFO_COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    return bad


@pytest.mark.parametrize("how, aspects, words", [
    ("no src", ASPECTS_11K, "11k Hands download not found"),
    ("no csv", ASPECTS_11K, "HandInfo.csv not found"),
    ("no column", ASPECTS_11K, "no column aspectOfHand"),
    ("missing images", ASPECTS_11K, "2 images listed in HandInfo.csv missing .*Hand_0000002.jpg, Hand_0000003.jpg"),
    ("one identity", ["palmar_r"], "palmar_r has 1 identity without accessories; at least 2"),
])
def test_11k_errors_are_one_line(hands_src, tmp_path, how, aspects, words):
    src = broken_11k(hands_src, tmp_path, how)
    wrong_argument = how == "no src"  # a --src that is not there is the command's mistake (exit 2)
    with pytest.raises(UsageError if wrong_argument else DataError, match=words) as caught:
        prepare_11k(src, tmp_path / "out", aspects=aspects, splits=1, log=quiet)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, words", [
    ({"aspects": ["dorsal_r", "dorsal"]}, "unknown 11k aspect dorsal; known aspects: dorsal_r, dorsal_l, palmar_r, "
                                          "palmar_l"),
    ({"aspects": ""}, "no 11k aspect given"),
    ({"splits": 0}, "splits must be"),
    ({"seed": -1}, "seed must be"),
    ({"mode": "move"}, "mode must be one of link, copy"),
])
def test_bad_arguments_are_usage_errors(hands_src, tmp_path, kwargs, words):
    with pytest.raises(UsageError, match=words):
        prepare_11k(hands_src, tmp_path / "out", log=quiet, **kwargs)


def test_hd_errors_are_one_line(hd_src, tmp_path):
    with pytest.raises(UsageError, match="HD download not found"):
        prepare_hd(tmp_path / "nowhere", tmp_path / "out", log=quiet)
    partial = tmp_path / "partial"
    shutil.copytree(hd_src, partial)
    shutil.rmtree(partial / "502-712")
    with pytest.raises(DataError, match="502-712 not found"):
        prepare_hd(partial, tmp_path / "out", log=quiet)
    lonely = tmp_path / "lonely"
    synthesize_hd_download(lonely, subjects=1, distractors=1)
    with pytest.raises(DataError, match="has 1 subject; at least 2"):
        prepare_hd(lonely, tmp_path / "out", log=quiet)
    (lonely / "1-501" / "IMG 7.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"IMG 7.jpg: HD image names are <id>_<n>.jpg"):
        prepare_hd(lonely, tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


def test_look_alike_downloads_are_deterministic(tmp_path):
    a = synthesize_11k_download(tmp_path / "a", identities=3, images_per_aspect=2)
    b = synthesize_11k_download(tmp_path / "b", identities=3, images_per_aspect=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    with pytest.raises(DataError, match="already holds a download"):
        synthesize_11k_download(a)
