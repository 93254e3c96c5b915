"""``ModelSpec``: what every tier needs to know about a checkpoint directory, read once at process start.

The family comes from config.json's ``model_type``: the demo's ``tributary_trimodal`` (models/trimodal.py), Hugging
Face ``llava`` (models/llava.py) and ``qwen2_audio`` (models/qwen2_audio.py). This module imports neither torch nor
transformers (the family's module is imported when first used), so ``read_family`` is cheap for the supervisor.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from models.family import Family, ModelError, chat_template, check_prompt_files, eos_token_ids, read_json

__all__ = ["FAMILIES", "MODALITIES", "ModelError", "ModelSpec", "family_for", "read_family"]

MODALITIES = ("image", "audio")
TRIMODAL = Family("tributary_trimodal", ("image", "audio"), "models.trimodal")
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    TRIMODAL,
    Family("llava", ("image",), "models.llava"),
    Family("qwen2_audio", ("audio",), "models.qwen2_audio"),
)}


def family_for(config: dict) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelError(f"model_type {model_type!r} is not supported yet (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def _raw_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelError(f"{path} has no config.json: not a checkpoint directory")
    return read_json(cfg_file)


def read_family(path: str | Path) -> Family:
    """The checkpoint's family from config.json alone (no hashing, no processor files): for the supervisor."""
    return family_for(_raw_config(Path(path)))


@functools.lru_cache(maxsize=64)
def _with_backbone(base: str, backbone_dtype: str) -> str:
    return "fp_" + hashlib.sha256(f"{base}|backbone={backbone_dtype}".encode()).hexdigest()[:12]


def read_text_config(path: str | Path) -> dict:
    """The language model's config (the family's defaults filled in) from config.json alone: for the supervisor."""
    raw = _raw_config(Path(path))
    return family_for(raw).impl.read_config(Path(path), raw)["text_config"]


