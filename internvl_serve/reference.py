"""The model card's chat / batch_chat / generate on this package: the correctness oracle and speed baseline.

Owns: the card's InternVLChatModel.chat, batch_chat and generate (OpenGVLab's modeling_internvl_chat.py),
written as free functions over our InternVLChatModel and tokenizer, running transformers'
`LlamaForCausalLM.generate(inputs_embeds=...)` exactly as the card does; a streaming variant whose
text deltas concatenate to chat's answer; and the card's image / video loading helpers.

Differences from the card, none of which changes an answer: the caller's history list and
generation_config dict are not mutated; pixel_values are moved to the vision model's dtype and device;
batch_chat without a pad token pads with the EOS id (the pad positions are masked out).

Does not own: serving (engine/, serving/); this path is simple and slow on purpose.
"""

from __future__ import annotations

import io
import os
import queue
import threading
from typing import Iterator, Sequence

import torch
from PIL import Image

from .imageproc import IMAGENET_MEAN, IMAGENET_STD, PreprocessorConfig, sample_video_frames, to_pixel_values
from .prompt import IMAGE_PLACEHOLDER, History, expand_image_placeholders, get_template, video_question
from .tokenizer import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

DEFAULT_PREPROCESSOR = PreprocessorConfig(448, IMAGENET_MEAN, IMAGENET_STD)


# ---- the card's generate ----------------------------------------------------------------------------
def _vision_param(model) -> torch.Tensor:
    return next(model.vision_model.parameters())


@torch.no_grad()
def input_embeddings(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     img_context_token_id: int) -> torch.Tensor:
    """(B, T) ids -> (B, T, C) embeddings, <IMG_CONTEXT> rows replaced in order by the ViT embeddings."""
    embeds = model.language_model.get_input_embeddings()(input_ids)
    if pixel_values is None:
        return embeds
    p = _vision_param(model)
    vit_embeds = model.extract_feature(pixel_values.to(device=p.device, dtype=p.dtype))   # (N, 256, C)
    b, n, c = embeds.shape
    embeds = embeds.reshape(b * n, c)
    selected = input_ids.reshape(b * n) == img_context_token_id
    if int(selected.sum()) == 0:
        raise ValueError("pixel_values were given but the prompt holds no <IMG_CONTEXT> token")
    rows = vit_embeds.reshape(-1, c)
    if int(selected.sum()) != rows.shape[0]:
        raise ValueError(f"the prompt holds {int(selected.sum())} <IMG_CONTEXT> tokens but the images give "
                         f"{rows.shape[0]} embedding rows")
    embeds[selected] = rows.to(embeds.device, embeds.dtype)
    return embeds.reshape(b, n, c)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
             img_context_token_id: int, streamer=None, **generate_kwargs) -> torch.Tensor:
    """The card's InternVLChatModel.generate: new token ids (B, new) from inputs_embeds only."""
    embeds = input_embeddings(model, input_ids, pixel_values, img_context_token_id)
    return model.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=True,
                                         streamer=streamer, **generate_kwargs)


# ---- prompts as the card builds them -------------------------------------------------------------------
def _template(model):
    config = model.config
    return get_template(config.template, getattr(config, "system_message", None))


def _card_query(model, question: str, history: History, num_patches_list: Sequence[int],
                img_start: str, img_end: str, img_context: str) -> str:
    template = _template(model)
    messages = []
    for old_question, old_answer in history:
        messages += [(template.roles[0], old_question), (template.roles[1], old_answer)]
    messages += [(template.roles[0], question), (template.roles[1], None)]
    query = template.get_prompt(messages)
    if (img_start, img_end, img_context) == (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN):
        return expand_image_placeholders(query, num_patches_list, model.config.num_image_token)
    for num_patches in num_patches_list:
        image_tokens = img_start + img_context * model.config.num_image_token * num_patches + img_end
        query = query.replace(IMAGE_PLACEHOLDER, image_tokens, 1)
    return query


