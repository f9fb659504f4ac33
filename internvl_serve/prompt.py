"""The `internvl_zh` conversation template and the model card's `<image>` placeholder rules.

Owns: the prompt string (template, history, `<image>` -> `<img><IMG_CONTEXT>*k</img>` expansion),
the questions the card builds for video frames and separate images, the serving placeholder rule
(docs/architecture.md, "Placeholder rule") and the stop string. Raises PromptError when images and
placeholders do not fit. Does not own: tokenizing (tokenizer.py), pixels (imageproc.py).

The template (OpenGVLab/InternVL conversation.py, `internvl_zh`, sep_style INTERNVL_ZH):

    system_message + " " + "<human>: Q1 <bot>: A1</s><human>: Q2 <bot>:"

i.e. seps [" ", "</s>"] after the human and bot turns, a leading space (the empty system message is
followed by the first sep) and no space after the final colon.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from .tokenizer import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

IMAGE_PLACEHOLDER = "<image>"
History = Sequence[Sequence[str]]  # [(question, answer), ...] as earlier rounds sent / received them


class PromptError(ValueError):
    """The question, history and images do not fit together; the message says what to change."""


@dataclass(frozen=True)
class Template:
    name: str
    system_message: str
    roles: tuple[str, str]
    sep: str    # after a bot turn; its strip() is the stop string
    sep2: str   # after a human turn

    def get_prompt(self, messages: Sequence[tuple[str, str | None]]) -> str:
        """conversation.py get_prompt for INTERNVL_ZH: a message that is None or "" ends with 'role:'."""
        seps = (self.sep2, self.sep)
        ret = self.system_message + seps[0]
        for i, (role, message) in enumerate(messages):
            if message:
                ret += role + ": " + message + seps[i % 2]
            else:
                ret += role + ":"
        return ret

    @property
    def stop_str(self) -> str:
        """The card's EOS rule: `tokenizer.convert_tokens_to_ids(template.sep.strip())` ('</s>')."""
        return self.sep.strip()


INTERNVL_ZH = Template(name="internvl_zh", system_message="", roles=("<human>", "<bot>"), sep="</s>", sep2=" ")
TEMPLATES = {INTERNVL_ZH.name: INTERNVL_ZH}


def get_template(template: str | Template = "internvl_zh", system_message: str | None = None) -> Template:
    """The named template; `system_message` (config.json's, when it has one) replaces the template's."""
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise PromptError(f"unknown conversation template {template!r}; known: {sorted(TEMPLATES)}")
        template = TEMPLATES[template]
    if system_message is not None:
        template = replace(template, system_message=system_message)
    return template


def clean_response(text: str, template: str | Template = "internvl_zh") -> str:
    """The card's post-processing of a decoded answer: cut at the stop string, strip."""
    return text.split(get_template(template).stop_str)[0].strip()


# ---- questions the card builds ------------------------------------------------------------------------
def video_question(question: str, num_frames: int) -> str:
    """'Frame1: <image>\\nFrame2: <image>\\n...{question}', one placeholder per sampled frame."""
    if num_frames < 1:
        raise PromptError(f"a video needs at least one frame, got num_frames={num_frames}")
    return "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames)) + question


def separate_images_question(question: str, num_images: int) -> str:
    """'Image-1: <image>\\nImage-2: <image>\\n{question}': each image in its own <img> block."""
    if num_images < 1:
        raise PromptError(f"separate images need at least one image, got num_images={num_images}")
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images)) + question


# ---- placeholders ------------------------------------------------------------------------------------
def _check_history(history: History | None) -> list[tuple[str, str]]:
    if history is None:
        return []
    if isinstance(history, (str, bytes)):
        raise PromptError(f"history must be a list of [question, answer] pairs, got {type(history).__name__}")
    pairs = []
    for i, pair in enumerate(history):
        ok = (not isinstance(pair, (str, bytes)) and hasattr(pair, "__len__") and len(pair) == 2
              and all(isinstance(x, str) for x in pair))
        if not ok:
            raise PromptError(f"history[{i}] must be a [question, answer] pair of strings, got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


def count_image_placeholders(question: str, history: History | None = None) -> int:
    """Number of `<image>` in the history's questions and in the question."""
    return sum(q.count(IMAGE_PLACEHOLDER) for q, _ in _check_history(history)) + question.count(IMAGE_PLACEHOLDER)


def _check_reserved_tokens(question: str, history: list[tuple[str, str]]) -> None:
    # Literal <img> / </img> / <IMG_CONTEXT> in user text would be tokenized as image slots and break
    # the one-image-row-per-slot invariant; only <image> in a question may stand for an image.
    texts = [("the question", question)]
    for i, (q, a) in enumerate(history):
        texts += [(f"history[{i}]'s question", q), (f"history[{i}]'s answer", a)]
    for where, text in texts:
        for token in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN):
            if token in text:
                raise PromptError(f"{where} contains the reserved token {token!r}; mark images with "
                                  f"{IMAGE_PLACEHOLDER!r} instead")
    for i, (_, a) in enumerate(history):
        if IMAGE_PLACEHOLDER in a:
            raise PromptError(f"history[{i}]'s answer contains {IMAGE_PLACEHOLDER!r}; only questions may hold "
                              f"image placeholders")


