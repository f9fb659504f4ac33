"""A multi-round conversation about a fixed set of images (or one video), like the card's
`model.chat(..., history=history, return_history=True)` loop.

Owns: the history and the conversation's media across rounds, the first round's placeholders, and
save/load as JSON (media stored base64). Does not own: the transport (Client / AsyncClient).

The server is stateless: every round sends the images (or the video) again with the whole history.
As the card does, round 1's question gets `<image>\\n` (or `Image-i: <image>` lines) written into it,
and a video's round 1 is recorded with its `FrameK: <image>` lines (which the server writes), so the
history's first question carries the placeholders and later rounds expand the same images at the
same place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .media import ImageLike, VideoLike, b64decode, b64encode, encode_images, encode_video
from .question import count_placeholders, first_round_question, video_question
from .request import ChatResponse, merge_generation

SESSION_FORMAT = "internvl-chat-session"
SESSION_VERSION = 1


class ChatSession:
    """Conversation state over a `Client` (sync).

    >>> session = ChatSession(client, images=["cat.png"], generation_config=dict(max_new_tokens=128))
    >>> session.ask("What is in the image?")
    >>> for delta in session.ask_stream("And what colour is it?"):
    ...     print(delta, end="", flush=True)

    `separate_images=True` writes the card's `Image-1: <image>\\nImage-2: <image>\\n` prefix (one image
    per placeholder) instead of one `<image>` for all images. Rounds that did not finish (an exception,
    or a stream left early) are not added to the history.
    """

    def __init__(
        self,
        client: Any,
        images: ImageLike | Sequence[ImageLike] | None = None,
        video: VideoLike | None = None,
        *,
        num_segments: int = 8,
        separate_images: bool = False,
        num_patches_list: Sequence[int] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        history: Sequence[Sequence[str]] | None = None,
    ):
        self.client = client
        self.images: list[bytes] = encode_images(images)
        self.video: bytes | None = None if video is None else encode_video(video)
        if self.images and self.video is not None:
            raise ValueError("a session has images or a video, not both")
        self.num_segments = num_segments
        self.separate_images = separate_images
        self.num_patches_list = None if num_patches_list is None else list(num_patches_list)
        self.generation_config = None if generation_config is None else dict(generation_config)
        self.history: list[tuple[str, str]] = [(q, a) for q, a in (history or [])]
        self.last_response: ChatResponse | None = None

    # ---- rounds ---------------------------------------------------------------------------
    def round_question(self, question: str) -> tuple[str, str]:
        """(the question as sent this round, the question as recorded in the history).

        Round 1 with images: `<image>\\n` (or the `Image-i:` lines) written in, sent and recorded.
        Round 1 with a video: sent as is (the server prefixes the `FrameK: <image>` lines of the frames
        it sampled, as it does whenever the history holds no placeholder) and recorded with that prefix,
        the question the card's history holds. Later rounds: unchanged.
        """
        if self.history:
            return question, question
        if self.video is not None:
            if count_placeholders(question):
                raise ValueError("with a video, the server writes the frame placeholders: leave <image> out")
            return question, video_question(question, self.num_segments)
        sent = first_round_question(question, num_images=len(self.images), separate=self.separate_images)
        return sent, sent

    def _request_kwargs(self, question: str, generation_config: Mapping[str, Any] | None) -> dict:
        return dict(
            question=question,
            images=self.images or None,
            video=self.video,
            history=list(self.history),
            num_patches_list=self.num_patches_list,
            generation_config=merge_generation(self.generation_config, generation_config),
            num_segments=self.num_segments,
        )

    def ask(self, question: str, generation_config: Mapping[str, Any] | None = None) -> str:
        """One round: send the question with the history and the media; record and return the answer."""
        sent, recorded = self.round_question(question)
        response = self.client.generate(**self._request_kwargs(sent, generation_config))
        self._record(recorded, response)
        return response.text

    def ask_stream(self, question: str, generation_config: Mapping[str, Any] | None = None) -> Iterator[str]:
        """One round, streamed: yields text deltas; the round is recorded when the stream ends.
        Leaving the loop early cancels the request and records nothing."""
        sent, recorded = self.round_question(question)
        stream = self.client.stream(**self._request_kwargs(sent, generation_config))

        def deltas() -> Iterator[str]:
            with stream:
                yield from stream
            self._record(recorded, stream.response)

        return deltas()

    def _record(self, question: str, response: ChatResponse | None) -> None:
        if response is None:
            return
        self.last_response = response
        self.history.append((question, response.text))

    def reset(self) -> None:
        """Forget the history (the images or the video stay): the next round is a first round."""
        self.history.clear()
        self.last_response = None

    # ---- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "history": [[q, a] for q, a in self.history],
            "images": [b64encode(img) for img in self.images],
            "video": None if self.video is None else b64encode(self.video),
            "num_segments": self.num_segments,
            "separate_images": self.separate_images,
            "num_patches_list": self.num_patches_list,
            "generation_config": self.generation_config,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the session as JSON (images and video base64). Written to a temporary file first and
        renamed, so an interrupted save never leaves half a file."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], client: Any) -> "ChatSession":
        if data.get("format") != SESSION_FORMAT:
            raise ValueError(f"not a saved chat session (format {data.get('format')!r})")
        if data.get("version") != SESSION_VERSION:
            raise ValueError(f"unsupported session version {data.get('version')!r} (this client reads {SESSION_VERSION})")
        session = cls(
            client,
            images=[b64decode(s) for s in data.get("images") or []] or None,
            video=None if data.get("video") is None else b64decode(data["video"]),
            num_segments=int(data.get("num_segments", 8)),
            separate_images=bool(data.get("separate_images", False)),
            num_patches_list=data.get("num_patches_list"),
            generation_config=data.get("generation_config"),
            history=[(str(q), str(a)) for q, a in data.get("history") or []],
        )
        return session

    @classmethod
    def load(cls, path: str | os.PathLike, client: Any) -> "ChatSession":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), client)
