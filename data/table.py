"""Records at scale: a JSONL file validated once into an Arrow file that every rank and loader worker
memory-maps (a ``datasets.Dataset``), plus the per-sample token lengths, cached beside it.

``open_records(path, ...)`` returns a :class:`RecordTable` (a ``Sequence[Record]`` that decodes one
row on access) and the :class:`~data.records.DataReport` of the validation. The first call streams
the file through :func:`data.records.iter_jsonl` (the same checks and errors as ``read_jsonl``)
into ``<cache>/records.arrow`` and writes the report to ``<cache>/report.json``; later calls, other
ranks and loader workers only map the Arrow file (pages are shared through the OS page cache, no
per-process copy of the records). ``<cache>`` is ``<dir of the JSONL>/.coordexp_cache/<key>``
(or under ``data.cache_dir``), ``key`` = sha256 of the file's bytes, its path and the read options,
so an edited file or a changed ``data.*`` read option never reuses a stale cache.

``cached_packing(table, encoder, ...)`` caches ``ChatEncoder.sample_length`` of every record (the
tokenisation that static packing needs) as ``lengths-<encoder key>.npy`` in the same directory, and
the packing plan beside it. The lengths are computed in batches (one Arrow read and one batched
tokenizer call per ``LENGTHS_BATCH`` rows, ``ChatEncoder.sample_lengths``) over ``data.cache_build_procs``
processes; the values and their order do not depend on the process count.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from data.images import DEFAULT_MAX_IMAGE_PIXELS
from data.records import DataReport, iter_jsonl
from data.types import GTObject, Record

CACHE_FORMAT = 1
CACHE_DIRNAME = ".coordexp_cache"
_WRITE_BATCH = 10_000
LENGTHS_BATCH = 1024  # rows per Arrow read + batched tokenizer call of the length pass
MIN_PART_BYTES = 1 << 20  # smallest part of a JSONL file validated by a process of its own


@dataclass(frozen=True)
class ReadOptions:
    """The ``data.*`` options that change what is read (see ``data.records.read_jsonl``)."""

    image_root: str | None = None
    coords: str = "pixel"
    object_order: str = "yx"
    max_objects: int | None = None
    skip_invalid: bool = False
    check_images: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def _features():
    from datasets import Features, List, Value

    return Features({
        "image_path": Value("string"), "width": Value("int32"), "height": Value("int32"),
        "image_id": Value("string"), "source": Value("string"),
        "descs": List(Value("string")), "bins": List(Value("int16")),  # 4 bins per object, flat
    })


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir_for(path: str | os.PathLike, options: ReadOptions, cache_root: str | os.PathLike | None = None) -> Path:
    """``<cache_root or dir of path>/.coordexp_cache/<key>`` for this file content, path and options."""
    path = os.fspath(path)
    key = hashlib.sha256(json.dumps(
        {"format": CACHE_FORMAT, "file": file_digest(path), "path": path, "abspath": os.path.abspath(path),
         "options": asdict(options)}, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(cache_root) if cache_root is not None else Path(os.path.abspath(path)).parent
    return root / CACHE_DIRNAME / key


def _row(rec: Record) -> dict:
    return {"image_path": rec.image_path, "width": rec.width, "height": rec.height, "image_id": rec.image_id,
            "source": rec.source, "descs": [o.desc for o in rec.objects], "bins": [b for o in rec.objects for b in o.bins]}


def _write_records(records, out: Path) -> None:
    """Stream ``records`` into the Arrow file ``out`` (``_WRITE_BATCH`` rows per write)."""
    from datasets.arrow_writer import ArrowWriter

    writer = ArrowWriter(features=_features(), path=str(out))
    batch: list[dict] = []
    for rec in records:
        batch.append(_row(rec))
        if len(batch) == _WRITE_BATCH:
            writer.write_batch({k: [r[k] for r in batch] for k in batch[0]})
            batch = []
    if batch:
        writer.write_batch({k: [r[k] for r in batch] for k in batch[0]})
    writer.finalize()
    writer.close()


def line_spans(path: str, parts: int, min_bytes: int | None = None) -> list[tuple[int, int, int]]:
    """``parts`` (or fewer: at least ``min_bytes``, default ``MIN_PART_BYTES``, each) ``(start, stop, first line
    number)`` byte ranges of ``path`` that start at line starts and cover it, for validating them in parallel."""
    size = os.path.getsize(path)
    min_bytes = MIN_PART_BYTES if min_bytes is None else min_bytes
    parts = max(1, min(parts, size // max(min_bytes, 1)))
    if parts == 1:
        return [(0, size, 1)]
    starts = [0]
    with open(path, "rb") as fh:
        for k in range(1, parts):
            fh.seek(max(size * k // parts, starts[-1]))
            fh.readline()  # to the next line start
            if fh.tell() < size and fh.tell() > starts[-1]:
                starts.append(fh.tell())
        spans, lineno, pos = [], 1, 0
        for a, b in zip(starts, [*starts[1:], size]):
            fh.seek(pos)
            lineno += fh.read(a - pos).count(b"\n")
            spans.append((a, b, lineno))
            pos = a
    return spans


def _forked_map(fn, *iterables, workers: int | None = None) -> list:
    """``list(map(fn, *iterables))`` on ``workers`` forked processes (they inherit the module state set up
    for them). A worker that dies (killed, out of memory) raises ``BrokenProcessPool`` instead of hanging."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    items = list(zip(*iterables))
    with ProcessPoolExecutor(max_workers=workers or len(items), mp_context=multiprocessing.get_context("fork")) as ex:
        return list(ex.map(fn, *zip(*items)))


