"""Images and videos -> bytes; questions with placeholders (no server)."""

import io

import pytest

from internvl_client import combined_images_question, encode_image, encode_video, separate_images_question, video_question
from internvl_client.media import decode_data_url, encode_images, guess_mime, to_data_url
from internvl_client.question import count_placeholders, first_round_question

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bytes_are_sent_as_they_are():
    data = b"\xff\xd8\xff\xe0 not really a jpeg"
    assert encode_image(data) == data
    assert encode_image(bytearray(data)) == data
    assert encode_image(memoryview(data)) == data


def test_paths_are_read_unchanged(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"\xff\xd8\xffJPEGDATA")
    assert encode_image(path) == b"\xff\xd8\xffJPEGDATA"
    assert encode_image(str(path)) == b"\xff\xd8\xffJPEGDATA"


def test_missing_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found"):
        encode_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        encode_image(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="empty"):
        encode_image(b"")


def test_pil_images_are_encoded_to_lossless_png():
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    data = encode_image(Image.fromarray(pixels))
    assert data.startswith(PNG_MAGIC)
    back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (back == pixels).all()  # lossless: what the server decodes is what the caller had


def test_pil_image_in_unusual_mode_is_converted():
    Image = pytest.importorskip("PIL.Image")
    img = Image.new("CMYK", (4, 4), (0, 128, 0, 0))
    assert encode_image(img).startswith(PNG_MAGIC)


def test_unsupported_types():
    with pytest.raises(TypeError, match="unsupported image type"):
        encode_image(12)
    with pytest.raises(TypeError, match="unsupported video type"):
        encode_video(3.5)


def test_encode_images_accepts_one_or_many(tmp_path):
    assert encode_images(None) == []
    assert encode_images(b"a") == [b"a"]
    assert encode_images([b"a", b"b"]) == [b"a", b"b"]
    (tmp_path / "i.png").write_bytes(b"png")
    assert encode_images(str(tmp_path / "i.png")) == [b"png"]


def test_data_urls_round_trip():
    data = PNG_MAGIC + b"rest"
    url = to_data_url(data)
    assert url.startswith("data:image/png;base64,")
    assert decode_data_url(url) == data
    assert encode_image(url) == data
    with pytest.raises(ValueError, match="base64"):
        decode_data_url("data:image/png,rawdata")


def test_guess_mime():
    assert guess_mime(PNG_MAGIC) == "image/png"
    assert guess_mime(b"\xff\xd8\xff\xdb") == "image/jpeg"
    assert guess_mime(b"GIF89a...") == "image/gif"
    assert guess_mime(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert guess_mime(b"??") == "application/octet-stream"


def test_video_bytes_and_paths(tmp_path):
    assert encode_video(b"\x00\x00\x00\x18ftypmp42") == b"\x00\x00\x00\x18ftypmp42"
    (tmp_path / "v.mp4").write_bytes(b"mp4")
    assert encode_video(tmp_path / "v.mp4") == b"mp4"


# ---- questions --------------------------------------------------------------------------------


def test_separate_images_question_is_the_cards_form():
    assert separate_images_question("Describe the two images.", 2) == (
        "Image-1: <image>\nImage-2: <image>\nDescribe the two images."
    )
    with pytest.raises(ValueError):
        separate_images_question("q", 0)


def test_combined_and_video_questions():
    assert combined_images_question("What is it?") == "<image>\nWhat is it?"
    assert video_question("What is the panda doing?", 3) == (
        "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat is the panda doing?"
    )
    assert count_placeholders(video_question("q", 8)) == 8


def test_first_round_question():
    assert first_round_question("q") == "q"
    assert first_round_question("q", num_images=1) == "<image>\nq"
    assert first_round_question("q", num_images=2) == "<image>\nq"  # combined: one block
    assert first_round_question("q", num_images=2, separate=True) == "Image-1: <image>\nImage-2: <image>\nq"
    assert first_round_question("q", num_images=1, separate=True) == "<image>\nq"
    assert first_round_question("q", video_frames=2) == "Frame1: <image>\nFrame2: <image>\nq"
    # placeholders already written by the caller are left alone
    assert first_round_question("look: <image> here", num_images=1) == "look: <image> here"