def resolve_num_patches_list(question: str, history: History | None, num_images: int,
                             num_patches_list: Sequence[int] | None = None) -> tuple[str, list[int]]:
    """The serving placeholder rule -> (question, num_patches_list); PromptError when they do not fit.

    Images and no history (None or empty) and no `<image>` in the question: '<image>\\n' is prepended
    (the card). Then with P placeholders (history questions + question) and N images:
    num_patches_list given: len == P and sum == N, entries >= 1; else P == N: one image each;
    P == 1: all N images in one block; else an error. No images: no placeholders allowed.
    """
    history_pairs = _check_history(history)
    _check_reserved_tokens(question, history_pairs)
    if num_images < 0:
        raise PromptError(f"num_images must be >= 0, got {num_images}")
    if num_images > 0 and not history_pairs and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    p = count_image_placeholders(question, history_pairs)
    if num_patches_list is not None:
        num_patches_list = [int(n) for n in num_patches_list]
        if len(num_patches_list) == 0 and num_images == 0 and p == 0:
            return question, []
        if len(num_patches_list) != p:
            raise PromptError(f"num_patches_list has {len(num_patches_list)} entries but the history and "
                              f"question hold {p} {IMAGE_PLACEHOLDER} placeholders; give one entry per placeholder")
        if any(n < 1 for n in num_patches_list):
            raise PromptError(f"num_patches_list entries must be >= 1, got {num_patches_list}")
        if sum(num_patches_list) != num_images:
            raise PromptError(f"num_patches_list {num_patches_list} sums to {sum(num_patches_list)} but "
                              f"{num_images} image(s) were sent")
        return question, num_patches_list
    if num_images == 0:
        if p:
            raise PromptError(f"the history and question hold {p} {IMAGE_PLACEHOLDER} placeholders but no "
                              f"images were sent")
        return question, []
    if p == num_images:
        return question, [1] * num_images
    if p == 1:
        return question, [num_images]
    raise PromptError(f"{num_images} image(s) were sent but the history and question hold {p} "
                      f"{IMAGE_PLACEHOLDER} placeholders; use one placeholder per image, a single one for all "
                      f"images, or give num_patches_list")


def expand_image_placeholders(prompt: str, num_patches_list: Sequence[int], num_image_token: int) -> str:
    """The card's loop: per entry, replace the FIRST remaining `<image>` by <img> + contexts + </img>."""
    for num_patches in num_patches_list:
        image_tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_patches) + IMG_END_TOKEN
        prompt = prompt.replace(IMAGE_PLACEHOLDER, image_tokens, 1)
    return prompt


def build_prompt(question: str, history: History | None, num_patches_list: Sequence[int], num_image_token: int,
                 template: str | Template = "internvl_zh", *, system_message: str | None = None) -> str:
    """The prompt string with every `<image>` expanded (call resolve_num_patches_list first).

    Raises PromptError unless the history and question hold exactly len(num_patches_list) placeholders.
    """
    tmpl = get_template(template, system_message)
    pairs = _check_history(history)
    p = count_image_placeholders(question, pairs)
    if p != len(num_patches_list):
        raise PromptError(f"the history and question hold {p} {IMAGE_PLACEHOLDER} placeholders but "
                          f"num_patches_list has {len(num_patches_list)} entries")
    messages: list[tuple[str, str | None]] = []
    for q, a in pairs:
        messages += [(tmpl.roles[0], q), (tmpl.roles[1], a)]
    messages += [(tmpl.roles[0], question), (tmpl.roles[1], None)]
    return expand_image_placeholders(tmpl.get_prompt(messages), num_patches_list, num_image_token)
