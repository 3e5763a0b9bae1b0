"""Where a HiDream-I1 pipeline is and what it holds, worked out once, before any weight loads.

``I1Source.resolve(arg, llama=...)`` takes a local diffusers pipeline folder or a repo id
(fetched through the Hugging Face cache like O1 checkpoints) and answers: the folder, the
model's name and variant (full, dev, fast), the transformer and VAE configs, the transformer's
tensor index and stored quantization, a fingerprint, and where Llama comes from. Llama is the
folder's own ``text_encoder_4/`` + ``tokenizer_4/`` when both are there (diffusers folders, our
fixtures); otherwise ``--llama PATH_OR_ID``, by default the official repository (gated), which
may also be an mlx-lm folder quantized beforehand. The encoders' widths are checked against the
transformer's here, so a mismatched component fails in one line naming it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from hidream_mlx.families.i1.clip import CLIPTextConfig
from hidream_mlx.families.i1.config import TransformerConfig, VAEConfig, read_json
from hidream_mlx.families.i1.encoder_common import read_json_config
from hidream_mlx.families.i1.llama import LlamaConfig
from hidream_mlx.families.i1.sizes import resolve_i1_size
from hidream_mlx.families.i1.t5 import T5Config
from hidream_mlx.families.i1.weights import component_index
from hidream_mlx.weights.loading import ModelLoadError, TensorInfo
from hidream_mlx.weights.source import fingerprint, is_repo_id, model_name, resolve_model_path

I1 = "i1"  # the family name images record
I1_PIPELINE_CLASSES = ("HiDreamImagePipeline",)
I1_REPOS = {"full": "HiDream-ai/HiDream-I1-Full", "dev": "HiDream-ai/HiDream-I1-Dev",
            "fast": "HiDream-ai/HiDream-I1-Fast"}
# The official inference.py loads Llama from this gated repository (the I1 repos do not ship it).
LLAMA_REPO = "meta-llama/Meta-Llama-3.1-8B-Instruct"
I1_VARIANTS = ("full", "dev", "fast")


class FamilyError(ValueError):
    """A folder whose family cannot be read (a broken model_index.json)."""


def pipeline_class(folder: Path) -> str | None:
    """``_class_name`` of a folder's ``model_index.json``, or None when there is none."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FamilyError(f"{index}: not a readable model_index.json ({e})") from None
    if not isinstance(data, dict):
        raise FamilyError(f"{index}: not a JSON object")
    name = data.get("_class_name")
    return name if isinstance(name, str) else None


def is_i1_pipeline(arg) -> bool:
    """A folder is an I1 pipeline when its ``model_index.json`` names ``HiDreamImagePipeline`` (the
    diffusers class; our quantized I1 folders keep that file); a repo id when its name says
    ``HiDream-I1``. Files and other folders are not."""
    text = str(arg)
    path = Path(text).expanduser()
    if path.is_dir():
        return pipeline_class(path) in I1_PIPELINE_CLASSES
    if path.exists():
        return False
    return is_repo_id(text) and re.search(r"hidream[-_]?i1", text, re.IGNORECASE) is not None


def i1_variant(name: str) -> str:
    """``full``, ``dev`` or ``fast`` from a model's name words (default ``full``), as the
    official ``inference.py`` names its three configurations."""
    words = [w for w in re.split(r"[-_. /]+", str(name).rstrip("/").rsplit("/", 1)[-1].lower()) if w]
    for variant in ("fast", "dev"):
        if variant in words:
            return variant
    return "full"


# What a pipeline repo needs (tokenizer_3's spiece.model included); the Llama repo's weights,
# tokenizer and configs (its original/ folder holds .pth files, never fetched).
PIPELINE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
LLAMA_PATTERNS = ["*.json", "*.safetensors"]
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                  "tokenizer", "tokenizer_2", "tokenizer_3")
GATED_HINT = (f"the official {LLAMA_REPO} repo is gated: accept its licence on huggingface.co, "
              "then `hf auth login`")


@dataclass(frozen=True)
class LlamaSource:
    """The fourth text encoder: the pipeline's own folders (``folder`` None) or a separate one."""

    folder: Optional[Path]  # config, weights and tokenizer together; None: text_encoder_4/ + tokenizer_4/
    given: Optional[str]  # --llama as the user gave it (None: the pipeline's own)
    hidden_size: int
    num_layers: int
    quantization: Optional[dict]  # an mlx-lm folder's stored quantization block

    def describe(self) -> str:
        where = "the pipeline's text_encoder_4/" if self.given is None else self.given
        bits = f", {self.quantization.get('bits')}-bit (stored)" if self.quantization else ""
        return f"Llama from {where} ({self.num_layers} layers, width {self.hidden_size}{bits})"


