"""The gateway's settings (CLI flags in __main__.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL_NAME = "InternVL-Chat-V1-1"


@dataclass(frozen=True)
class GatewayConfig:
    triton: str = "127.0.0.1:8001"               # Triton's gRPC address
    model_name: str = DEFAULT_MODEL_NAME         # the id /v1/models lists; "internvl_chat" is accepted too
    timeout_s: float = 600.0                     # each request's deadline (then 504)
    retries: int = 2                             # reconnects while Triton is unreachable (then 503)
    allow_remote_images: bool = False            # fetch http(s) image_url parts (off: only data: URLs)
    remote_image_hosts: tuple[str, ...] = ()     # if not empty: the only hosts fetched from
    max_image_bytes: int = 20 * 2**20            # per image (the server's own limit is the same)
    remote_image_timeout_s: float = 10.0
    system_messages: str = "reject"              # reject | ignore (the card's template has no system turn)
    api_key: str | None = None                   # if set: /v1/* needs `Authorization: Bearer <api_key>`
    served_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.system_messages not in ("reject", "ignore"):
            raise ValueError(f"system_messages must be 'reject' or 'ignore', got {self.system_messages!r}")
        if not self.served_names:
            object.__setattr__(self, "served_names", (self.model_name, "internvl_chat"))
