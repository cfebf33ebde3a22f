"""The one image loader: every mode a user may hand us, and every kind of bad file."""
import numpy as np
import pytest
from PIL import Image

from conftest import write_dicom
from data.images import ImageReadError, load_frames, load_gray, open_image


def gradient(size=40):
    return np.tile(np.linspace(0, 255, size, dtype=np.float64), (size, 1))


def test_grayscale_rgb_palette_cmyk_agree(tmp_path):
    gray = gradient().astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(gray).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(gray).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(tmp_path / "p.png")
    Image.fromarray(gray).convert("CMYK").save(tmp_path / "c.tif")
    ref = load_gray(tmp_path / "g.png", 40)
    for name in ("rgb.png", "p.png", "c.tif"):
        out = load_gray(tmp_path / name, 40)
        assert out.dtype == np.uint8 and out.shape == (40, 40)
        assert np.abs(out.astype(int) - ref).max() <= 3, name


def test_sixteen_bit_png_uses_its_full_range(tmp_path):
    arr = (gradient() * 16).astype(np.uint16)  # 12-bit data stored in 16 bits, as MRI exports often are
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = load_gray(tmp_path / "deep.png", 40)
    assert out.min() == 0 and out.max() == 255


def test_rgba_transparent_background_is_black(tmp_path):
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[5:15, 5:15, 3] = 255  # opaque white square, transparent (white) elsewhere
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_gray(tmp_path / "a.png", 20)
    assert out[0, 0] == 0 and out[10, 10] == 255


def test_resize_and_spaces_in_path(tmp_path):
    folder = tmp_path / "with space" / "brain tumor"
    folder.mkdir(parents=True)
    Image.fromarray(gradient(512).astype(np.uint8)).save(folder / "scan 1.jpg")
    assert load_gray(folder / "scan 1.jpg", 64).shape == (64, 64)


def full_decode(path, size):
    """A full-resolution decode, then the one resize: what the fast JPEG path must stay close to."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=int)


@pytest.mark.parametrize("size", [224, 64])
def test_large_jpeg_decoded_at_reduced_scale_stays_within_resize_rounding(tmp_path, size):
    from data.synthetic import CLASS_FOLDERS, render_slice

    pixels = render_slice(CLASS_FOLDERS[0], np.random.default_rng(0), 512)
    Image.fromarray(pixels).save(tmp_path / "l.jpg", quality=90)
    Image.fromarray(pixels).convert("RGB").save(tmp_path / "rgb.jpg", quality=90)
    with Image.open(tmp_path / "l.jpg") as img:
        img.draft("L", (size, size))
        assert img.size[0] < 512  # libjpeg really decodes at a smaller scale here
    fast = load_gray(tmp_path / "l.jpg", size).astype(int)
    diff = np.abs(fast - full_decode(tmp_path / "l.jpg", size))
    # 1/8-scale DCT decoding averages 8x8 blocks, a box filter, where the resize is a wider triangle:
    # sharp edges differ by up to ~16 levels, the image as a whole by 1-2
    assert diff.mean() < 2.5 and np.percentile(diff, 99) <= 16
    # a colour-encoded grey JPEG (what most MRI exports are) decodes to the same pixels as a grey one
    assert np.abs(load_gray(tmp_path / "rgb.jpg", size).astype(int) - fast).max() <= 1


def test_jpeg_at_its_own_size_is_decoded_exactly(tmp_path):
    Image.fromarray(gradient(64).astype(np.uint8)).convert("RGB").save(tmp_path / "g.jpg", quality=95)
    assert np.array_equal(load_gray(tmp_path / "g.jpg", 64), full_decode(tmp_path / "g.jpg", 64))


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "garbage"])
def test_bad_files_raise_image_read_error_with_path(tmp_path, kind):
    path = tmp_path / f"bad {kind}.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image")
    elif kind == "garbage":
        path.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    else:
        Image.fromarray(gradient(256).astype(np.uint8)).save(path, quality=95)
        path.write_bytes(path.read_bytes()[:600])
    for read in (open_image, lambda p: load_gray(p, 32)):  # the reduced-scale JPEG decode sees it too
        with pytest.raises(ImageReadError) as err:
            read(path)
        assert str(path) in str(err.value)


def test_dicom_uses_window(tmp_path):
    write_dicom(tmp_path / "x.dcm", gradient(32) * 8, window=(1020, 1000), bits_stored=16)
    out = load_gray(tmp_path / "x.dcm", 32)
    assert out[:, 0].max() == 0 and out[:, -1].min() == 255  # values beyond the window saturate


def test_each_frame_of_a_multi_frame_dicom_is_its_own_image(tmp_path):
    frames = np.stack([gradient(32) * 8, (255 - gradient(32)) * 8, np.full((32, 32), 700)])
    path = tmp_path / "cine series.dcm"
    write_dicom(path, frames, window=(1020, 1000), bits_stored=16)
    got = load_frames(path, 16)
    assert [name for name, _ in got] == [f"{path}#frame={k}" for k in (1, 2, 3)]
    assert not np.array_equal(got[0][1], got[1][1])
    for name, image in got:  # a record name reads back the same pixels, frame by frame
        assert np.array_equal(load_gray(name, 16), image)
    with pytest.raises(ImageReadError, match="3 frames"):  # never silently its first frame
        load_gray(path, 16)
    with pytest.raises(ImageReadError, match="no frame 4"):
        load_gray(f"{path}#frame=4", 16)


def test_a_single_image_is_one_record_named_by_its_path(tmp_path):
    write_dicom(tmp_path / "one.dcm", gradient(32) * 8)
    Image.fromarray(gradient(32).astype(np.uint8)).save(tmp_path / "one.png")
    for name in ("one.dcm", "one.png"):
        (record, image), = load_frames(tmp_path / name, 16)
        assert record == str(tmp_path / name) and image.shape == (16, 16)

