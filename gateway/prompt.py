"""From validated messages to a prompt: media parts pulled out in order, the chat template applied, tokens counted.

Each media part leaves one placeholder token in the rendered prompt; once its encoder says how many rows its tensor
has, :func:`expand_placeholders` repeats the placeholder that many times (as the reference processors do).

The token ids are the reference processor's (LlavaProcessor, Qwen2AudioProcessor, ...): the checkpoint's chat
template renders media parts as Hugging Face content parts (``{"type": "image", "image": ...}``, ``{"type": "audio",
"audio": ...}``: templates test either the type or the key), and the text is tokenized with the tokenizer's special
tokens (Llama's ``<s>``) unless the rendered text already starts with the BOS token, the rule of the processors'
``apply_chat_template``. A media part whose modality the model does not take is a 400 naming the part.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import InvalidRequest
from gateway.media import MediaPart, audio_from_base64, content_digest, image_from_url
from gateway.schemas import ChatCompletionRequest
from models.spec import ModelSpec


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]  # one placeholder token per media part, not yet expanded
    media: list[MediaPart]  # in prompt order


class PromptBuilder:
    def __init__(self, spec: ModelSpec, tokenizer, max_media_bytes: int):
        self.spec, self.tokenizer, self.max_media_bytes = spec, tokenizer, max_media_bytes
        self.placeholder_text = {m: tokenizer.convert_ids_to_tokens(i) for m, i in spec.placeholder_ids.items()}

    def build(self, req: ChatCompletionRequest) -> Prompt:
        messages, media = [], []
        for i, msg in enumerate(req.messages):
            role = "system" if msg.role == "developer" else msg.role
            if isinstance(msg.content, str):
                self._check_text(msg.content, f"messages.{i}.content")
                messages.append({"role": role, "content": msg.content})
                continue
            parts = []
            for j, part in enumerate(msg.content):
                param = f"messages.{i}.content.{j}"
                if part.type == "text":
                    self._check_text(part.text, param)
                    parts.append({"type": "text", "text": part.text})
                    continue
                if role != "user":
                    raise InvalidRequest(f"{part.type} parts are only accepted in user messages", param=param)
                media.append(self._media(part, param))
                modality = media[-1].modality
                parts.append({"type": modality, modality: f"tributary:{param}"})  # the value is never rendered
            messages.append({"role": role, "content": parts})
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = self.tokenizer.bos_token
        ids = self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
        self._check_placeholders(ids, media)
        return Prompt(ids, media)

    def _media(self, part, param: str) -> MediaPart:
        modality = "image" if part.type == "image_url" else "audio"
        if modality not in self.spec.modalities:
            raise InvalidRequest(f"model '{self.spec.name}' does not accept {modality} input ({part.type} part); it "
                                 f"accepts text and {' and '.join(self.spec.modalities)}", param=param,
                                 code="unsupported_modality")
        if part.image_url is None if modality == "image" else part.input_audio is None:
            return MediaPart(modality, b"", param, uuid=part.uuid)  # a bare uuid: resolved in gateway/encoding.py
        if modality == "image":
            data = image_from_url(part.image_url.url, param, self.max_media_bytes)
        else:
            data = audio_from_base64(part.input_audio.data, param, self.max_media_bytes)
        if not data:
            raise InvalidRequest(f"{modality} data is empty", param=param)
        digest = content_digest(self.spec.encoder_id(modality), self.spec.preprocess[modality], data)
        return MediaPart(modality, data, param, digest, part.uuid)

    def _check_text(self, text: str, param: str) -> None:
        # A placeholder typed by the client would be spliced with another part's tensor: refuse it.
        for token in self.placeholder_text.values():
            if token in text:
                raise InvalidRequest(f"text must not contain the reserved token {token}", param=param)

    def _check_placeholders(self, ids: list[int], media: list[MediaPart]) -> None:
        found = [m for i in ids for m, pid in self.spec.placeholder_ids.items() if i == pid]
        if found != [p.modality for p in media]:
            raise InvalidRequest("the chat template did not place every media part; check the message roles")


def expand_placeholders(ids: list[int], placeholder_ids: dict[str, int], counts: list[int]) -> list[int]:
    """Repeat the k-th placeholder token counts[k] times."""
    placeholders = set(placeholder_ids.values())
    out: list[int] = []
    k = 0
    for tok in ids:
        if tok in placeholders:
            out.extend([tok] * counts[k])
            k += 1
        else:
            out.append(tok)
    return out
