"""Hostile and unusual inputs (second round): nothing outside a run dir is deleted, no image is silently
changed, no config or data file hangs a CLI or ends in a traceback, every `error:` line is bounded.
docs/RELIABILITY.md ("Unusual inputs") lists each input and its test."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import train_stage1
from configs.errors import LINE_CHARS, ConfigError, UserError, run_cli
from configs.loader import RESOLVED_FILENAME, load_config
from data.images import ImageRefused, to_rgb
from data.records import DataError, read_jsonl
from tests._data_fixtures import write_jsonl, write_png
from tests._recipe_helpers import STAGE1_DEMO, recipe_argv

pytestmark = pytest.mark.usefixtures("fresh_coordexp_logger")

RAMP = np.arange(256, dtype=np.uint8).reshape(16, 16)  # 0..255, the expected 8-bit gray of every ramp below


def _gray(img: Image.Image, tol: int = 0) -> np.ndarray:
    """The gray level of an RGB image whose channels agree within ``tol`` (colour-space rounding)."""
    rgb = np.asarray(img).astype(np.int64)
    assert img.mode == "RGB" and np.asarray(img).dtype == np.uint8
    assert np.abs(rgb - rgb[..., :1]).max() <= tol
    return rgb[..., 1]


# ---------------------------------------------------------------- run.* never deletes outside a run dir


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs/path", ".hidden", "x" * 201, "a\\b"])
def test_a_run_name_that_is_not_a_plain_name_is_refused_at_load(name):
    with pytest.raises(ConfigError, match=r"^run\.name: "):
        load_config(STAGE1_DEMO, [f"run.name={name}"])


def test_dotdot_run_name_with_overwrite_deletes_nothing(recipe_env, tmp_path, monkeypatch, capsys):
    """The damage case: run.name=.. with run.overwrite=true used to empty the parent of run.output_dir."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    (out / "other_run").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # the parent looks "used"
    (tmp_path / "notes.txt").write_text("keep me")
    (out / "other_run" / "metrics.jsonl").write_text('{"step": 3}\n')
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = recipe_argv(recipe_env, STAGE1_DEMO, out, name="..", max_steps=1, run__overwrite=True)
    for args in (argv, [*argv, "--dry-run"]):
        assert run_cli(train_stage1.main, args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: run.name: '..' is not allowed here"), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no run.lock either
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def _a_used_folder(path, *, is_run: bool):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    (path / "precious.bin").write_bytes(b"data")
    if is_run:
        (path / RESOLVED_FILENAME).write_text("run: {}\n")


def test_overwrite_refuses_a_folder_that_is_not_a_run_of_this_project(recipe_env, tmp_path, monkeypatch):
    """run.output_dir + run.name pointing at someone else's folder (it even has a metrics.jsonl): refused."""
    monkeypatch.chdir(tmp_path)
    _a_used_folder(tmp_path / "home" / "results", is_run=False)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path / "home", name="results", max_steps=1, run__overwrite=True)
    with pytest.raises(UserError, match=r"run.overwrite: .*results holds no config.resolved.yaml.*not a run dir"):
        train_stage1.main(argv)
    assert sorted(p.name for p in (tmp_path / "home" / "results").iterdir()) == ["metrics.jsonl", "precious.bin"]


def test_overwrite_never_deletes_through_a_symlinked_run_dir(recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "elsewhere" / "real_run"
    _a_used_folder(target, is_run=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "linked").symlink_to(target, target_is_directory=True)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path / "runs", name="linked", max_steps=1, run__overwrite=True)
    with pytest.raises(UserError, match=r"run.overwrite: .*linked is a symlink .*overwrite never deletes through a link"):
        train_stage1.main(argv)
    assert sorted(p.name for p in target.iterdir()) == sorted(["metrics.jsonl", "precious.bin", RESOLVED_FILENAME])


