"""internvl_serve.imageproc: the card's pixel path (vs transformers' CLIPImageProcessor), decoding of
untrusted image bytes, and the card's video frame sampling."""

from __future__ import annotations

import io
import json
import resource
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from fault_probe import PREPROCESS_HEAP, run_probe
from internvl_serve.imageproc import (
    InvalidImage, InvalidVideo, PreprocessorConfig, decode_image, get_frame_indices, load_preprocessor_config,
    image_size, sample_video_frames, to_pixel_values, to_tile, video_frame_size,
)

V1_1_PREPROCESSOR = {  # the checkpoint's preprocessor_config.json (model sheet section 4)
    "crop_size": 448, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 448,
}


@pytest.fixture(scope="module")
def preprocessor_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preprocessor")
    (folder / "preprocessor_config.json").write_text(json.dumps(V1_1_PREPROCESSOR))
    return folder


def sample_images() -> list[Image.Image]:
    r = np.random.RandomState(0)
    images = [Image.fromarray(r.randint(0, 256, (h, w, 3), dtype=np.uint8))
              for w, h in [(448, 448), (640, 480), (300, 500), (1, 1), (17, 999), (449, 447)]]
    x = np.linspace(0, 255, 800)
    gradient = np.stack(np.meshgrid(x, x[:600]) + [np.full((600, 800), 128.0)], -1).astype(np.uint8)
    images.append(Image.fromarray(gradient))
    images.append(Image.fromarray(r.randint(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA"))
    images.append(Image.fromarray(r.randint(0, 256, (50, 70), dtype=np.uint8), "L"))
    return images


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ---- pixel values --------------------------------------------------------------------------------------
def test_matches_clip_image_processor_exactly(preprocessor_dir):
    """The card: img.convert('RGB').resize((448, 448)) then CLIPImageProcessor.from_pretrained(path)."""
    import transformers
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = cls.from_pretrained(preprocessor_dir)
    size, mean, std = load_preprocessor_config(preprocessor_dir)
    images = sample_images()
    ours = to_pixel_values(images, size=size, mean=mean, std=std)
    assert ours.shape == (len(images), 3, 448, 448) and ours.dtype == np.float32
    for i, img in enumerate(images):
        card = processor(images=img.convert("RGB").resize((448, 448)), return_tensors="np").pixel_values
        card = np.asarray(card)
        assert card.shape == (1, 3, 448, 448)
        assert np.array_equal(ours[i], card[0]), (i, float(np.abs(ours[i] - card[0]).max()))
    reused = np.full((len(images) + 1) * 3 * 448 * 448, np.nan, dtype=np.float32)[:ours.size].reshape(ours.shape)
    assert to_pixel_values(images, size=size, mean=mean, std=std, out=reused) is reused  # a reused buffer
    assert np.array_equal(reused.view(np.uint32), ours.view(np.uint32))                  # the same bits


def test_pixel_values_into_a_wrong_out_are_refused():
    images = sample_images()[:2]
    for out in (np.empty((1, 3, 448, 448), np.float32), np.empty((2, 3, 448, 448), np.float64),
                np.empty((2, 448, 3, 448), np.float32).transpose(0, 2, 1, 3)):
        with pytest.raises(ValueError, match="out must be a writeable C-contiguous float32 array of shape"):
            to_pixel_values(images, out=out)


def test_clip_resize_and_crop_are_no_ops_at_448():
    """What makes our shortcut valid: at 448x448, PIL's bicubic resize to 448 returns the same pixels."""
    img = sample_images()[1].convert("RGB").resize((448, 448))
    assert np.array_equal(np.asarray(img.resize((448, 448), Image.Resampling.BICUBIC)), np.asarray(img))


def test_pixel_values_normalisation_by_hand():
    img = Image.new("RGB", (10, 20), (255, 0, 128))
    out = to_pixel_values([img], size=448)
    want = (np.array([1.0, 0.0, 128 / 255]) - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(out[0, :, 0, 0], want, atol=1e-6)
    assert np.allclose(out[0], out[0, :, :1, :1])  # a solid image stays solid
    assert to_pixel_values([], size=448).shape == (0, 3, 448, 448)


def test_load_preprocessor_config(preprocessor_dir, tmp_path):
    cfg = load_preprocessor_config(preprocessor_dir)
    assert cfg == PreprocessorConfig(448, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    size, mean, std = cfg
    assert size == 448
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**V1_1_PREPROCESSOR, "crop_size": 224}))
    with pytest.raises(ValueError, match="crop_size 224 != size 448"):
        load_preprocessor_config(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**V1_1_PREPROCESSOR, "resample": 2}))
    with pytest.raises(ValueError, match="resample=2"):
        load_preprocessor_config(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        load_preprocessor_config(tmp_path / "nowhere")


# ---- decoding --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, mode, kw", [
    ("JPEG", "RGB", {"quality": 90}), ("JPEG", "L", {}), ("JPEG", "CMYK", {}),
    ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}), ("PNG", "LA", {}), ("PNG", "I;16", {}),
    ("PNG", "1", {}), ("WEBP", "RGB", {"lossless": True}), ("WEBP", "RGBA", {"lossless": True}),
    ("BMP", "RGB", {}), ("TIFF", "RGB", {}), ("TIFF", "CMYK", {}), ("GIF", "P", {}),
])
def test_decode_formats_and_modes_like_convert_rgb(fmt, mode, kw):
    r = np.random.RandomState(1)
    base = Image.fromarray(r.randint(0, 256, (40, 60, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((r.randint(0, 65536, (40, 60))).astype(np.uint16))
    else:
        img = base.convert(mode)
    data = encode(img, fmt, **kw)
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (60, 40)
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    out = np.asarray(decode_image(data))
    assert tuple(out[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_are_their_first_frame(fmt):
    # decided: an animation is not refused; its first frame is the image (the card's PIL open + convert)
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for _ in range(3)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = np.asarray(decode_image(data))
    assert np.array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    if fmt != "GIF":  # lossless formats: exactly the first frame's pixels (GIF quantizes to a palette)
        assert np.array_equal(out, np.asarray(frames[0]))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny (truncated) IDAT: no pixel memory needed to read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, this is not an image at all", "not a supported image"),
    (b"\x89PNG\r\n\x1a\n", "not a supported image|corrupt"),
])
def test_decode_rejects_non_images(data, message):
    with pytest.raises(InvalidImage, match=message):
        decode_image(data)


def test_decode_rejects_non_bytes():
    with pytest.raises(InvalidImage, match="must be bytes"):
        decode_image("a string")  # type: ignore[arg-type]


def test_decode_rejects_unsupported_formats():
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    for fmt in ("PPM", "TGA", "PCX"):
        with pytest.raises(InvalidImage, match="not a supported image"):
            decode_image(encode(img, fmt))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_decode_rejects_truncated(fmt):
    r = np.random.RandomState(2)
    data = encode(Image.fromarray(r.randint(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(InvalidImage, match="corrupt|truncated|not a supported image"):
        decode_image(data[: len(data) // 2])


def test_decode_rejects_corrupt_body():
    r = np.random.RandomState(3)
    data = bytearray(encode(Image.fromarray(r.randint(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG"))
    data[100:140] = b"\xff" * 40  # inside the IDAT: zlib / CRC failure
    with pytest.raises(InvalidImage, match="corrupt"):
        decode_image(bytes(data))


@pytest.fixture
def decoded(monkeypatch):
    """Counts images whose pixels PIL decodes (ImageFile.load calls)."""
    from PIL import ImageFile

    calls = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(self.size) or real(self))
    return calls


def test_decode_rejects_too_many_pixels_before_decoding(decoded):
    with pytest.raises(InvalidImage, match="8000x6000 = 48000000 pixels, above the limit of 1000000"):
        decode_image(png_header_only(8000, 6000), max_pixels=1_000_000)
    # within our limit but above PIL's own decompression-bomb threshold (2 * 89.5M pixels)
    with pytest.raises(InvalidImage, match=r"header says 400000000 pixels, above the limit of \d+ pixels"):
        decode_image(png_header_only(20000, 20000), max_pixels=10**12)
    # a header claiming 100000 x 100000: PIL refuses it on open; the message gives our limit
    with pytest.raises(InvalidImage, match="^image header says 10000000000 pixels, above the limit of 36000000 "
                                           r"pixels \(nothing was decoded\)$"):
        decode_image(png_header_only(100_000, 100_000), max_pixels=36_000_000)
    assert decoded == []  # refused from the headers: nothing was decoded
    # the limit is inclusive and applies to the pixel count
    ok = encode(Image.new("RGB", (100, 10)), "PNG")
    assert decode_image(ok, max_pixels=1000).size == (100, 10)
    with pytest.raises(InvalidImage, match="above the limit of 999"):
        decode_image(ok, max_pixels=999)


# ---- video -------------------------------------------------------------------------------------------------
def test_get_frame_indices_card_values():
    # whole video: 300 frames at 30 fps, 8 segments of 37.375 frames; np.round(149.5) == 150 (to even)
    assert get_frame_indices(None, 30.0, 299, num_segments=8) == [18, 55, 93, 130, 168, 205, 242, 280]
    # bound (1 s, 2 s) at 10 fps -> frames 10..20 in 4 segments of 2.5; np.round(2.5) == 2, np.round(7.5) == 8
    assert get_frame_indices((1.0, 2.0), 10.0, 99, num_segments=4) == [11, 13, 16, 19]
    # bound past the end is clipped to max_frame; first_idx raises the start
    assert get_frame_indices((0, 1000), 10.0, 19, first_idx=4, num_segments=3) == [6, 11, 16]
    # more segments than frames repeats frames (the card does not refuse)
    assert get_frame_indices(None, 10.0, 1, num_segments=4) == [0, 0, 0, 1]


def test_sample_video_frames(tiny_video_bytes, tiny_video_frame_colors, tmp_path):
    frames = sample_video_frames(tiny_video_bytes, num_segments=4)
    want = get_frame_indices(None, 10.0, 19, num_segments=4)
    assert want == [2, 7, 12, 16]
    assert [f.size for f in frames] == [(64, 48)] * 4 and all(f.mode == "RGB" for f in frames)
    for frame, index in zip(frames, want):
        mean = np.asarray(frame, dtype=np.float64).reshape(-1, 3).mean(0)
        assert np.abs(mean - tiny_video_frame_colors[index]).max() < 4, (index, mean)
    path = tmp_path / "v.avi"
    path.write_bytes(tiny_video_bytes)
    from_path = sample_video_frames(path, num_segments=4)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, from_path))
    eight = sample_video_frames(tiny_video_bytes)  # the card's num_segments=8
    assert len(eight) == 8
    bounded = sample_video_frames(tiny_video_bytes, num_segments=2, bound=(1.0, 1.5))  # frames 10..15
    means = [np.asarray(f, dtype=np.float64).reshape(-1, 3).mean(0) for f in bounded]
    for mean, index in zip(means, get_frame_indices((1.0, 1.5), 10.0, 19, num_segments=2)):
        assert np.abs(mean - tiny_video_frame_colors[index]).max() < 4


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"\x00\x01 definitely not a video" * 10, "could not be decoded"),
])
def test_sample_video_rejects_bad_data(data, message):
    with pytest.raises(InvalidVideo, match=message):
        sample_video_frames(data)


def test_sample_video_rejects_bad_arguments(tiny_video_bytes, tmp_path):
    with pytest.raises(InvalidVideo, match="num_segments must be >= 1"):
        sample_video_frames(tiny_video_bytes, num_segments=0)
    with pytest.raises(InvalidVideo, match="does not exist"):
        sample_video_frames(tmp_path / "missing.mp4")
    with pytest.raises(InvalidVideo, match="above the limit of 100 pixels"):
        sample_video_frames(tiny_video_bytes, max_pixels=100)
    with pytest.raises(InvalidVideo, match="above the limit of 100 pixels"):
        sample_video_frames(tiny_video_bytes, max_pixels=100, isolate=False)


def test_a_decoder_crash_becomes_invalid_video(tiny_video_bytes):
    """decord segfaults on this truncated AVI; the forked decoder turns that into InvalidVideo."""
    with pytest.raises(InvalidVideo, match="crashed|could not be decoded"):
        sample_video_frames(tiny_video_bytes[: len(tiny_video_bytes) // 8])
    frames = sample_video_frames(tiny_video_bytes, num_segments=2)  # and the next call still works
    assert len(frames) == 2


def test_isolated_and_in_process_decoding_agree(tiny_video_bytes):
    a = sample_video_frames(tiny_video_bytes, num_segments=3)
    b = sample_video_frames(tiny_video_bytes, num_segments=3, isolate=False)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


# ---- cost bounded before decoding ------------------------------------------------------------------------
def one_bit_png(width: int, height: int) -> bytes:
    """A 1-bit PNG: a few KiB on the wire for millions of pixels in memory once decoded."""
    return encode(Image.new("1", (width, height), 1), "PNG")


def test_image_size_reads_only_the_header(decoded):
    data = one_bit_png(6000, 6000)
    assert len(data) < 100_000
    assert image_size(data, max_pixels=36_000_000) == (6000, 6000)
    with pytest.raises(InvalidImage, match="6000x6000 = 36000000 pixels, above the limit of 1000"):
        image_size(data, max_pixels=1000)
    with pytest.raises(InvalidImage, match="not a supported image"):
        image_size(b"nope")
    assert decoded == []


def test_to_tile_is_the_card_resize_and_a_fixed_point():
    img = Image.fromarray(np.random.RandomState(5).randint(0, 256, (300, 500, 3), dtype=np.uint8))
    tile = to_tile(img, 448)
    assert tile.size == (448, 448) and tile.mode == "RGB"
    assert np.array_equal(to_pixel_values([img]), to_pixel_values([tile]))  # resizing a tile changes nothing


def mp4_header(width: int, height: int) -> bytes:
    def box(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I4s", 8 + len(body), kind) + body
    tkhd = box(b"tkhd", bytes(76) + struct.pack(">II", width << 16, height << 16))
    avc1 = struct.pack(">I4s", 86, b"avc1") + bytes(24) + struct.pack(">HH", width, height) + bytes(50)
    stsd = box(b"stsd", bytes(4) + struct.pack(">I", 1) + avc1)
    trak = box(b"trak", tkhd + box(b"mdia", box(b"minf", box(b"stbl", stsd))))
    return box(b"ftyp", b"isom" + bytes(4)) + box(b"moov", trak) + box(b"mdat", b"\0" * 32)


def test_video_frame_size_from_the_container_header(tiny_video_bytes):
    assert video_frame_size(tiny_video_bytes) == (64, 48)  # AVI: avih and strf
    assert video_frame_size(mp4_header(12000, 12000)) == (12000, 12000)
    assert video_frame_size(mp4_header(1920, 1080)[:60]) is None  # truncated before any size
    assert video_frame_size(b"\x1aE\xdf\xa3 matroska") is None  # a container it does not read


def test_video_refused_from_its_header_before_any_frame_is_decoded(tiny_video_bytes, monkeypatch):
    import decord

    frames = []
    real = decord.VideoReader.__getitem__
    monkeypatch.setattr(decord.VideoReader, "__getitem__", lambda self, i: frames.append(i) or real(self, i))
    with pytest.raises(InvalidVideo, match=r"^video frames are 64x48, above the limit of 100 pixels "
                                           r"\(from the header; nothing was decoded\)$"):
        sample_video_frames(tiny_video_bytes, max_pixels=100, isolate=False)
    with pytest.raises(InvalidVideo, match=r"^4 video frames of 64x48 are 12288 pixels, above the request's limit "
                                           r"of 12287 pixels \(from the header"):
        sample_video_frames(tiny_video_bytes, num_segments=4, max_total_pixels=12287, isolate=False)
    assert frames == []
    assert len(sample_video_frames(tiny_video_bytes, num_segments=4, max_total_pixels=12288, isolate=False)) == 4
    assert len(frames) == 4


def test_frames_come_back_as_tiles_when_asked(tiny_video_bytes):
    full = sample_video_frames(tiny_video_bytes, num_segments=3)
    tiles = sample_video_frames(tiny_video_bytes, num_segments=3, resize_to=448)
    assert [t.size for t in tiles] == [(448, 448)] * 3
    assert np.array_equal(to_pixel_values(full), to_pixel_values(tiles))


def test_a_video_whose_header_lies_cannot_take_the_memory(tiny_video_bytes):
    """Frames of 6000x6000 behind headers that say 64x48: the header check passes; the decoder's capped
    address space (24 bytes per allowed pixel + 256 MiB) runs out before a frame's ~1 GB is built."""
    from conftest import make_mjpeg_avi

    big = make_mjpeg_avi([Image.new("RGB", (6000, 6000), (10, 200, 30))] * 2, fps=10)
    lying = big.replace(struct.pack("<II", 6000, 6000), struct.pack("<II", 64, 48))
    assert video_frame_size(lying) == (64, 48)
    with pytest.raises(InvalidVideo, match="crashed|could not be decoded|larger than their header"):
        sample_video_frames(lying, num_segments=1, max_pixels=64 * 48)


def png_probe_images() -> str:
    return """
import io
import numpy as np
from PIL import Image

def png(seed):  # a new 448x448 image per seed
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (448, 448, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()

images = [png(seed) for seed in range(8)]
"""


FAULT_PROBE = PREPROCESS_HEAP + png_probe_images() + """
from internvl_serve.imageproc import decode_image, to_pixel_values, to_tile

to_pixel_values([to_tile(decode_image(images[0]))])
before = faults()
for data in images[1:]:  # a caller's own arrays, one image at a time
    to_pixel_values([to_tile(decode_image(data))])
print((faults() - before) / (len(images) - 1))
"""


def test_pixel_values_touch_little_more_than_their_output():
    """In the preprocess stub each buffer from 1 MiB is a fresh mapping (serving/heap.py), so every
    temporary of that size page-faults anew on each request. A tile's float32 output is 2.4 MB (588
    pages of 4 KiB); numpy's take() widened the uint8 indices to int64 first (three 1.6 MB copies,
    ~2,350 faults a tile in all). Counted in a fresh interpreter, as minor page faults per image (decode,
    tile, pixel values into a new array)."""
    output_pages = 3 * 448 * 448 * 4 / resource.getpagesize()
    per_image = float(run_probe(FAULT_PROBE))
    assert per_image < 1.25 * output_pages, (per_image, output_pages)


ADAPTER_PROBE = PREPROCESS_HEAP + png_probe_images() + """
import sys
from internvl_serve.serving.parsing import parse_chat_request
from internvl_serve.serving.preprocess import Preprocessor

preprocessor = Preprocessor(sys.argv[1])

def request(data):  # what the adapter does with a request's inputs (read_inputs: object arrays of bytes)
    inputs = {"text_input": np.array([b"<image>\\nDescribe the image."], dtype=object),
              "images": np.array([data], dtype=object)}
    return preprocessor(parse_chat_request(inputs), output_slot=0).pixel_values

for data in images[:2]:  # warm-up
    request(data)
before = faults()
for data in images[2:]:
    request(data)
print((faults() - before) / (len(images) - 2))
"""


def test_the_adapters_pixel_values_of_new_images_fault_in_few_pages(tiny_checkpoint):
    """The preprocess adapter's path (parse, Preprocessor with an output slot) puts each request's pixel
    values into a reused buffer, so a new image faults in far fewer pages than its 2.4 MB of pixel values
    (a new array per request: ~590 faults for the output alone, under the stub's heap setting)."""
    output_pages = 3 * 448 * 448 * 4 / resource.getpagesize()
    per_image = float(run_probe(ADAPTER_PROBE, tiny_checkpoint))
    assert per_image < output_pages / 4, (per_image, output_pages)
