"""``ModelSpec``: what every tier needs to know about a checkpoint directory, read once at process start."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from models import trimodal
from models.checkpoint import fingerprint

MODALITIES = ("image", "audio")


class ModelError(ValueError):
    """The directory is not a checkpoint this build can serve."""


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    name: str  # the id clients put in "model"
    config: dict
    preprocess: dict  # per modality: the processor config the encoder worker applies
    fingerprint: str
    placeholder_ids: dict[str, int]  # modality -> the token id a media part's placeholder uses
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None) -> "ModelSpec":
        path = Path(path).resolve()
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ModelError(f"{path} has no config.json: not a checkpoint directory")
        config = json.loads(cfg_file.read_text())
        if config.get("model_type") != trimodal.MODEL_TYPE:
            raise ModelError(
                f"model_type {config.get('model_type')!r} is not supported yet (supported: {trimodal.MODEL_TYPE})"
            )
        eos = config["text_config"].get("eos_token_id") or []
        return cls(
            path=path,
            name=name or path.name,
            config=config,
            preprocess=json.loads((path / "preprocessor_config.json").read_text()),
            fingerprint=fingerprint(path),
            placeholder_ids={"image": config["image_token_id"], "audio": config["audio_token_id"]},
            eos_token_ids=list(eos) if isinstance(eos, list) else [eos],
        )

    @property
    def max_context(self) -> int:
        return int(self.config["text_config"]["max_position_embeddings"])

    def encoder_id(self, modality: str) -> str:
        """Identity of one encoder (checkpoint content + component): the namespace of its cached tensors."""
        return f"{self.fingerprint[:16]}-{modality}"

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))