def prepare_chat(model, tokenizer, pixel_values: torch.Tensor | None, question: str, history: History | None,
                 num_patches_list: Sequence[int] | None, img_start: str = IMG_START_TOKEN,
                 img_end: str = IMG_END_TOKEN, img_context: str = IMG_CONTEXT_TOKEN):
    """chat()'s inputs as the card builds them -> (question, history, query, input_ids (1, T), attention_mask)."""
    if history is None and pixel_values is not None and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    if num_patches_list is None:
        num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
    if pixel_values is not None and len(pixel_values) != sum(num_patches_list):
        raise ValueError(f"num_patches_list {list(num_patches_list)} does not sum to the {len(pixel_values)} images")
    history = [] if history is None else [tuple(pair) for pair in history]
    query = _card_query(model, question, history, num_patches_list, img_start, img_end, img_context)
    ids = torch.tensor([tokenizer.encode(query)], dtype=torch.long)
    device = model.language_model.get_input_embeddings().weight.device
    return question, history, query, ids.to(device), torch.ones_like(ids).to(device)


def _generate_kwargs(model, generation_config: dict, eos_token_id: int) -> dict:
    kwargs = dict(generation_config)
    kwargs["eos_token_id"] = eos_token_id
    # what generate falls back to anyway (with a warning) when the model has no pad token
    pad = model.language_model.generation_config.pad_token_id
    kwargs.setdefault("pad_token_id", eos_token_id if pad is None else pad)
    return kwargs


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ---- chat ------------------------------------------------------------------------------------------------
def chat(model, tokenizer, pixel_values: torch.Tensor | None, question: str, generation_config: dict,
         history: History | None = None, return_history: bool = False,
         num_patches_list: Sequence[int] | None = None, IMG_START_TOKEN: str = IMG_START_TOKEN,
         IMG_END_TOKEN: str = IMG_END_TOKEN, IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN, verbose: bool = False):
    """The card's `model.chat(tokenizer, pixel_values, question, generation_config, ...)`.

    pixel_values: (N, 3, 448, 448) or None (pure text). generation_config: e.g.
    dict(max_new_tokens=1024, do_sample=False). Returns the answer, or (answer, history) with return_history.
    """
    img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    question, history, query, input_ids, attention_mask = prepare_chat(
        model, tokenizer, pixel_values, question, history, num_patches_list,
        IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
    template = _template(model)
    eos_token_id = tokenizer.convert_tokens_to_ids(template.stop_str)
    if verbose and pixel_values is not None:
        print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
    output = generate(model, input_ids, attention_mask, pixel_values, img_context_token_id,
                      **_generate_kwargs(model, generation_config, eos_token_id))
    response = tokenizer.batch_decode(output.tolist(), skip_special_tokens=True)[0]
    response = response.split(template.stop_str)[0].strip()
    history = history + [(question, response)]
    if return_history:
        return response, history
    if verbose:
        shown = query.replace(IMG_CONTEXT_TOKEN, "").replace(f"{IMG_START_TOKEN}{IMG_END_TOKEN}", IMAGE_PLACEHOLDER)
        print(shown, response)
    return response


def batch_chat(model, tokenizer, pixel_values: torch.Tensor | None, questions: Sequence[str], generation_config: dict,
               num_patches_list: Sequence[int] | None = None, history=None, return_history: bool = False,
               IMG_START_TOKEN: str = IMG_START_TOKEN, IMG_END_TOKEN: str = IMG_END_TOKEN,
               IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN, verbose: bool = False,
               image_counts: Sequence[int] | None = None) -> list[str]:
    """The card's `model.batch_chat`: one prompt per question, left-padded, one generate call.

    num_patches_list[i] images of pixel_values belong to questions[i] (in order). No history (as the card).
    """
    if history is not None or return_history:
        raise NotImplementedError("multi-turn chat is not supported in batch_chat (as the card)")
    if image_counts is not None:
        num_patches_list = image_counts
    if num_patches_list is None:
        if pixel_values is None:
            num_patches_list = [0] * len(questions)
        elif len(pixel_values) == len(questions):
            num_patches_list = [1] * len(questions)
        else:
            raise ValueError("give num_patches_list: the images per question")
    if len(num_patches_list) != len(questions):
        raise ValueError(f"{len(questions)} questions but num_patches_list has {len(num_patches_list)} entries")
    img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if verbose and pixel_values is not None:
        print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
    queries = []
    for question, num_patches in zip(questions, num_patches_list):
        if pixel_values is not None and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        queries.append(_card_query(model, question, [], [num_patches], IMG_START_TOKEN, IMG_END_TOKEN,
                                   IMG_CONTEXT_TOKEN))
    # tokenizer(queries, padding=True) with padding_side='left'
    encoded = [tokenizer.encode(q) for q in queries]
    width = max(len(ids) for ids in encoded)
    pad = _pad_id(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], dtype=torch.long)
    device = model.language_model.get_input_embeddings().weight.device
    template = _template(model)
    eos_token_id = tokenizer.convert_tokens_to_ids(template.stop_str)
    output = generate(model, input_ids.to(device), attention_mask.to(device), pixel_values, img_context_token_id,
                      **_generate_kwargs(model, generation_config, eos_token_id))
    responses = tokenizer.batch_decode(output.tolist(), skip_special_tokens=True)
    return [r.split(template.stop_str)[0].strip() for r in responses]


