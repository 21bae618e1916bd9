"""The data layer: JSONL records -> CoordJSON answers -> chat-encoded samples -> packed batches.

- ``data.types``     shared contracts (Record, GTObject, ObjectSpan, BBoxGroup, EncodedSample, Segment, PackedBatch)
- ``data.records``   ``read_jsonl`` (validate, pixels -> bins, order objects), ``DataError``, ``DataReport``
- ``data.coordjson`` ``render_answer`` / ``render_objects_fragment``, ``coord_token``
- ``data.encoding``  ``ChatEncoder`` (prompt + image pads + answer with token types and spans), ``EncodedRecords``
- ``data.packing``   ``pack_lengths`` (first-fit-decreasing), ``collate_rows``, ``PackedDataset`` (resumable)
- ``data.shapes``    ``make_shapes_dataset`` (synthetic PNGs for the CPU demo)

Submodules are imported explicitly (``from data.records import read_jsonl``) so importing
``data`` stays cheap; see docs/DATA.md.
"""