@dataclass(frozen=True, eq=False)
class I1Source:
    arg: str  # as the user gave it
    path: Path  # the pipeline folder
    name: str  # repo id or the folder's last component
    transformer: TransformerConfig
    vae: VAEConfig
    llama: LlamaSource
    index: dict[str, TensorInfo] = field(repr=False)  # the transformer's tensors
    fingerprint: str = ""
    stored: dict = field(default_factory=dict)  # what our converter recorded (variant, source)
    quantization: Optional[dict] = None  # the transformer's stored quantization plan
    notes: tuple[str, ...] = ()
    family: ClassVar[str] = I1

    @property
    def variant(self) -> str:
        """full, dev or fast: what a converted folder recorded, else the model's own name."""
        if self.stored.get("recipe") in I1_VARIANTS:
            return self.stored["recipe"]
        return i1_variant(self.stored.get("variant") or self.name)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for the FLUX VAE)."""
        return 2 ** (len(self.vae.block_out_channels) - 1)

    def render_size(self, width: int, height: int, snap: bool) -> tuple[int, int, str]:
        """The size this pipeline renders for a request, with the note saying why (the I1 size rule)."""
        return resolve_i1_size(width, height, snap, self.vae_scale, self.transformer.patch_size,
                               self.transformer.max_seq)

    @classmethod
    def resolve(cls, arg, *, llama: Optional[str] = None, allow_download: bool = True) -> "I1Source":
        if isinstance(arg, I1Source):
            return arg
        return _resolve(str(arg), llama, allow_download)


def _missing_llama(pipeline: Path, given: Optional[str], reason: str) -> ModelLoadError:
    if given is None:
        return ModelLoadError(f"Llama not found: {pipeline} has no text_encoder_4/ + tokenizer_4/ and {LLAMA_REPO} "
                              f"is not available ({reason}); pass --llama PATH_OR_ID ({GATED_HINT})")
    hint = f" ({GATED_HINT})" if given == LLAMA_REPO else ""
    return ModelLoadError(f"Llama not found: --llama {given}: {reason}{hint}")


def resolve_llama(pipeline: Path, given: Optional[str], allow_download: bool) -> LlamaSource:
    own = pipeline / "text_encoder_4", pipeline / "tokenizer_4"
    if given is None and own[0].is_dir() and own[1].is_dir():
        folder, separate = own[0], None
    else:
        try:
            separate = resolve_model_path(given or LLAMA_REPO, allow_download, LLAMA_PATTERNS)
        except ModelLoadError as e:
            raise _missing_llama(pipeline, given, str(e)) from None
        if not separate.is_dir():
            raise _missing_llama(pipeline, given, f"{separate} is a file; give the Llama folder")
        for needed in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            if not (separate / needed).is_file():
                raise _missing_llama(pipeline, given, f"{separate} has no {needed} (a Llama folder holds its "
                                                      "config, weights and tokenizer together)")
        folder = separate
    cfg = LlamaConfig.from_dict(read_json_config(folder, "Llama"), f"{folder}/config.json")
    return LlamaSource(separate, None if separate is None else (given or LLAMA_REPO), cfg.hidden_size,
                       cfg.num_hidden_layers, cfg.quantization)


def check_dims(path: Path, tcfg: TransformerConfig, vae: VAEConfig, llama: LlamaSource) -> None:
    """Every encoder's output width against what the transformer was trained on (configs only)."""
    where = f"{path}/transformer/config.json"
    t5 = T5Config.from_dict(read_json_config(path / "text_encoder_3", "T5"), f"{path}/text_encoder_3/config.json")
    if t5.d_model != tcfg.caption_channels[0]:
        raise ModelLoadError(f"{path}/text_encoder_3: T5 width {t5.d_model} does not match caption_channels[0] = "
                             f"{tcfg.caption_channels[0]} in {where}; the T5 encoder belongs to another model")
    llama_where = "the pipeline's text_encoder_4" if llama.given is None else f"--llama {llama.given}"
    if llama.hidden_size != tcfg.caption_channels[1]:
        raise ModelLoadError(f"{llama_where}: Llama hidden size {llama.hidden_size} does not match caption_channels[1] "
                             f"= {tcfg.caption_channels[1]} in {where}; this Llama belongs to another model")
    needed = max(tcfg.llama_layers) + 1
    if llama.num_layers < needed:
        raise ModelLoadError(f"{llama_where}: Llama has {llama.num_layers} layers but llama_layers in {where} reads "
                             f"layer {needed - 1}; this Llama belongs to another model")
    pooled = 0
    for part in ("text_encoder", "text_encoder_2"):
        pooled += CLIPTextConfig.from_dict(read_json_config(path / part, "CLIP"),
                                           f"{path}/{part}/config.json").projection_dim
    if pooled != tcfg.text_emb_dim:
        raise ModelLoadError(f"{path}/text_encoder + text_encoder_2: pooled CLIP-L + CLIP-G projections give {pooled} "
                             f"but text_emb_dim is {tcfg.text_emb_dim} in {where}; the CLIP encoders belong to "
                             "another model")
    if vae.latent_channels != tcfg.in_channels or tcfg.out_channels != tcfg.in_channels:
        raise ModelLoadError(f"{path}/vae: {vae.latent_channels} latent channels but the transformer takes "
                             f"{tcfg.in_channels} in and gives {tcfg.out_channels} ({where})")


def _resolve(arg: str, llama: Optional[str], allow_download: bool) -> I1Source:
    path = resolve_model_path(arg, allow_download, PIPELINE_PATTERNS)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: a HiDream-I1 model is a pipeline folder (model_index.json, transformer/, ...)")
    for part in PIPELINE_PARTS:
        if not (path / part).is_dir():
            raise ModelLoadError(f"{path}: no {part}/ (a HiDream-I1 pipeline folder has {', '.join(PIPELINE_PARTS)})")
    raw = read_json(path / "transformer" / "config.json")
    tcfg = TransformerConfig.from_dict(raw, path / "transformer" / "config.json")
    vae = VAEConfig.load(path / "vae")
    llama_source = resolve_llama(path, llama, allow_download)
    check_dims(path, tcfg, vae, llama_source)
    index = component_index(path / "transformer")
    index_file = path / "model_index.json"
    pipeline_meta = read_json(index_file) if index_file.is_file() else {}
    stored = {**(pipeline_meta.get("hidream") or {}), **(raw.get("hidream") or {})}
    config_bytes = (index_file.read_bytes() if index_file.is_file() else b"") + json.dumps(raw, sort_keys=True).encode()
    name = arg if is_repo_id(arg) else model_name(str(path))
    return I1Source(arg, path, name, tcfg, vae, llama_source, index, fingerprint(path, config_bytes, index),
                    stored, raw.get("quantization"), (f"note: {llama_source.describe()}",))
