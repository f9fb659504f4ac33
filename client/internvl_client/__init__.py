"""internvl_client: the client SDK of the InternVL-Chat-V1-1 Triton deployment.

Needs only tritonclient[grpc] and numpy (pillow only to send in-memory PIL images).

    from internvl_client import Client
    client = Client("127.0.0.1:8001")
    print(client.chat("What is in the image?", images=["cat.png"],
                      generation_config=dict(max_new_tokens=128, do_sample=False)))

Sync `Client`, asyncio `AsyncClient`, multi-round `ChatSession`, the `internvl-chat` CLI (cli.py).
"""

__version__ = "0.1.0"

from .aio import AsyncChatStream, AsyncClient
from .client import ChatStream, Client
from .errors import (
    InternVLError,
    InvalidInputError,
    ModelNotReadyError,
    RequestCancelledError,
    RequestTimeoutError,
    ServerUnavailableError,
)
from .generation import to_contract_inputs
from .media import encode_image, encode_video, to_data_url
from .question import combined_images_question, separate_images_question, video_question
from .request import ChatRequest, ChatResponse, Chunk
from .session import ChatSession

__all__ = [
    "AsyncChatStream",
    "AsyncClient",
    "ChatRequest",
    "ChatResponse",
    "ChatSession",
    "ChatStream",
    "Chunk",
    "Client",
    "InternVLError",
    "InvalidInputError",
    "ModelNotReadyError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "ServerUnavailableError",
    "combined_images_question",
    "encode_image",
    "encode_video",
    "separate_images_question",
    "to_contract_inputs",
    "to_data_url",
    "video_question",
]
