"""Hostile and unusual image files: every decode is bounded, every failure is one line naming the file,
and the compressed DICOMs a PACS sends are decoded (MONOCHROME1 shown the right way round)."""
from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.encaps import encapsulate

from conftest import ROOT, run_script, write_bomb_jpeg, write_dicom, write_overlay
from core.config import load_config
from core.errors import UserError
from data.images import (
    ImageLimits,
    ImageReadError,
    configure_limits,
    current_limits,
    load_frames,
    load_gray,
    open_image,
    set_limits,
)


def one_line_error(read, path) -> str:
    with pytest.raises(ImageReadError) as err:
        read(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def test_a_bomb_header_is_refused_before_any_pixel_is_decoded(tmp_path):
    bomb = write_bomb_jpeg(tmp_path / "bomb.jpg")
    assert bomb.stat().st_size < 5000
    for read in (open_image, lambda p: load_gray(p, 32), lambda p: open_image(p, size=1)):  # size=1: the scan
        message = one_line_error(read, bomb)
        assert "4225000000 pixels, over the limit of 50000000 (images.max_pixels)" in message


def test_pixel_frame_and_byte_limits_are_errors_not_warnings(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 100), dtype=np.uint8)).save(tmp_path / "a.png")
    write_dicom(tmp_path / "series.dcm", np.zeros((5, 16, 16)))
    set_limits(ImageLimits(max_pixels=9999, max_frames=4))
    # Pillow's warning just over its cap is an error (set_limits), so it is Pillow that refuses it, at open
    message = one_line_error(lambda p: load_gray(p, 32), tmp_path / "a.png")
    assert "10000 pixels, over the limit of 9999 (images.max_pixels)" in message
    assert "5 frames, over the limit of 4" in one_line_error(lambda p: load_frames(p, 8), tmp_path / "series.dcm")
    set_limits(ImageLimits(max_bytes=100))
    for name in ("a.png", "series.dcm"):
        message = one_line_error(lambda p: load_frames(p, 8), tmp_path / name)
        assert "over the limit of 100 (images.max_bytes)" in message
    set_limits(ImageLimits())
    assert load_gray(tmp_path / "a.png", 32).shape == (32, 32) and len(load_frames(tmp_path / "series.dcm", 8)) == 5


def test_the_config_sets_the_limits_and_refuses_nonsense():
    configure_limits(load_config(None, ["images.max_pixels=1234", "images.max_frames=7"]))
    assert current_limits() == ImageLimits(max_pixels=1234, max_frames=7)
    with pytest.raises(UserError, match="images.max_pixels"):
        load_config(None, ["images.max_pixels=0"])


