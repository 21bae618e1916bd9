"""``data.table``: the Arrow-backed record cache gives exactly ``read_jsonl``'s records, report and errors,
is built once and reused (keyed by file content and read options), and caches lengths + packing plan."""

from __future__ import annotations

import json
import os
import pickle

import pytest

import data.table as table_mod
from data.encoding import ChatEncoder
from data.packing import PackedDataset, PackingError, pack_lengths
from data.records import DataError, read_jsonl
from data.table import ReadOptions, cached_packing, open_records
from tests._data_fixtures import image_processor, qwen_tokenizer, write_jsonl, write_png
from tests.test_data_records import _row


@pytest.fixture
def jsonl(tmp_path):
    write_png(str(tmp_path / "a.png"), 640, 480)  # the size the rows below give
    write_png(str(tmp_path / "b.png"), 640, 480)
    objs = [{"desc": "low", "bbox_2d": [0, 240, 64, 480]}, {"desc": "right", "bbox_2d": [320, 0, 640, 48]},
            {"desc": "left", "bbox_2d": [0, 0, 64, 48]}]
    rows = [_row(objs), "", _row([], image="b.png", image_id=7), {"image": "a.png"},
            _row([{"desc": "x", "bbox_2d": [1, 2, 3, 4]}], image="a.png", image_id="dup")]
    return write_jsonl(str(tmp_path / "d.jsonl"), rows)


def test_table_equals_read_jsonl_and_is_built_once(jsonl, monkeypatch):
    opts = ReadOptions(max_objects=2, skip_invalid=True)
    expected, expected_report = read_jsonl(jsonl, max_objects=2, skip_invalid=True)
    table, report = open_records(jsonl, opts)
    assert list(table) == expected and len(table) == 3
    assert table[-1] == expected[-1] and table[0:2] == expected[0:2]
    assert vars(report) == vars(expected_report) and report.skipped == {"missing_field": 1}
    assert list(table.sources()) == [r.source for r in expected]

    def no_rebuild(*a, **k):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(table_mod, "iter_jsonl", no_rebuild)
    again, again_report = open_records(jsonl, opts)
    assert list(again) == expected and vars(again_report) == vars(expected_report)
    # A worker process gets the table by pickling: the path of the mapped file, not the records.
    assert list(pickle.loads(pickle.dumps(again))) == expected
    with pytest.raises(AssertionError, match="rebuilt"):  # another read option is another cache
        open_records(jsonl, ReadOptions(max_objects=1, skip_invalid=True))


def test_edited_file_gets_a_new_cache(jsonl, tmp_path):
    first, _ = open_records(jsonl, ReadOptions(skip_invalid=True))
    with open(jsonl, "a") as fh:
        fh.write('{"image": "b.png", "width": 640, "height": 480, "objects": [], "image_id": "new"}\n')
    second, _ = open_records(jsonl, ReadOptions(skip_invalid=True))
    assert first.cache_dir != second.cache_dir and len(second) == len(first) + 1
    assert second.cache_dir.parent == tmp_path / ".coordexp_cache"
    third, _ = open_records(jsonl, ReadOptions(skip_invalid=True), cache_root=tmp_path / "elsewhere")
    assert third.cache_dir.parent == tmp_path / "elsewhere" / ".coordexp_cache" and list(third) == list(second)


def test_invalid_line_raises_the_read_jsonl_error_and_leaves_no_cache(jsonl, tmp_path):
    with pytest.raises(DataError) as expected:
        read_jsonl(jsonl)
    with pytest.raises(DataError) as got:
        open_records(jsonl)
    assert str(got.value) == str(expected.value) and got.value.source.endswith("d.jsonl:4")
    assert not any((tmp_path / ".coordexp_cache").glob("*/report.json"))


