"""Questions with `<image>` placeholders, as the model card writes them.

Owns: the placeholder strings and the helpers that build multi-image and video questions, and
`first_round_question` (what ChatSession sends in round 1 so that history carries the placeholders).
Does not own: placeholder expansion into `<img><IMG_CONTEXT>...</img>`: the server does that.

The card's two ways to send several images:
- combined: one `<image>` for all of them (`num_patches_list` omitted): one block of 256*N tokens;
- separate: `Image-1: <image>\\nImage-2: <image>\\n{question}`, one image per placeholder.
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def combined_images_question(question: str) -> str:
    """`<image>\\n{question}`: all images in one block (what the server does on its own in round 1)."""
    return f"{IMAGE_PLACEHOLDER}\n{question}"


def separate_images_question(question: str, num_images: int) -> str:
    """`Image-1: <image>\\nImage-2: <image>\\n...{question}`: one placeholder per image (the card's form)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    prefix = "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images))
    return prefix + question


def video_question(question: str, num_frames: int) -> str:
    """`Frame1: <image>\\n...FrameK: <image>\\n{question}`: the card's video prefix, one frame each."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    prefix = "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames))
    return prefix + question


def first_round_question(
    question: str, *, num_images: int = 0, separate: bool = False, video_frames: int = 0
) -> str:
    """The question of a conversation's first round with its placeholders written out.

    As the card's chat does: with images and no `<image>` in the question, prepend `<image>\\n`
    (or the `Image-i:` lines when `separate`); with a video, prepend the `FrameK:` lines.
    A question that already holds placeholders is returned unchanged.
    """
    if count_placeholders(question):
        return question
    if video_frames:
        return video_question(question, video_frames)
    if num_images == 0:
        return question
    if separate and num_images > 1:
        return separate_images_question(question, num_images)
    return combined_images_question(question)