def test_overwrite_empties_a_real_run_dir_and_unlinks_links_without_following_them(tmp_path):
    from training.faults import LOCK_NAME
    from training.session import replace_run_dir

    run = tmp_path / "run"
    _a_used_folder(run, is_run=True)
    (run / "checkpoint-1").mkdir()
    (run / LOCK_NAME).write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    (run / "link_to_outside").symlink_to(outside, target_is_directory=True)
    replace_run_dir(run)
    assert [p.name for p in run.iterdir()] == [LOCK_NAME]
    assert (outside / "keep.txt").read_text() == "x"


# ---------------------------------------------------------------- image modes -> 8-bit RGB


def test_sixteen_bit_gray_png_is_scaled_not_clipped(tmp_path):
    """The damage case: a 16-bit PNG (mode I;16) went through convert("RGB"), which clips: 99.6 % white."""
    path = tmp_path / "ramp16.png"
    Image.fromarray(RAMP.astype(np.uint16) * 257).save(path)  # 0..65535 in steps of 257
    with Image.open(path) as im:
        assert im.mode == "I;16"
        assert (_gray(to_rgb(im)) == RAMP).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_wide_integer_modes_map_0_65535_to_0_255(mode):
    wide = RAMP.astype(np.int64) * 257
    im = Image.fromarray(wide.astype(np.int32), "I") if mode == "I" else Image.new(mode, (16, 16))
    if mode != "I":
        for i, v in enumerate(wide.ravel()):
            im.putpixel((i % 16, i // 16), int(v))
    assert (_gray(to_rgb(im)) == RAMP).all()


def test_float_mode_maps_0_1_to_0_255_and_refuses_other_ranges():
    im = Image.fromarray((RAMP / 255.0).astype(np.float32), "F")
    assert (_gray(to_rgb(im)) == RAMP).all()
    with pytest.raises(ImageRefused, match=r"mode F with values in \[0, 255\]: only 0..1"):
        to_rgb(Image.fromarray(RAMP.astype(np.float32), "F"))
    with pytest.raises(ImageRefused, match=r"mode I with values in \[-5, -5\]"):
        to_rgb(Image.fromarray(np.full((2, 2), -5, np.int32), "I"))


def test_eight_bit_gray_bilevel_and_palette_modes():
    assert (_gray(to_rgb(Image.fromarray(RAMP, "L"))) == RAMP).all()
    bilevel = Image.fromarray(RAMP >= 128)
    assert bilevel.mode == "1"
    assert (_gray(to_rgb(bilevel)) == np.where(RAMP >= 128, 255, 0)).all()
    palette = Image.fromarray(RAMP, "L").convert("P")
    assert (_gray(to_rgb(palette)) == RAMP).all()


def test_alpha_is_composited_over_white():
    """LA / RGBA / PA / P with a transparency key: a pixel of alpha a over white is v*a/255 + 255*(1 - a/255)."""
    alpha = RAMP[::-1].copy()
    la = Image.merge("LA", [Image.fromarray(np.full((16, 16), 40, np.uint8)), Image.fromarray(alpha)])
    a = alpha.astype(np.float64) / 255
    expect = np.rint(40 * a + 255 * (1 - a)).astype(np.int64)
    pa = Image.new("L", (16, 16), 40).convert("P")
    pa.putalpha(Image.fromarray(alpha))
    assert pa.mode == "PA"
    for im in (la, la.convert("RGBA"), pa):
        assert np.abs(_gray(to_rgb(im)).astype(np.int64) - expect).max() <= 1, im.mode
    keyed = Image.fromarray(RAMP, "L").convert("P")
    keyed.info["transparency"] = 0  # palette index 0 (black) is transparent
    got = _gray(to_rgb(keyed))
    assert got[0, 0] == 255 and (got.ravel()[1:] == RAMP.ravel()[1:]).all()


def test_cmyk_ycbcr_hsv_lab_ramps():
    k = Image.fromarray(RAMP, "L")
    zero, full, mid = (Image.new("L", (16, 16), v) for v in (0, 255, 128))
    cmyk = Image.merge("CMYK", [zero, zero, zero, k])  # black ink ramp: gray 255 - k
    assert (_gray(to_rgb(cmyk)) == 255 - RAMP).all()
    ycc = Image.merge("YCbCr", [k, mid, mid])  # luma ramp, neutral chroma: gray = Y
    assert np.abs(_gray(to_rgb(ycc), tol=1) - RAMP).max() <= 1
    hsv = Image.merge("HSV", [zero, zero, k])  # no saturation: gray = V
    assert (_gray(to_rgb(hsv)) == RAMP).all()
    lab = Image.merge("LAB", [k, mid, mid])  # lightness ramp, neutral a/b: gray, darkest to lightest
    g = _gray(to_rgb(lab), tol=2).ravel()
    assert g[0] == 0 and g[-1] >= 250 and (np.diff(g) >= 0).all()
    assert to_rgb(Image.fromarray(np.zeros((2, 2, 3), np.uint8))).mode == "RGB"


def test_a_mode_pil_cannot_convert_is_refused_in_one_line():
    with pytest.raises(ImageRefused, match="mode La cannot be converted to RGB"):
        to_rgb(Image.new("La", (2, 2)))


def test_a_sixteen_bit_png_trains_on_the_scaled_image(tmp_path):
    """Through the encoder the model sees: the same pixels as the 8-bit ramp."""
    from data.encoding import ChatEncoder
    from data.types import Record
    from tests._data_fixtures import image_processor, qwen_tokenizer

    Image.fromarray(RAMP.astype(np.uint16) * 257).save(tmp_path / "a16.png")
    Image.fromarray(RAMP, "L").convert("RGB").save(tmp_path / "a8.png")
    enc = ChatEncoder(qwen_tokenizer(), image_processor(), prompt="Detect.")
    records = [Record(image_path=str(tmp_path / n), width=16, height=16, objects=(), image_id=n, source=n)
               for n in ("a16.png", "a8.png")]
    a, b = (np.asarray(enc.load_image(r)) for r in records)
    assert (a == b).all()


# ---------------------------------------------------------------- image files: size, truncation, bombs


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (no pixel data): what Image.open reads."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _row(image, w, h, **kw):
    return {"image": image, "width": w, "height": h, "objects": [], **kw}


def test_a_decompression_bomb_is_one_line_naming_the_pixel_limit(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    path = write_jsonl(str(tmp_path / "d.jsonl"), [_row("bomb.png", 30000, 30000)])
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'image': .*data.max_image_pixels .*\[image_too_large\]"):
        read_jsonl(path)
    recs, rep = read_jsonl(path, skip_invalid=True)
    assert recs == [] or rep.skipped["image_too_large"] == 1
    write_png(str(tmp_path / "small.png"), 20, 10)
    small = write_jsonl(str(tmp_path / "s.jsonl"), [_row("small.png", 20, 10)])
    with pytest.raises(DataError, match=r"20x10 = 200 pixels is over data.max_image_pixels \(100\)"):
        read_jsonl(small, max_image_pixels=100)
    assert len(read_jsonl(small, max_image_pixels=200)[0]) == 1


def test_header_checks_at_read_and_dry_run_skip_and_count(tmp_path):
    """What reading a JSONL (and so --dry-run) checks of each image: it opens, it is the record's size."""
    write_png(str(tmp_path / "ok.png"), 8, 6)
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "a_dir.png").mkdir()
    rows = [_row("ok.png", 8, 6), _row("text.png", 8, 6), _row("ok.png", 9, 6, image_id="wrong size"),
            _row("a_dir.png", 8, 6)]
    path = write_jsonl(str(tmp_path / "d.jsonl"), rows)
    recs, rep = read_jsonl(path, skip_invalid=True)
    assert len(recs) == 1
    assert dict(rep.skipped) == {"bad_image": 1, "image_size_mismatch": 1, "missing_image": 1}
    assert any("is a directory, not an image file" in m for m in rep.skipped_examples)


def _truncated_png(path, size=32):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact, pixel data cut


def test_a_truncated_image_is_skipped_and_counted_under_skip_invalid(tmp_path):
    """The header opens (so reading the JSONL keeps it), the pixels do not: with data.skip_invalid the
    sample is left out of its row and counted; without it, one error naming the file:line."""
    from data.encoding import ChatEncoder, EncodedRecords
    from data.packing import PackedDataset, iterate_batches
    from tests._data_fixtures import image_processor, qwen_tokenizer

    for i in range(3):
        write_png(str(tmp_path / f"{i}.png"), 32, 32)
    _truncated_png(tmp_path / "cut.png")
    path = write_jsonl(str(tmp_path / "d.jsonl"), [_row(f"{i}.png", 32, 32) for i in range(3)] + [_row("cut.png", 32, 32)])
    records, _ = read_jsonl(path)
    assert len(records) == 4
    enc = ChatEncoder(qwen_tokenizer(), image_processor(), prompt="Detect.")
    samples = EncodedRecords(records, enc)
    ds = PackedDataset(samples, max_length=4096, batch_size=4, packing=False, shuffle=False, lengths=samples.lengths())
    batch = next(iterate_batches(ds, 0, skip_invalid=True))
    assert len(batch.segments) == 3 and len(batch.skipped) == 1
    assert "d.jsonl:4" in batch.skipped[0] and "cut.png" in batch.skipped[0]
    assert sorted(s.sample_index for s in batch.segments) == [0, 1, 2]
    ds.set_epoch(0)
    with pytest.raises(DataError, match=r"d.jsonl:4: field 'image': cannot read .*cut.png"):
        next(iterate_batches(ds, 0, skip_invalid=False))


# ---------------------------------------------------------------- JSON / YAML that is too deep or too big


def test_deeply_nested_jsonl_is_one_skippable_error(tmp_path):
    write_png(str(tmp_path / "a.png"), 8, 8)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_row("a.png", 8, 8)) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: field '<line>': JSON nested too deeply .*\[too_deep\]"):
        read_jsonl(str(path))
    recs, rep = read_jsonl(str(path), skip_invalid=True)
    assert len(recs) == 1 and rep.skipped["too_deep"] == 1


def test_deeply_nested_predictions_line_in_eval(tmp_path):
    from configs.errors import InputError
    from eval.detection import read_predictions

    good = {"image_id": "a", "width": 8, "height": 8, "gt": [], "pred": []}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(InputError, match=r"p.jsonl:2: JSON nested too deeply"):
        read_predictions(path)
    got = read_predictions(path, lenient=True)
    assert len(got.records) == 1 and got.lines_skipped == 1


def _bomb(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        levels.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("run:\n  name: x\nnot_a_key:\n" + "".join(f"  {line}\n" for line in levels))
    return path


@pytest.mark.parametrize("content, needle", [
    ("bomb", r"bomb.yaml:\d+: YAML expands to more than 100000 values \(aliases"),
    ("x: " + "[" * 10_000 + "]" * 10_000 + "\n", r"YAML nested too deeply to read"),
    ("".join("  " * i + f"k{i}:\n" for i in range(80)), r"YAML nested more than 64 levels deep"),
    ("run:\n  seed: " + "9" * 50_000 + "\n", r"a value cannot be read: Exceeds the limit"),
])
def test_yaml_that_would_hang_or_overflow_is_one_config_error(tmp_path, content, needle):
    path = _bomb(tmp_path) if content == "bomb" else tmp_path / "c.yaml"
    if content != "bomb":
        path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_an_alias_bomb_in_a_set_value_is_refused_too():
    value = "[&a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"&{c} [" + ", ".join([f"*{p}"] * 10) + "]" for p, c in zip("abcdef", "bcdefg")) + "]"
    with pytest.raises(ConfigError, match=r"^custom.x: --set value .*YAML expands to more than"):
        load_config(STAGE1_DEMO, [f"custom.x={value}"])


def test_a_binary_file_or_a_directory_as_config_is_one_line(tmp_path, capsys):
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 4)
    for path, needle in ((tmp_path / "model.bin", "not a UTF-8 text file (byte 0x80 at offset 128)"),
                         (tmp_path, "is a directory; pass the YAML file inside it")):
        assert run_cli(train_stage1.main, ["--config", str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


# ---------------------------------------------------------------- bounded messages, BOM, long lines


def test_error_lines_are_bounded_whatever_the_value(capsys):
    huge = "y" * 5_000_000
    assert run_cli(train_stage1.main, ["--config", str(STAGE1_DEMO), "--set", f"training.mixed_precision={huge}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training.mixed_precision: ") and len(err) < LINE_CHARS + 200
    assert "more characters" in err


def test_a_huge_value_in_a_jsonl_line_gives_a_bounded_message(tmp_path):
    path = write_jsonl(str(tmp_path / "d.jsonl"), [_row("p" * 1_000_000 + ".png", 8, 8)])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert len(str(info.value)) < LINE_CHARS + 400 and "[missing_image]" in str(info.value)


def test_a_utf8_bom_at_the_start_of_a_jsonl_file_is_accepted(tmp_path):
    write_png(str(tmp_path / "a.png"), 8, 8)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_row("a.png", 8, 8)).encode() + b"\n")
    recs, _ = read_jsonl(str(path))
    assert [r.image_id for r in recs] == ["a.png"]


def test_an_overlong_jsonl_line_is_reported_without_reading_it_whole(tmp_path, monkeypatch):
    import data.records

    monkeypatch.setattr(data.records, "MAX_LINE_BYTES", 1000)
    write_png(str(tmp_path / "a.png"), 8, 8)
    path = tmp_path / "d.jsonl"
    path.write_text("x" * 5000 + "\n" + json.dumps(_row("a.png", 8, 8)) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: .*line is longer than .*\[line_too_long\]"):
        read_jsonl(str(path))
    recs, rep = read_jsonl(str(path), skip_invalid=True)
    assert len(recs) == 1 and recs[0].source.endswith("d.jsonl:2") and rep.skipped["line_too_long"] == 1


# ---------------------------------------------------------------- resume with another model / optimizer


def test_resume_refuses_a_changed_model_or_optimizer_key_and_allows_max_steps(recipe_env, tmp_path, monkeypatch):
    """The damage case: resuming with model.tiny.hidden=32 from a hidden-64 checkpoint trained the checkpoint's
    model without a word; model.freeze.vision gave a raw torch "parameter group size mismatch"."""
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="r", max_steps=1, training__eval_every=0)
    train_stage1.main(argv)
    resume = [*argv, "--set", "training.resume_from=latest", "--set", "training.max_steps=2"]
    for change, needle in ((["model.tiny.hidden=32"], r"model.tiny.hidden: 64 in the checkpoint, 32 now"),
                           (["model.freeze.vision=true"], r"model.freeze.vision: False in the checkpoint, True now"),
                           (["training.lr=0.5", "training.weight_decay=0.5"], r"training.lr: .*training.weight_decay")):
        sets = [a for c in change for a in ("--set", c)]
        with pytest.raises(UserError, match=r"^training.resume_from: checkpoint-1 was trained with other values .*"
                                            + needle + r".*model.name_or_path=.*checkpoint-1/model"):
            train_stage1.main([*resume, *sets])
    train_stage1.main([*resume, "--set", "training.save_every=1", "--set", "data.num_workers=1"])  # allowed changes
    assert (tmp_path / "r" / "checkpoint-2").is_dir()


def test_a_checkpoint_of_another_run_continues_in_a_new_run_dir(recipe_env, tmp_path, monkeypatch):
    """Where the run is written is not a setting of the checkpoint: resume_from may name another run's."""
    monkeypatch.chdir(tmp_path)
    train_stage1.main(recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="a", max_steps=1, training__eval_every=0))
    train_stage1.main(recipe_argv(recipe_env, STAGE1_DEMO, tmp_path / "other", name="b", max_steps=2,
                                  training__eval_every=0, training__resume_from=str(tmp_path / "a" / "checkpoint-1")))
    assert (tmp_path / "other" / "b" / "checkpoint-2").is_dir()