def write_png16(path, width: int, height: int) -> None:
    """A 16-bit grey PNG whose rows are one horizontal ramp 0..65535, written a row at a time (small in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ramp = np.linspace(0, 65535, width).astype(">u2").tobytes()
    z, parts = zlib.compressobj(1), []
    parts.append(z.compress(b"\x00" + ramp))
    same_as_above = b"\x02" + bytes(2 * width)  # PNG filter "Up": every row equals the first
    for _ in range(height - 1):
        parts.append(z.compress(same_as_above))
    parts.append(z.flush())
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def test_a_13000_px_16_bit_png_decodes_under_1_gb(tmp_path):
    path = tmp_path / "giant 16-bit.png"
    write_png16(path, 13000, 13000)  # 169 Mpx: over the default cap, so the site has raised it
    # VmHWM: the peak of this process's own memory (ru_maxrss would also count the parent it was forked from)
    script = ("import json, re, sys\n"
              "from data.images import ImageLimits, load_gray, set_limits\n"
              "set_limits(ImageLimits(max_pixels=200_000_000))\n"
              "out = load_gray(sys.argv[1], 224)\n"
              "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
              "print(json.dumps({'peak_kb': int(peak), 'lo': int(out.min()), 'hi': int(out.max())}))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["peak_kb"] * 1024 < 1 << 30, f"peak {got['peak_kb'] / 1024:.0f} MB"
    assert got["lo"] <= 2 and got["hi"] >= 253  # the ramp's full 16-bit range, stretched (edges are averaged)


def test_a_data_set_with_a_bomb_still_trains_evaluates_and_computes_statistics(tmp_path, tiny_data, capsys):
    data = tmp_path / "data set"
    shutil.copytree(tiny_data, data)
    write_bomb_jpeg(data / sorted(p.name for p in data.iterdir())[0] / "bomb.jpg")
    overlay = write_overlay(tmp_path, data, **{"monitoring.mlflow.enabled": False, "monitoring.tensorboard": False})
    assert run_script("compute_normalization", ["--config", overlay, "--mode", "save"]) == 0
    out = capsys.readouterr().out
    assert "left out 1 unreadable image(s)" in out and "bomb.jpg: " in out and "images.max_pixels" in out
    assert run_script("train", ["--config", overlay, "--model", "resnet18"]) == 0
    assert run_script("evaluate", ["--config", overlay, "--model", "resnet18"]) == 0
    assert "bomb.jpg" not in (tmp_path / "checkpoints" / "resnet18_outputs" / "predictions.csv").read_text()


def test_decoder_failures_are_one_line_each(tmp_path):
    reference = write_dicom(tmp_path / "ref.dcm", np.arange(48 * 48).reshape(48, 48) % 4000)
    broken = pydicom.dcmread(tmp_path / "ref.dcm")
    broken.compress(uid.JPEG2000Lossless)
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(20)])  # a J2K header cut short
    broken.save_as(tmp_path / "broken j2k.dcm")
    short = pydicom.dcmread(tmp_path / "ref.dcm")
    short.PixelData = reference.PixelData[:100]  # fewer pixels than Rows x Columns
    short.save_as(tmp_path / "short.dcm")
    no_pixels = pydicom.dcmread(tmp_path / "ref.dcm")
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "no pixels.dcm")
    (tmp_path / "text.dcm").write_text("not a DICOM file")
    assert "pylibjpeg" in one_line_error(lambda p: load_gray(p, 32), tmp_path / "broken j2k.dcm")
    for name in ("short.dcm", "no pixels.dcm", "text.dcm"):
        one_line_error(lambda p: load_frames(p, 32), tmp_path / name)


def test_an_unsupported_transfer_syntax_is_named(tmp_path):
    write_dicom(tmp_path / "ref.dcm", np.zeros((16, 16)))
    ds = pydicom.dcmread(tmp_path / "ref.dcm")
    ds.file_meta.TransferSyntaxUID = uid.MPEG4HP41
    ds.PixelData = encapsulate([bytes(100)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "video.dcm")
    message = one_line_error(lambda p: load_gray(p, 32), tmp_path / "video.dcm")
    assert f"MPEG-4 AVC/H.264 High Profile / Level 4.1 ({uid.MPEG4HP41}) is not supported" in message


def phantom(size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(3)
    return (np.tile(np.linspace(0, 4000, size), (size, 1)) + rng.integers(0, 60, (size, size))).astype(np.uint16)


@pytest.mark.parametrize("syntax", [uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless])
def test_lossless_compressed_dicoms_decode_like_the_uncompressed_file(tmp_path, syntax):
    write_dicom(tmp_path / "plain.dcm", phantom(), window=(2000, 4000))
    ds = pydicom.dcmread(tmp_path / "plain.dcm")
    ds.compress(syntax)  # pydicom's RLE, pyjpegls, pylibjpeg-openjpeg: a real compressed stream
    ds.save_as(tmp_path / "compressed.dcm")
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(load_gray(tmp_path / "compressed.dcm", 32), load_gray(tmp_path / "plain.dcm", 32))


def test_jpeg_baseline_dicom_decodes(tmp_path):
    pixels = np.tile(np.linspace(0, 255, 48), (48, 1)).astype(np.uint8)
    write_dicom(tmp_path / "x.dcm", pixels, window=(127.5, 255), bits_stored=8, BitsAllocated=8)
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, "JPEG", quality=95)  # what a scanner's 8-bit JPEG export holds
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    got = load_gray(tmp_path / "jpeg.dcm", 48).astype(int)
    assert np.abs(got - pixels).max() <= 3  # JPEG's own loss, nothing more


@pytest.mark.parametrize("window", [(2000, 4000), None])
def test_monochrome1_equals_the_inverted_monochrome2(tmp_path, window):
    pixels = phantom()
    write_dicom(tmp_path / "m2.dcm", pixels, window)
    write_dicom(tmp_path / "m1.dcm", pixels, window, PhotometricInterpretation="MONOCHROME1")
    m2, m1 = load_gray(tmp_path / "m2.dcm", 48), load_gray(tmp_path / "m1.dcm", 48)  # native size: exact
    assert np.array_equal(m1, 255 - m2)
    assert m1[:, 0].mean() > 200  # the lowest stored values are white in MONOCHROME1
    small2, small1 = load_gray(tmp_path / "m2.dcm", 32).astype(int), load_gray(tmp_path / "m1.dcm", 32).astype(int)
    assert np.abs(small1 - (255 - small2)).max() <= 1  # resized: the same up to the resize's rounding


def test_a_multi_frame_rgb_dicom_gives_a_grey_record_per_frame(tmp_path):
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    frames[0, ..., 0], frames[1, ..., 2] = 255, 90
    write_dicom(tmp_path / "colour.dcm", np.zeros((2, 16, 16)), SamplesPerPixel=3, PhotometricInterpretation="RGB",
                PlanarConfiguration=0, BitsAllocated=8, BitsStored=8, HighBit=7, PixelData=frames.tobytes())
    (name1, first), (name2, second) = load_frames(tmp_path / "colour.dcm", 8)
    assert name2.endswith("#frame=2") and first.shape == second.shape == (8, 8)


def test_configure_limits_bounds_the_decoders_of_the_process(tmp_path):
    """An entry point's one call applies its config's images: section; loading a config alone sets nothing."""
    Image.new("L", (400, 400)).save(tmp_path / "big.png")
    cfg = load_config(None, ["images.max_pixels=10000"])
    assert load_gray(tmp_path / "big.png", 32).shape == (32, 32)  # loaded, not yet applied
    configure_limits(cfg)
    with pytest.raises(ImageReadError, match="images.max_pixels"):
        load_gray(tmp_path / "big.png", 32)
    configure_limits(load_config(None, []))  # the defaults again
    assert load_gray(tmp_path / "big.png", 32).shape == (32, 32)


PROCESS_STATE = """
import json, warnings
import matplotlib
from PIL import Image
def state():
    bomb = [f[0] for f in warnings.filters if f[2] is Image.DecompressionBombWarning]
    return [bomb, Image.MAX_IMAGE_PIXELS, matplotlib.rcParams._get_backend_or_none()]
before = state()
import data.images, evaluation.plots, core.config
core.config.load_config(None, [])
after = state()
print(json.dumps([before, after]))
"""


def test_importing_the_decoders_and_plots_changes_no_process_state():
    """Importing the image loader and the figures (and loading a config) leaves the process as it was: warnings
    filters, Pillow's pixel cap and matplotlib's backend are set only by an entry point's explicit call."""
    done = subprocess.run([sys.executable, "-c", PROCESS_STATE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout.splitlines()[-1])
    assert after == before