def test_lengths_and_plan_are_cached_and_equal_the_direct_computation(jsonl, monkeypatch):
    table, _ = open_records(jsonl, ReadOptions(skip_invalid=True))
    enc = ChatEncoder(qwen_tokenizer(), image_processor(), prompt="Detect all objects.")
    lengths, rows = cached_packing(table, enc, 512, True)
    assert lengths == [enc.sample_length(r) for r in table]
    assert rows == pack_lengths(lengths, 512)
    _, single = cached_packing(table, enc, 512, False)
    assert single == [[0], [1], [2]]
    monkeypatch.setattr(ChatEncoder, "sample_length", lambda *a: pytest.fail("lengths recomputed"))
    monkeypatch.setattr(table_mod, "iter_jsonl", lambda *a, **k: pytest.fail("records re-read"))
    assert cached_packing(table, enc, 512, True) == (lengths, rows)
    ds = PackedDataset(list(range(3)), 512, 1, True, lengths=lengths, rows=rows)
    assert ds.rows == rows
    with pytest.raises(PackingError, match="exactly once"):
        PackedDataset(list(range(3)), 512, 1, True, lengths=lengths, rows=[[0], [1]])
    with pytest.raises(PackingError, match="training.max_length=8"):
        cached_packing(table, enc, 8, True)


def test_batched_lengths_on_two_processes_equal_one_record_at_a_time(tmp_path, monkeypatch):
    """The length pass in batches (``ChatEncoder.sample_lengths``, batched tokenizer call) over forked
    workers gives ``sample_length`` of every record, in order, and so the same packing plan."""
    from bench.bench_records import write_records
    from data.table import table_lengths

    jsonl = write_records(tmp_path / "r.jsonl", 70)
    table, _ = open_records(jsonl, ReadOptions())
    enc = ChatEncoder(qwen_tokenizer(), image_processor(), prompt="Detect all objects.")
    one_at_a_time = [enc.sample_length(r) for r in table]
    assert enc.sample_lengths(list(table)) == one_at_a_time
    assert enc._piecewise is True  # the pieces between coord tokens added up: the memoised path ran
    # a tokenizer whose pieces do not add up is caught by the check and counted whole
    wrong = ChatEncoder(qwen_tokenizer(), image_processor(), prompt="Detect all objects.")
    monkeypatch.setattr(wrong, "_piecewise_counts", lambda texts: [1] * len(texts))
    assert wrong.sample_lengths(list(table)) == one_at_a_time and wrong._piecewise is False
    assert table[3:9] == [table[i] for i in range(3, 9)]
    monkeypatch.setattr(table_mod, "LENGTHS_BATCH", 16)  # 5 batches, the last one short
    for procs in (1, 2):
        assert table_lengths(table, enc, procs).tolist() == one_at_a_time
    lengths, rows = cached_packing(table, enc, 2048, True, procs=2)
    assert lengths == one_at_a_time and rows == pack_lengths(one_at_a_time, 2048)


def test_longest_answer_from_the_cached_lengths_equals_tokenising_every_answer(tmp_path):
    """Stage-2's token budget reads the longest GT answer off the cached sample lengths (minus the prompt
    and each record's image tokens, per image size): the same number as tokenising every answer, also
    when the longest answer sits in a short sample (a small image) and the longest sample has a short answer."""
    write_png(str(tmp_path / "big.png"), 1280, 960)
    write_png(str(tmp_path / "small.png"), 64, 48)
    many = [{"desc": f"object number {k}", "bbox_2d": [k, k, 40 + k, 30 + k]} for k in range(6)]
    rows = [_row([{"desc": "x", "bbox_2d": [0, 0, 9, 9]}], image="big.png", width=1280, height=960, image_id="big"),
            _row(many, image="small.png", width=64, height=48, image_id="small"),
            _row(many[:2], image="small.png", width=64, height=48, image_id="two")]
    table, _ = open_records(write_jsonl(str(tmp_path / "s.jsonl"), rows), ReadOptions())
    enc = ChatEncoder(qwen_tokenizer(), image_processor(), prompt="Detect all objects.", min_pixels=56 * 56,
                      max_pixels=640 * 480)
    lengths, _ = cached_packing(table, enc, 8192, True)
    answers = [enc.answer_length(r) for r in table]
    assert lengths.index(max(lengths)) != answers.index(max(answers))  # the case the subtraction must get right
    assert enc.longest_answer(table, lengths) == max(answers)
    assert enc.longest_answer(list(table), lengths) == max(answers)  # a plain list of records: the same
    assert table.sizes().tolist() == [[960, 1280], [48, 64], [48, 64]]
    assert enc.longest_answer([], []) == 0


