"""ChatSession: question building across rounds, history, save/load (no server).

The session is driven through a recording stand-in for the Client: it checks what the session asks
the transport to send. (The same session against the real server is in test_client_e2e.py.)
"""

import json

import pytest

from internvl_client import ChatResponse, ChatSession


class RecordingClient:
    """Answers `answer-N` and records every request's arguments."""

    def __init__(self):
        self.calls = []

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        return ChatResponse(f"answer-{len(self.calls)}", "stop", 5, 2)

    def stream(self, **kwargs):
        self.calls.append(kwargs)
        return _FakeStream(["ans", f"wer-{len(self.calls)}"])


class _FakeStream:
    def __init__(self, deltas):
        self._deltas = deltas
        self.response = None
        self.closed = False

    def __iter__(self):
        for d in self._deltas:
            yield d
        self.response = ChatResponse("".join(self._deltas), "stop", 5, 2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True


def test_first_round_gets_the_image_placeholder_and_history_keeps_it():
    client = RecordingClient()
    s = ChatSession(client, images=[b"img"], generation_config=dict(max_new_tokens=8))
    assert s.ask("What is it?") == "answer-1"
    assert s.ask("And its colour?") == "answer-2"
    first, second = client.calls
    assert first["question"] == "<image>\nWhat is it?"
    assert first["history"] == []
    assert second["question"] == "And its colour?"  # no placeholder: history carries it
    assert second["history"] == [("<image>\nWhat is it?", "answer-1")]
    assert first["images"] == second["images"] == [b"img"]  # stateless server: images every round
    assert second["generation_config"] == {"max_new_tokens": 8}
    assert s.history == [("<image>\nWhat is it?", "answer-1"), ("And its colour?", "answer-2")]


def test_separate_images_first_round():
    client = RecordingClient()
    s = ChatSession(client, images=[b"a", b"b"], separate_images=True)
    s.ask("Compare.")
    assert client.calls[0]["question"] == "Image-1: <image>\nImage-2: <image>\nCompare."


def test_video_first_round_is_recorded_with_frame_lines():
    # The server writes the frame lines (it knows how many frames it sampled); the history holds them,
    # as the card's history does, so that later rounds find the frames there.
    client = RecordingClient()
    s = ChatSession(client, video=b"mp4", num_segments=3)
    s.ask("What happens?")
    s.ask("Then?")
    assert client.calls[0]["question"] == "What happens?"
    assert client.calls[0]["video"] == b"mp4" and client.calls[0]["num_segments"] == 3
    assert client.calls[1]["question"] == "Then?"
    assert client.calls[1]["history"] == [
        ("Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat happens?", "answer-1")
    ]
    with pytest.raises(ValueError, match="frame placeholders"):
        ChatSession(client, video=b"mp4").ask("<image> what?")


def test_text_only_session():
    client = RecordingClient()
    s = ChatSession(client)
    s.ask("Hi")
    assert client.calls[0]["question"] == "Hi" and client.calls[0]["images"] is None


def test_ask_stream_records_only_a_finished_round():
    client = RecordingClient()
    s = ChatSession(client, images=[b"img"])
    assert "".join(s.ask_stream("Q1")) == "answer-1"
    assert s.history == [("<image>\nQ1", "answer-1")]
    gen = s.ask_stream("Q2")
    next(gen)
    gen.close()  # left early: nothing recorded
    assert len(s.history) == 1


def test_per_round_generation_config_overrides_the_sessions():
    client = RecordingClient()
    s = ChatSession(client, generation_config=dict(max_new_tokens=8, do_sample=False))
    s.ask("q", generation_config=dict(max_new_tokens=2))
    assert client.calls[0]["generation_config"] == {"max_new_tokens": 2, "do_sample": False}


def test_reset_forgets_history_keeps_images():
    client = RecordingClient()
    s = ChatSession(client, images=[b"img"])
    s.ask("Q1")
    s.reset()
    assert s.history == []
    s.ask("Q2")
    assert client.calls[1]["question"] == "<image>\nQ2" and client.calls[1]["images"] == [b"img"]


def test_save_and_load_round_trip(tmp_path):
    client = RecordingClient()
    img = bytes(range(256))  # not UTF-8: must survive as base64
    s = ChatSession(client, images=[img], separate_images=True, generation_config=dict(max_new_tokens=4))
    s.ask("第一个问题")
    path = tmp_path / "session.json"
    s.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "internvl-chat-session" and data["version"] == 1
    assert data["history"] == [["<image>\n第一个问题", "answer-1"]]
    loaded = ChatSession.load(path, client)
    assert loaded.images == [img]
    assert loaded.history == s.history
    assert loaded.separate_images and loaded.generation_config == {"max_new_tokens": 4}
    loaded.ask("next")
    assert client.calls[-1]["history"] == [("<image>\n第一个问题", "answer-1")]
    assert client.calls[-1]["question"] == "next"


def test_save_and_load_video_session(tmp_path):
    s = ChatSession(RecordingClient(), video=b"\x00video", num_segments=4)
    s.save(tmp_path / "v.json")
    loaded = ChatSession.load(tmp_path / "v.json", RecordingClient())
    assert loaded.video == b"\x00video" and loaded.num_segments == 4 and loaded.images == []


def test_load_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a saved chat session"):
        ChatSession.load(tmp_path / "x.json", RecordingClient())
    (tmp_path / "y.json").write_text(json.dumps({"format": "internvl-chat-session", "version": 99}))
    with pytest.raises(ValueError, match="version"):
        ChatSession.load(tmp_path / "y.json", RecordingClient())


def test_images_and_video_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        ChatSession(RecordingClient(), images=[b"a"], video=b"v")