_SPAN_JOB: tuple | None = None  # (path, options, tmp dir) for the forked workers of _build


def _validate_span(k: int, span: tuple[int, int, int]) -> tuple[DataReport, list[str]]:
    """Worker: validate one part into ``<tmp>/part-<k>.arrow``; its report and its image ids (in order)."""
    path, options, tmp = _SPAN_JOB
    report = DataReport(path=path)
    ids: list[str] = []

    def records():
        for rec in iter_jsonl(path, report, span=span, **asdict(options)):
            ids.append(rec.image_id)
            yield rec

    _write_records(records(), tmp / f"part-{k}.arrow")
    return report, ids


def _validate_in_parts(path: str, options: ReadOptions, tmp: Path, procs: int) -> DataReport | None:
    """Validate ``path`` in parts on ``procs`` forked processes into ``tmp/records.arrow``; the merged report.

    None (the caller validates serially, whose errors and report are the reference) when a part failed
    (the first error in file order then comes from the serial pass), when an ``image_id`` repeats across
    parts (the serial pass names the first use), or when the file has no records.
    """
    global _SPAN_JOB

    spans = line_spans(path, procs)
    if len(spans) == 1:
        return None
    _SPAN_JOB = (path, options, tmp)
    try:
        results = _forked_map(_validate_span, list(range(len(spans))), spans)
    except Exception:  # noqa: BLE001 - the serial pass raises the error in file order
        return None
    finally:
        _SPAN_JOB = None
    seen: set[str] = set()
    for _, ids in results:
        if not seen.isdisjoint(ids):
            return None
        seen.update(ids)
    report = DataReport(path=path)
    for part, _ in results:  # counts add up, Counters too, example lists follow in file order
        for f in fields(DataReport):
            mine, theirs = getattr(report, f.name), getattr(part, f.name)
            if isinstance(mine, Counter):
                mine.update(theirs)
            elif isinstance(mine, list):
                mine.extend(theirs)
            elif isinstance(mine, int):
                setattr(report, f.name, mine + theirs)
    del report.skipped_examples[20:]  # the first 20 in file order, as the serial pass keeps them
    if report.lines == 0:
        return None
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    writer = ArrowWriter(features=_features(), path=str(tmp / "records.arrow"))
    for k in range(len(spans)):
        part = tmp / f"part-{k}.arrow"
        writer.write_table(Dataset.from_file(str(part), in_memory=False).data.table)
    writer.finalize()
    writer.close()
    for k in range(len(spans)):
        (tmp / f"part-{k}.arrow").unlink()
    return report