def _lines_file(tmp_path, rows):
    write_png(str(tmp_path / "a.png"), 640, 480)  # the size _row records
    return write_jsonl(str(tmp_path / "p.jsonl"), rows)


def _many_rows(n, bad=()):
    rows = []
    for i in range(n):
        if i in bad:
            rows.append({"image": "a.png"} if i % 2 else "")  # a missing field, or a blank line
        else:
            rows.append(_row([{"desc": f"d{i % 5}", "bbox_2d": [i % 7, 1, 9 + i % 5, 12]}] * (1 + i % 3),
                             image="a.png", image_id=f"id{i}"))
    return rows


@pytest.mark.parametrize("skip_invalid", [True, False])
def test_validation_in_parts_equals_the_serial_pass(tmp_path, monkeypatch, skip_invalid):
    """Parts on 3 forked processes: the same records in the same order and the same report as one pass;
    an invalid line, or an image_id repeated across parts, raises the serial pass's error."""
    from data.table import line_spans

    monkeypatch.setattr(table_mod, "MIN_PART_BYTES", 1)
    bad = {5, 17, 18, 40} if skip_invalid else set()
    path = _lines_file(tmp_path, _many_rows(60, bad))
    spans = line_spans(path, 3)
    assert len(spans) == 3 and spans[0][:1] == (0,) and spans[-1][1] == (tmp_path / "p.jsonl").stat().st_size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    opts = ReadOptions(skip_invalid=skip_invalid, max_objects=2)
    expected, expected_report = read_jsonl(path, skip_invalid=skip_invalid, max_objects=2)
    table, report = open_records(path, opts, procs=3)
    assert list(table) == expected and vars(report) == vars(expected_report)
    assert sorted(p.name for p in table.cache_dir.iterdir()) == ["records.arrow", "report.json"]

    for rows, what in ((_many_rows(60, {45}), "missing_field"), (_many_rows(60) + _many_rows(1), "duplicate_image_id")):
        path = write_jsonl(str(tmp_path / f"{what}.jsonl"), rows)
        with pytest.raises(DataError) as serial:
            read_jsonl(path)
        with pytest.raises(DataError) as parts:
            open_records(path, ReadOptions(), procs=3)
        assert str(parts.value) == str(serial.value) and what in str(parts.value)


def test_processes_without_barriers_build_a_cache_once_and_read_the_same_table(tmp_path, monkeypatch):
    """Two processes that share no barrier (two jobs on one dataset, a --dry-run under a launcher) open the
    same new cache at once: one builds it, the other waits on the lock and maps what it wrote."""
    import multiprocessing

    jsonl = write_jsonl(str(tmp_path / "d.jsonl"), _many_rows(400))
    write_png(str(tmp_path / "a.png"), 640, 480)
    builds = tmp_path / "builds"
    real_build = table_mod._build

    def counting_build(*args, **kwargs):
        with open(builds, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(table_mod, "_build", counting_build)  # inherited by the forked processes
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_open_and_report, args=(jsonl, tmp_path / f"out{k}.json")) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(builds.read_text().split()) == 1
    seen = [json.loads((tmp_path / f"out{k}.json").read_text()) for k in range(2)]
    assert seen[0] == seen[1] and seen[0]["records"] == 400


def _open_and_report(jsonl, out):
    table, report = open_records(jsonl, ReadOptions())
    out.write_text(json.dumps({"records": len(table), "ids": [table[i].image_id for i in (0, len(table) - 1)],
                               "cache": str(table.cache_dir)}))