# ---- streaming ---------------------------------------------------------------------------------------
class _TokenQueue:
    """A transformers streamer (put/end) that hands the new token ids to another thread."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first puts the prompt ids (empty with inputs_embeds)
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


def stream_chat(model, tokenizer, pixel_values: torch.Tensor | None, question: str, generation_config: dict,
                history: History | None = None, num_patches_list: Sequence[int] | None = None) -> Iterator[str]:
    """chat(), yielding text deltas as tokens are generated; the deltas concatenate to chat's answer.

    A delta never includes text the final answer might still drop: trailing whitespace (the card strips
    it), a possible start of the stop string, or an incomplete UTF-8 character.
    """
    img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    _, _, _, input_ids, attention_mask = prepare_chat(
        model, tokenizer, pixel_values, question, history, num_patches_list,
        IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
    template = _template(model)
    stop = template.stop_str
    eos_token_id = tokenizer.convert_tokens_to_ids(stop)
    streamer = _TokenQueue()
    failure: list[BaseException] = []

    def run():
        try:
            generate(model, input_ids, attention_mask, pixel_values, img_context_token_id, streamer=streamer,
                     **_generate_kwargs(model, generation_config, eos_token_id))
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=run, name="stream_chat-generate", daemon=True)
    thread.start()
    ids: list[int] = []
    sent = ""
    while (new := streamer.queue.get()) is not None:
        ids += new
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if stop in text:
            continue  # the answer is complete; the rest is cut
        visible = _stable_prefix(text.lstrip(), stop)
        if len(visible) > len(sent) and visible.startswith(sent):
            yield visible[len(sent):]
            sent = visible
    thread.join()
    if failure:
        raise failure[0]
    final = tokenizer.decode(ids, skip_special_tokens=True).split(stop)[0].strip()
    if not final.startswith(sent):  # cannot happen with the hold-backs above; fail loudly if it does
        raise RuntimeError(f"stream_chat sent {sent!r}, which is not a prefix of the answer {final!r}")
    if len(final) > len(sent):
        yield final[len(sent):]


def _stable_prefix(text: str, stop: str) -> str:
    """text without what may still change: an incomplete character, a partial stop string, trailing space."""
    text = text.rstrip("\ufffd")
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            text = text[:-k]
            break
    return text.rstrip()


# ---- loading images and videos as the card does ------------------------------------------------------
def load_image(image: str | os.PathLike | bytes | Image.Image,
               preprocessor: PreprocessorConfig = DEFAULT_PREPROCESSOR) -> torch.Tensor:
    """The card's `Image.open(path).convert('RGB')` + CLIPImageProcessor -> (1, 3, 448, 448) float32."""
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif not isinstance(image, Image.Image):
        image = Image.open(image)
    size, mean, std = preprocessor
    return torch.from_numpy(to_pixel_values([image.convert("RGB")], size, mean, std))


def load_video(video: str | os.PathLike | bytes, num_segments: int = 8, bound: Sequence[float] | None = None,
               preprocessor: PreprocessorConfig = DEFAULT_PREPROCESSOR) -> tuple[torch.Tensor, list[int]]:
    """The card's load_video for V1-1: num_segments frames (get_index), one 448 tile each.

    Returns (pixel_values (num_segments, 3, 448, 448) float32, num_patches_list [1] * num_segments).
    """
    frames = sample_video_frames(video, num_segments=num_segments, bound=bound)
    size, mean, std = preprocessor
    pixel_values = torch.from_numpy(to_pixel_values(frames, size, mean, std))
    return pixel_values, [1] * len(frames)


def video_chat_question(question: str, num_patches_list: Sequence[int]) -> str:
    """The card's video question: 'Frame1: <image>\\n...' + question, one frame per entry."""
    return video_question(question, len(num_patches_list))


__all__ = ["chat", "batch_chat", "stream_chat", "generate", "input_embeddings", "prepare_chat", "load_image",
           "load_video", "video_chat_question", "DEFAULT_PREPROCESSOR"]
