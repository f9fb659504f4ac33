"""Conversation templates (the card's conversation.py entries) and the model card's `<image>` rules.

Owns: the prompt string (template, history, `<image>` -> `<img><IMG_CONTEXT>*k</img>` expansion),
the questions the card builds for video frames and separate images, the serving placeholder rule
(docs/architecture.md, "Placeholder rule") and the END OF AN ANSWER: a template declares its stop
string (the card's `template.sep.strip()`) and, through a tokenizer, its stop token ids (the card's
`tokenizer.convert_tokens_to_ids(template.sep.strip())`, which replaces the LLM config's EOS in
`generate`). The serving path passes both to the engine with every request (serving/llm.py).
Raises PromptError when images and placeholders do not fit. Does not own: tokenizing (tokenizer.py),
pixels (imageproc.py), stopping generation (engine/stopping.py) or the text's strip (engine/detokenizer.py).

A template is data: a new one is an entry in TEMPLATES, not new code. Two separator styles:

    internvl_zh (InternVL-Chat-V1-1, sep_style INTERNVL_ZH; seps [" ", "</s>"]):
        system_message + " " + "<human>: Q1 <bot>: A1</s><human>: Q2 <bot>:"          stop "</s>"
    mpt (Hermes-2, the ChatML style of later InternVL chat models, sep_style MPT):
        "<|im_start|>system\\n{system_message}<|im_end|><|im_start|>user\\nQ1<|im_end|>"
        "<|im_start|>assistant\\nA1<|im_end|><|im_start|>user\\nQ2<|im_end|><|im_start|>assistant\\n"
                                                                                      stop "<|im_end|>"
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
    sep: str    # after a bot turn (internvl_zh) or after every turn (mpt); its strip() is the stop string
    sep2: str = ""   # internvl_zh: after a human turn; mpt: unused
    style: str = "internvl_zh"  # the card's sep_style: "internvl_zh" or "mpt"
    system_template: str = "{system_message}"

    def get_prompt(self, messages: Sequence[tuple[str, str | None]]) -> str:
        """conversation.py get_prompt: a message that is None or "" ends the prompt with its role."""
        system = self.system_template.format(system_message=self.system_message)
        if self.style == "internvl_zh":  # role + ": " + message, seps alternate sep2 / sep
            seps = (self.sep2, self.sep)
            ret = system + seps[0]
            for i, (role, message) in enumerate(messages):
                ret += role + ": " + message + seps[i % 2] if message else role + ":"
            return ret
        if self.style == "mpt":          # role + message + sep, the role alone for the open turn
            ret = system + self.sep
            for role, message in messages:
                ret += role + message + self.sep if message else role
            return ret
        raise PromptError(f"template {self.name!r} has an unknown style {self.style!r}")

    # -- the end of an answer ------------------------------------------------------------------------
    @property
    def stop_str(self) -> str:
        """The card's stop string, `template.sep.strip()`: generation ends at it, the answer is cut before it."""
        return self.sep.strip()

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings the engine watches the decoded text for."""
        return (self.stop_str,)

    def stop_token_ids(self, tokenizer) -> tuple[int, ...]:
        """The card's `eos_token_id = tokenizer.convert_tokens_to_ids(template.sep.strip())`: the token ids
        that end the answer (they replace the LLM config's EOS). PromptError when the stop string is not
        one token of this tokenizer (the card would then stop on <unk>)."""
        tid = tokenizer.convert_tokens_to_ids(self.stop_str)
        unk = getattr(tokenizer, "unk_token_id", None)
        if not isinstance(tid, int) or (tid == unk and self.stop_str != getattr(tokenizer, "unk_token", None)):
            raise PromptError(f"template {self.name!r} stops on {self.stop_str!r}, which is not a token of this "
                              f"tokenizer; use a tokenizer that has it or another template")
        return (tid,)

    def end_of_answer(self, tokenizer) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(stop strings, stop token ids): what the serving path passes to the engine with each request."""
        return self.stop_strings, self.stop_token_ids(tokenizer)

    def clean(self, text: str) -> str:
        """The card's post-processing of a decoded answer: `text.split(stop)[0].strip()`."""
        return text.split(self.stop_str)[0].strip()


INTERNVL_ZH = Template(name="internvl_zh", system_message="", roles=("<human>", "<bot>"), sep="</s>", sep2=" ")
# InternVL's conversation.py 'Hermes-2' (ChatML; InternVL 1.5 / 2 chat models); the card's chat() stops on
# sep.strip() '<|im_end|>' (its stop_str '<|endoftext|>' is not used by chat()).
HERMES_2 = Template(
    name="Hermes-2", style="mpt", system_template="<|im_start|>system\n{system_message}",
    system_message="你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>")
TEMPLATES = {t.name: t for t in (INTERNVL_ZH, HERMES_2)}


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
    return get_template(template).clean(text)


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