SHORT_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    name: str  # the id clients put in "model"
    config: dict  # config.json with the family's defaults filled in; config["text_config"] is the language model's
    preprocess: dict  # per modality: the processor config the encoder worker applies
    fingerprint: str
    placeholder_ids: dict[str, int]  # modality -> the token id a media part's placeholder uses
    eos_token_ids: list[int] = field(default_factory=list)
    family: Family = TRIMODAL
    # Per modality, the encoders' (compute, wire) dtypes (float32 for a modality not listed): part of each encoder's
    # identity (``encoder_id``), so encodings of another precision never share a cache entry. Gateways and encoders
    # of one cluster set the same (``with_encoder_dtypes``).
    encoder_dtypes: tuple[tuple[str, str, str], ...] = ()  # (modality, compute, wire)

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None) -> ModelSpec:
        from models.checkpoint import fingerprint

        path = Path(path).resolve()
        raw = _raw_config(path)
        family = family_for(raw)
        impl = family.impl
        config = impl.read_config(path, raw)
        return cls(
            path=path,
            name=name or path.name,
            config=config,
            preprocess=impl.preprocess(path, config),
            fingerprint=fingerprint(path),
            placeholder_ids=impl.placeholder_ids(config),
            eos_token_ids=eos_token_ids(path, config),
            family=family,
        )

    @property
    def modalities(self) -> tuple[str, ...]:
        """The media this model takes; a request with another is refused (400) at the gateway."""
        return self.family.modalities

    @property
    def max_context(self) -> int:
        return int(self.config["text_config"]["max_position_embeddings"])

    def encoder_id(self, modality: str) -> str:
        """Identity of one encoder (checkpoint content + component + compute and wire dtype): the namespace of its
        cached tensors."""
        compute, wire = self.encoder_dtype(modality)
        return f"{self.fingerprint[:16]}-{modality}-{SHORT_DTYPES[compute]}-{SHORT_DTYPES[wire]}"

    @functools.cached_property
    def system_fingerprint(self) -> str:
        """OpenAI's ``system_fingerprint``: what the answers depend on besides the request, here the checkpoint's
        content and the encoders' precisions (``fp_`` and 12 hex digits). It changes when either does, so a client
        comparing seeded answers can tell a changed deployment from nondeterminism. An answer's also holds the
        backbone's dtype: :meth:`system_fingerprint_with`."""
        ids = ",".join(self.encoder_id(mod) for mod in self.family.modalities)
        return "fp_" + hashlib.sha256(f"{self.fingerprint}|{ids}".encode()).hexdigest()[:12]

    def system_fingerprint_with(self, backbone_dtype: str) -> str:
        """The fingerprint of an answer a backbone computing in ``backbone_dtype`` gave ("": one that predates
        saying it, the fingerprint without it): float32 and bfloat16 backbones gave one fingerprint and different
        seeded answers (an outside tester's)."""
        return _with_backbone(self.system_fingerprint, backbone_dtype) if backbone_dtype else self.system_fingerprint

    def encoder_dtype(self, modality: str) -> tuple[str, str]:
        """(compute, wire) dtype of the ``modality`` encoder."""
        return next(((c, w) for mod, c, w in self.encoder_dtypes if mod == modality), ("float32", "float32"))

    def with_encoder_dtypes(self, compute: str | dict[str, str], wire: str | dict[str, str] | None = None
                            ) -> ModelSpec:
        """This spec for encoders computing in ``compute`` and sending ``wire`` (default: the compute dtype): one
        dtype for every modality, or a dict per modality (a modality missing computes in float32)."""
        mods = self.family.modalities
        computes = compute if isinstance(compute, dict) else dict.fromkeys(mods, compute)
        wires = wire if isinstance(wire, dict) else dict.fromkeys(mods, wire) if wire else {}
        entries = []
        for mod in mods:
            c = computes.get(mod, "float32")
            w = wires.get(mod) or c
            for d in (c, w):
                if d not in SHORT_DTYPES:
                    raise ValueError(f"encoder dtypes are float32, bfloat16 or float16, got {d!r}")
            entries.append((mod, c, w))
        return dataclasses.replace(self, encoder_dtypes=tuple(entries))

    def load_tokenizer(self):
        """The checkpoint's tokenizer, with the processor's chat template (the one the reference processor renders)
        when the checkpoint keeps it in its own file."""
        from transformers import AutoTokenizer, PreTrainedConfig

        # A model_type transformers does not know (the demo's) would be read as a bare PreTrainedConfig, with a
        # warning at every start; its language model's config is what the tokenizer class is looked up by.
        config = None
        if self.family is TRIMODAL:
            text = dict(self.config["text_config"])
            config = PreTrainedConfig.from_dict(text) if "model_type" not in text else None
            if config is None:
                from transformers import AutoConfig

                config = AutoConfig.for_model(**text)
        check_prompt_files(self.path)
        tokenizer = AutoTokenizer.from_pretrained(str(self.path), config=config)
        template = chat_template(self.path)
        if template is not None:
            tokenizer.chat_template = template
        return tokenizer


def parse_encoder_dtypes(value: str | None) -> str | dict[str, str] | None:
    """``--encoder-dtype`` / ``--encoder-wire-dtype``: one dtype for every modality (``bfloat16``) or one per modality
    (``image=bfloat16,audio=float32``). ValueError on anything else."""
    if not value:
        return None
    if "=" not in value:
        if value not in SHORT_DTYPES:
            raise ValueError(f"expected float32, bfloat16 or float16 (or MODALITY=DTYPE,...), got {value!r}")
        return value
    out = {}
    for part in value.split(","):
        mod, _, dtype = part.strip().partition("=")
        if mod not in ("image", "audio") or dtype not in SHORT_DTYPES:
            raise ValueError(f"expected MODALITY=DTYPE with image or audio and float32, bfloat16 or float16, "
                             f"got {part!r}")
        out[mod] = dtype
    return out