def _build(path: str, options: ReadOptions, out_dir: Path, procs: int = 1) -> None:
    """Validate ``path`` into ``out_dir/records.arrow`` + ``report.json`` (written to a temp dir, then renamed).

    ``procs`` > 1 (0: every available CPU): the file is validated in parts in parallel; the records, their
    order and the report are those of the serial pass (which runs instead when a part fails)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        report = _validate_in_parts(path, options, tmp, procs or available_cpus()) if procs != 1 else None
        if report is None:
            for leftover in tmp.iterdir():
                leftover.unlink()
            report = DataReport(path=path)
            _write_records(iter_jsonl(path, report, **asdict(options)), tmp / "records.arrow")
        state = {**asdict(report), "skipped": dict(report.skipped)}
        (tmp / "report.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        if out_dir.exists():  # another process finished the same cache first: keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class RecordTable(Sequence):
    """``Sequence[Record]`` over a memory-mapped Arrow table; a row becomes a ``Record`` only on access."""

    def __init__(self, dataset, cache_dir: Path):
        self.dataset = dataset
        self.cache_dir = cache_dir

    def __len__(self) -> int:
        return self.dataset.num_rows

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return self.records_between(start, stop)
            return [self[j] for j in range(start, stop, step)]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        row = self.dataset[i]
        bins = row["bins"]
        objects = tuple(GTObject(desc=d, bins=tuple(bins[4 * k: 4 * k + 4])) for k, d in enumerate(row["descs"]))
        return Record(image_path=row["image_path"], width=row["width"], height=row["height"], objects=objects,
                      image_id=row["image_id"], source=row["source"])

    def records_between(self, start: int, stop: int) -> list[Record]:
        """``[self[i] for i in range(start, stop)]`` decoded from one Arrow read."""
        if stop <= start:
            return []
        cols = self.dataset[start:stop]
        out = []
        for k in range(stop - start):
            bins = cols["bins"][k]
            objects = tuple(GTObject(desc=d, bins=tuple(bins[4 * j: 4 * j + 4])) for j, d in enumerate(cols["descs"][k]))
            out.append(Record(image_path=cols["image_path"][k], width=cols["width"][k], height=cols["height"][k],
                              objects=objects, image_id=cols["image_id"][k], source=cols["source"][k]))
        return out

    def sizes(self) -> np.ndarray:
        """``[N, 2]`` int64 ``(height, width)`` of every record, read as two columns (no record decoded)."""
        data = self.dataset.data
        return np.stack([data.column("height").to_numpy(), data.column("width").to_numpy()], axis=1).astype(np.int64)

    def sources(self) -> Sequence[str]:
        """``file:line`` of every record, read from the table on access (no list of a million strings)."""
        return _Column(self.dataset, "source")


class _Column(Sequence):
    def __init__(self, dataset, name: str):
        self.dataset, self.name = dataset, name

    def __len__(self) -> int:
        return self.dataset.num_rows

    def __getitem__(self, i):  # type: ignore[override]
        return self.dataset[i][self.name]


def open_records(path: str | os.PathLike, options: ReadOptions = ReadOptions(), *,
                 cache_root: str | os.PathLike | None = None,
                 main_process_first: Callable[[], object] | None = None,
                 procs: int = 1) -> tuple[RecordTable, DataReport]:
    """The validated records of ``path`` as a memory-mapped :class:`RecordTable`, building the cache once.

    ``main_process_first``: a context-manager factory (``accelerator.main_process_first``) so the main
    process validates and writes while the other ranks wait, then map what it wrote. Raises the
    ``DataError`` of ``read_jsonl`` (``file:line``, field) when a line is invalid and not skipped.
    ``procs``: processes that validate a new cache's parts in parallel (``data.cache_build_procs``).
    """
    from datasets import Dataset

    path = os.fspath(path)
    out = cache_dir_for(path, options, cache_root)
    with (main_process_first or nullcontext)(), _one_builder(out):
        if not (out / "report.json").is_file():
            _build(path, options, out, procs)
    dataset = Dataset.from_file(str(out / "records.arrow"), in_memory=False)
    raw = json.loads((out / "report.json").read_text())

    report = DataReport(**{**raw, "skipped": Counter(raw["skipped"])})
    return RecordTable(dataset, out), report


def encoder_key(encoder) -> str:
    """What ``ChatEncoder.sample_length`` depends on: prompt tokens, pixel budget, merge size, tokenizer."""
    tok = encoder.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    proc = encoder.image_processor
    state = {
        "head": encoder._prompt_head, "tail": encoder._prompt_tail, "size": encoder.size, "merge": encoder.merge_size,
        "processor": {k: getattr(proc, k, None) for k in ("patch_size", "temporal_patch_size", "merge_size")},
        "processor_size": getattr(proc, "size", None), "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "im_end": encoder.im_end_id,
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:32]


@contextmanager
def _one_builder(target: Path) -> Iterator[None]:
    """Held while a process checks for ``target`` and builds it: processes without barriers between them
    (other jobs on the same data, a ``--dry-run`` under a launcher) wait for the one building, then read
    what it wrote, instead of each building it again. An advisory ``flock`` on ``<target>.lock``; where the
    filesystem has no locks every process builds, and the atomic rename still leaves one copy."""
    import fcntl

    lock = target.with_name(target.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def _cached(target: Path, compute: Callable[[], object], save: Callable[[object, object], None],
            main_process_first: Callable[[], object] | None) -> None:
    """Write ``compute()`` to ``target`` once (main process first, one builder per file; atomic rename)."""
    with (main_process_first or nullcontext)(), _one_builder(target):
        if not target.is_file():
            value = compute()
            fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)
            with os.fdopen(fd, "wb") as fh:
                save(value, fh)
            os.replace(tmp, target)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; what ``data.cache_build_procs: 0`` uses)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_FORKED: tuple | None = None  # (table, encoder) for the forked workers of table_lengths


def _span_lengths(span: tuple[int, int], table=None, encoder=None) -> np.ndarray:
    if table is None:
        table, encoder = _FORKED
    return np.asarray(encoder.sample_lengths(table.records_between(*span)), dtype=np.int64)


def table_lengths(table: RecordTable, encoder, procs: int = 1) -> np.ndarray:
    """``encoder.sample_length`` of every record of ``table`` (int64, in record order), computed in
    batches of ``LENGTHS_BATCH`` rows (``ChatEncoder.sample_lengths``) on ``procs`` processes (0: every
    available CPU). The workers are forked (they inherit the mapped table and the encoder; nothing is
    pickled but the row ranges and the lengths); the result does not depend on ``procs``."""
    global _FORKED
    n = len(table)
    spans = [(s, min(s + LENGTHS_BATCH, n)) for s in range(0, n, LENGTHS_BATCH)]
    procs = min(procs or available_cpus(), len(spans))
    if procs <= 1:
        parts = [_span_lengths(span, table, encoder) for span in spans]
    else:
        _FORKED = (table, encoder)
        try:
            parts = _forked_map(_span_lengths, spans, workers=procs)
        finally:
            _FORKED = None
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def cached_packing(table: RecordTable, encoder, max_length: int, packing: bool, *,
                   main_process_first: Callable[[], object] | None = None,
                   procs: int = 1) -> tuple[list[int], list[list[int]]]:
    """(``encoder.sample_length`` of every record, the static packing plan) for ``table``, each computed
    once and cached beside the table: ``lengths-<encoder key>.npy`` and
    ``plan-<encoder key>-<max_length>-<packed|single>.json`` (``data.packing.pack_lengths`` rows, or one
    sample per row). The plan is what ``data.packing.PackedDataset(rows=...)`` takes; its checks (a
    sample longer than ``max_length`` raises with the record's ``file:line``) run when it is computed.
    ``procs``: processes of the length pass (:func:`table_lengths`; ``data.cache_build_procs``).
    ``main_process_first``: a context-manager factory; the recipes pass ``training.setup.each_node_first``
    (global rank 0 computes, then each node that does not see the files, the other ranks wait).
    """
    from data.packing import pack_lengths

    key = encoder_key(encoder)
    lengths_file = table.cache_dir / f"lengths-{key}.npy"
    _cached(lengths_file, lambda: table_lengths(table, encoder, procs), lambda value, fh: np.save(fh, value),
            main_process_first)
    lengths = np.load(lengths_file).tolist()
    plan_file = table.cache_dir / f"plan-{key}-{int(max_length)}-{'packed' if packing else 'single'}.json"

    def plan():
        rows = pack_lengths(lengths, max_length, sources=table.sources())  # also the too-long check
        return rows if packing else [[i] for i in range(len(lengths))]

    _cached(plan_file, plan, lambda value, fh: fh.write(json.dumps(value, separators=(",", ":")).encode()),
            main_process_first)
    return lengths, json.loads(plan_file.read_text())
