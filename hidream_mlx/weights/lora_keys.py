"""How LoRA files name the modules they change: tensor suffixes per layout, each family's
prefixes (:class:`LoRAKeys`), and where a PEFT file's alpha comes from. :mod:`.lora` reads and
applies the files with these rules."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from hidream_mlx.files import parse_json, read_json_file

METADATA_KEY = "lora_adapter_metadata"  # diffusers: PEFT LoraConfig fields, "transformer."-prefixed
PEFT_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B",
                 ".lora_A.default.weight": "A", ".lora_B.default.weight": "B"}
KOHYA_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"}


class LoRAError(ValueError):
    """A LoRA file that does not fit the model: the message names the file and the key."""


@dataclass(frozen=True)
class LoRAKeys:
    """How one family's LoRA files name its modules: prefixes in front of our module path,
    dotted (``transformer.double_stream_blocks.0...``) or underscored after the dots became
    ``_`` (``lora_unet_double_stream_blocks_0_...``), and what may follow an underscored prefix."""

    family: str
    dotted: tuple[str, ...]
    underscored: tuple[str, ...]
    underscored_inner: tuple[str, ...] = ()  # e.g. O1's "model_" (lora_unet_model_language_model_...)


# HiDream-O1: PEFT, ModelScope (model.language_model...), kohya/ComfyUI.
O1_KEYS = LoRAKeys("HiDream-O1", ("base_model.model.", "diffusion_model.", "transformer.", "model."),
                   ("lora_unet_", "lora_transformer_"), ("model_",))
# HiDream-I1 (diffusers HiDreamImageLoraLoaderMixin, ComfyUI's HiDream key map): our module paths
# are diffusers' (double_stream_blocks.N.block.attn1.to_q, ...) under transformer. (diffusers,
# SimpleTuner), diffusion_model. (ComfyUI, converted by diffusers), base_model.model. (PEFT), or
# underscored after lora_unet_ (kohya / ComfyUI), lora_transformer_ or lycoris_ (SimpleTuner).
I1_KEYS = LoRAKeys("HiDream-I1", ("base_model.model.", "transformer.", "diffusion_model."),
                   ("lora_unet_", "lora_transformer_", "lycoris_"))


def underscore_map(targets: Iterable[str]) -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {}
    for path in targets:
        flat = path.replace(".", "_")
        out[flat] = None if flat in out and out[flat] != path else path  # None: ambiguous
    return out


def split_key(key: str) -> Optional[tuple[str, str, str]]:
    """key -> (module part, role A/B/alpha, layout) or None when no LoRA suffix fits."""
    for suffixes, layout in ((PEFT_SUFFIXES, "peft"), (KOHYA_SUFFIXES, "kohya")):
        for suffix, role in suffixes.items():
            if key.endswith(suffix):
                return key[: -len(suffix)], role, layout
    return None


def module_path(raw: str, targets: dict, flat: dict, keys: LoRAKeys) -> Optional[str]:
    for prefix in keys.underscored:
        if raw.startswith(prefix):
            name = raw[len(prefix):]
            inner = [name[len(p):] for p in keys.underscored_inner if name.startswith(p)]
            for candidate in (name, *inner):
                if candidate in flat:
                    if flat[candidate] is None:
                        raise LoRAError(f"{candidate!r} names more than one module of the model")
                    return flat[candidate]
            return None
    name = raw
    while True:
        if name in targets:
            return name
        stripped = next((name[len(p):] for p in keys.dotted if name.startswith(p)), None)
        if stripped is None:
            return None
        name = stripped


def peft_alpha(config: Optional[dict], raw: str, rank: int) -> float:
    if config is None:
        return float(rank)
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", raw):
            return float(alpha)
    alpha = config.get("lora_alpha")
    if alpha is None:
        return float(rank)
    if config.get("use_rslora"):
        return float(alpha) * rank ** 0.5  # alpha / sqrt(r) written as alpha' / r
    return float(alpha)


def adapter_config(path: Path, metadata: dict) -> Optional[dict]:
    """PEFT's LoraConfig fields: ``adapter_config.json`` beside the file, else the header's
    ``lora_adapter_metadata`` (keys bare or ``transformer.``-prefixed), else None."""
    cfg = path.parent / "adapter_config.json"
    if cfg.is_file():
        try:
            return checked_config(read_json_file(cfg, "adapter config"), str(cfg))
        except ValueError as e:
            raise LoRAError(str(e)) from None
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    where = f"{path}: {METADATA_KEY} in the header"
    try:
        fields = parse_json(raw, str(path), f"{METADATA_KEY} in the header")
    except ValueError as e:
        raise LoRAError(str(e)) from None
    if not isinstance(fields, dict):
        raise LoRAError(f"{where} is not a JSON object")
    fields = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in fields.items()}
    return checked_config(fields, where)


def checked_config(config, where: str) -> dict:
    """The LoraConfig fields alpha is read from, checked once: ``lora_alpha`` a finite number,
    ``alpha_pattern`` regular expressions mapped to finite numbers, ``use_rslora`` true or false.
    Errors name ``where`` (the file) and the key."""
    if not isinstance(config, dict):
        raise LoRAError(f"{where}: not a JSON object")

    def number(key: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LoRAError(f"{where}: {key} must be a finite number, got {value!r}")

    if config.get("lora_alpha") is not None:
        number("lora_alpha", config["lora_alpha"])
    patterns = config.get("alpha_pattern")
    if patterns is not None:
        if not isinstance(patterns, dict):
            raise LoRAError(f"{where}: alpha_pattern must be an object of pattern -> alpha")
        for pattern, alpha in patterns.items():
            number(f"alpha_pattern[{pattern!r}]", alpha)
            try:
                re.compile(pattern)
            except re.error as e:
                raise LoRAError(f"{where}: alpha_pattern key {pattern!r} is not a regular expression ({e})") from None
    if config.get("use_rslora") is not None and not isinstance(config["use_rslora"], bool):
        raise LoRAError(f"{where}: use_rslora must be true or false, got {config['use_rslora']!r}")
    return config
