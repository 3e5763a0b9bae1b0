"""Where a HiDream-E1 edit's weights come from, worked out before any weight loads.

An edit needs two things:

* the E1 model (``--model``), recognised by what it holds, never by its name:
  - **E1.1**: a folder holding ``transformer/`` (a HiDream transformer config and its weights,
    sharded with an index as ``HiDream-ai/HiDream-E1-1`` ships them) that is not an I1 pipeline;
    the repo id fetches only that folder. It replaces I1-Full's transformer outright: the
    official run never uses I1-Full's transformer weights, so they are neither fetched nor read;
  - **E1-Full**: ``HiDream-E1-Full.safetensors`` (the file, or a folder holding it; the repo id
    ``HiDream-ai/HiDream-E1-Full`` fetches that file alone): a PEFT LoRA on I1-Full's transformer
    plus some full ("partial") tensors that replace I1-Full's. The file stores no alpha: the
    official ``LoraConfig`` has ``lora_alpha = 16``, the rank comes from the ``lora_A`` shapes,
    so the LoRA's factor is ``16 / rank``;
* the base (``--base``, default ``HiDream-ai/HiDream-I1-Full``): a HiDream-I1 pipeline folder or
  repo, recognised by its ``model_index.json`` naming the HiDream image pipeline. It gives the
  four text encoders (Llama by I1's rule: its own ``text_encoder_4/``, else ``--llama``), the VAE,
  the scheduler config the editing sampler runs (:class:`EditScheduler`) and, for E1-Full only,
  the transformer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import mlx.core as mx

from hidream_mlx.families.i1.config import TransformerConfig, VAEConfig, read_json
from hidream_mlx.families.i1.e1.recipes import E1_1, E1_FULL
from hidream_mlx.families.i1.transformer import HiDreamImageTransformer
from hidream_mlx.families.i1.source import (I1_PIPELINE_CLASSES, I1_REPOS, FamilyError, LlamaSource, check_dims,
                                            pipeline_class, resolve_llama)
from hidream_mlx.families.i1.weights import component_index, expert_widths
from hidream_mlx.schedulers import Schedule, unipc_flow_sigmas_schedule, unipc_schedule, unipc_settings_problem
from hidream_mlx.weights.loading import ModelLoadError, TensorInfo, read_safetensors_header
from hidream_mlx.weights.lora import I1_KEYS, LoRAError, LoRALayer, layer_shape, linear_targets, lora_layers, split_key
from hidream_mlx.weights.source import fingerprint, is_repo_id, model_name, resolve_model_path

FAMILY = "e1"
E1_1_REPO = "HiDream-ai/HiDream-E1-1"
E1_FULL_REPO = "HiDream-ai/HiDream-E1-Full"
E1_FULL_FILE = "HiDream-E1-Full.safetensors"
DEFAULT_BASE = I1_REPOS["full"]
E1_FULL_LORA_ALPHA = 16.0  # the official LoraConfig(r=16, lora_alpha=16, ...)
EDITING_PIPELINE_CLASSES = ("HiDreamImageEditingPipeline",)
TRANSFORMER_CLASS = "HiDreamImageTransformer2DModel"
MODEL_PATTERNS = {E1_1: ["transformer/*"], E1_FULL: [E1_FULL_FILE]}
# What the base must hold besides Llama; E1-Full also reads its transformer.
BASE_PARTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
              "scheduler")
# The base's files E1.1 needs: everything but the transformer's weights.
E1_1_BASE_PATTERNS = ["*.json", "*.txt", "*.model", "vae/*.safetensors", "text_encoder*/*.safetensors"]
BASE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
# Scheduler classes the editing sampler runs, as the official pipeline sets them up: diffusers'
# UniPC (flow sigmas, one shift: what the released I1-Full ships) and the official I1 UniPC of
# older I1-Full snapshots (its own shift applied twice, the pipeline's mu unused).
DIFFUSERS_UNIPC, OFFICIAL_UNIPC = "UniPCMultistepScheduler", "FlowUniPCMultistepScheduler"
FLOW_UNIPC_SETTINGS = {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
                       "prediction_type": "flow_prediction", "final_sigmas_type": "zero",
                       "use_dynamic_shifting": False, "thresholding": False}


class E1SourceError(ModelLoadError):
    """An E1 model or base that cannot run an edit (the message names the file and the fix)."""


@dataclass(frozen=True)
class EditScheduler:
    """The base's scheduler as the editing pipeline runs it (``set_timesteps(steps)``, no ``mu``)."""

    class_name: str
    shift: float

    def schedule(self, steps: int) -> Schedule:
        if self.class_name == DIFFUSERS_UNIPC:
            return unipc_flow_sigmas_schedule(steps, self.shift)
        return unipc_schedule(steps, self.shift)

    @classmethod
    def read(cls, base: Path) -> "EditScheduler":
        path = base / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            raise E1SourceError(f"{base}: no scheduler/scheduler_config.json (the I1-Full pipeline's scheduler)")
        return cls.from_config(read_json(path), path)

    @classmethod
    def from_config(cls, config: dict, path) -> "EditScheduler":
        """From a scheduler config (``path`` names it in messages)."""
        name = config.get("_class_name")
        if name == DIFFUSERS_UNIPC:
            problem = unipc_settings_problem(config)
            shift = config.get("flow_shift", 1.0)
        elif name == OFFICIAL_UNIPC:
            problem = next((f"{k} = {json.dumps(config.get(k, v))} (expected {json.dumps(v)})"
                            for k, v in FLOW_UNIPC_SETTINGS.items() if config.get(k, v) != v), None)
            shift = config.get("shift", 1.0)
        else:
            raise E1SourceError(f"{path}: the editing pipeline runs the HiDream-I1-Full pipeline's UniPC scheduler, "
                                f"this base has {name!r} (a Dev or Fast pipeline?); give HiDream-I1-Full as --base")
        if problem is None and (isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift <= 0):
            problem = f"shift = {json.dumps(shift)} (expected a positive number)"
        if problem is not None:
            raise E1SourceError(f"{path}: {name} with {problem}; the editing sampler runs the released settings")
        return cls(name, float(shift))


@dataclass(frozen=True, eq=False)
class E1Model:
    """What ``--model`` holds: ``kind`` E1.1 (``path`` = its ``transformer/`` folder) or E1-Full
    (``path`` = the checkpoint file); ``index`` its tensors."""

    kind: str
    arg: str
    path: Path
    name: str
    index: dict[str, TensorInfo] = field(repr=False)


def _has_transformer(folder: Path) -> bool:
    config = folder / "transformer" / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == TRANSFORMER_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def local_kind(path: Path) -> Optional[str]:
    """E1_1, E1_FULL or None for a local file or folder, from what it holds."""
    if path.is_file():
        if path.suffix != ".safetensors":
            return None
        try:
            names = read_safetensors_header(path)
        except ModelLoadError:
            return None
        return E1_FULL if any(split_key(n) is not None for n in names) else None
    if not path.is_dir():
        return None
    if (path / E1_FULL_FILE).is_file():
        return E1_FULL
    try:
        pipeline = pipeline_class(path)
    except FamilyError:
        return None
    if pipeline in I1_PIPELINE_CLASSES:
        return None
    return E1_1 if _has_transformer(path) else None


def e1_model_kind(arg) -> Optional[str]:
    """E1_1, E1_FULL or None for a ``--model`` argument, without downloading anything: a local
    file or folder by what it holds; a repo id by the official names, else by its name
    (``HiDream-E1...``: ``full`` among its words is E1-Full)."""
    text = str(arg)
    path = Path(text).expanduser()
    if path.exists():
        return local_kind(path)
    for kind, repo in ((E1_1, E1_1_REPO), (E1_FULL, E1_FULL_REPO)):
        if text.lower() == repo.lower():
            return kind
    if is_repo_id(text) and re.search(r"hidream[-_]?e1", text, re.IGNORECASE):
        words = re.split(r"[-_. /]+", text.lower())
        return E1_FULL if "full" in words else E1_1
    return None


def resolve_e1_model(arg: str, allow_download: bool = True) -> E1Model:
    kind = e1_model_kind(arg)
    path = Path(arg).expanduser()
    if not path.exists():
        if kind is None or not is_repo_id(arg):
            raise E1SourceError(f"{arg}: not a HiDream-E1 model (a folder holding transformer/, "
                                f"{E1_FULL_FILE} or a folder holding it, or a repo id like {E1_1_REPO})")
        path = resolve_model_path(arg, allow_download, MODEL_PATTERNS[kind])
        kind = local_kind(path)
    if kind is None:
        raise E1SourceError(f"{path}: not a HiDream-E1 model: E1.1 is a folder holding transformer/ (config and "
                            f"weights, not a whole I1 pipeline), E1-Full is {E1_FULL_FILE} or a folder holding it")
    name = arg if is_repo_id(arg) else model_name(str(path))
    if kind == E1_1:
        folder = path / "transformer"
        return E1Model(kind, arg, folder, name, component_index(folder))
    file = path / E1_FULL_FILE if path.is_dir() else path
    return E1Model(kind, arg, file, name, read_safetensors_header(file))


@dataclass(frozen=True)
class E1FullWeights:
    """The E1-Full checkpoint read against the base transformer (tensors stay mapped lazily)."""

    lora: dict[str, LoRALayer]  # our module path -> its LoRA (alpha 16)
    partial: dict[str, TensorInfo]  # our parameter name -> where the replacement tensor is

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({layer.rank for layer in self.lora.values()}))


def transformer_linears(cfg: TransformerConfig, index: dict[str, TensorInfo], where: Path) -> dict[str, tuple]:
    """Module path -> (out, in) of every linear layer of the transformer ``cfg`` with ``index``'s
    expert widths (an unevaluated skeleton: nothing is allocated)."""
    skeleton = HiDreamImageTransformer(cfg, expert_widths(index, where))
    return {path: layer_shape(module) for path, module in linear_targets(skeleton).items()}


def read_e1_full(file: Path, base_index: dict[str, TensorInfo], cfg: TransformerConfig, where: Path) -> E1FullWeights:
    """Split the checkpoint into its LoRA pairs and its partial tensors, each checked against the
    base transformer (module paths and shapes) from the header and shapes alone."""
    try:
        tensors = mx.load(str(file))
    except (RuntimeError, ValueError, OSError) as e:
        raise E1SourceError(f"{file}: not a readable safetensors file ({e})") from None
    header = read_safetensors_header(file)
    lora = {k: v for k, v in tensors.items() if split_key(k) is not None}
    if not lora:
        raise E1SourceError(f"{file}: no LoRA tensors (lora_A / lora_B); not the HiDream-E1-Full checkpoint")
    try:
        layers, _ = lora_layers(lora, {"lora_alpha": E1_FULL_LORA_ALPHA}, transformer_linears(cfg, base_index, where),
                                I1_KEYS, file)
    except LoRAError as e:
        raise E1SourceError(str(e)) from None
    partial = {}
    for key in sorted(set(tensors) - set(lora)):
        name = key.replace(".base_layer.", ".")  # PEFT's name for a wrapped layer's own weight
        base = base_index.get(name)
        if base is None:
            raise E1SourceError(f"{file}: tensor {key} is not a parameter of the base transformer")
        if tuple(base.shape) != tuple(header[key].shape):
            raise E1SourceError(f"{file}: tensor {key} has shape {tuple(header[key].shape)}, the base transformer's "
                                f"is {tuple(base.shape)}")
        partial[name] = header[key]
    return E1FullWeights(layers, partial)


@dataclass(frozen=True, eq=False)
class E1Source:
    """An E1 model on its base, every file checked; ``kind`` picks the default recipe."""

    model: E1Model
    base_arg: str
    path: Path  # the base pipeline folder (encoders, tokenizers, VAE, scheduler)
    transformer: TransformerConfig  # the edit transformer's config
    vae: VAEConfig
    llama: LlamaSource
    scheduler: EditScheduler
    base_index: dict[str, TensorInfo] = field(repr=False)  # E1-Full: the base transformer's tensors
    e1_full: Optional[E1FullWeights] = field(default=None, repr=False)  # E1-Full: its LoRA and partial tensors
    fingerprint: str = ""
    quantization: Optional[dict] = None  # the edit transformer's stored quantization plan
    notes: tuple[str, ...] = ()
    base_fingerprint: str = ""  # the base's revision or a hash of its configs and tensor index (no path)
    family: ClassVar[str] = FAMILY

    @property
    def base_name(self) -> str:
        """The base as an image records it: a repo id as such, a folder by its own name."""
        return self.base_arg if is_repo_id(self.base_arg) else model_name(str(self.path))

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def variant(self) -> str:
        """The default recipe: the model's kind."""
        return self.model.kind

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def arg(self) -> str:
        return self.model.arg

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def pixels_per_token(self) -> int:
        return self.vae_scale * self.transformer.patch_size

    @property
    def transformer_folder(self) -> Path:
        """Where the edit transformer's config.json is."""
        return self.model.path if self.kind == E1_1 else self.path / "transformer"

    @property
    def index(self) -> dict[str, TensorInfo]:
        """The tensors the edit transformer loads: E1.1's own; E1-Full: the base's, its partial
        tensors replaced by the checkpoint's (its LoRA comes on top, :meth:`e1_full_weights`)."""
        if self.e1_full is None:
            return self.model.index
        return {**self.base_index, **self.e1_full.partial}

    def requirements(self) -> str:
        """What an edit with this model reads, for ``info``."""
        parts = "the four text encoders, the VAE and the scheduler config"
        if self.kind == E1_1:
            return (f"E1.1 reads its own transformer ({self.model.name}) and {parts} of the base "
                    f"({self.base_arg}); the base's transformer weights are not needed")
        return f"E1-Full reads its checkpoint ({self.model.name}) and the base's transformer with {parts} " \
               f"({self.base_arg})"

    @classmethod
    def resolve(cls, model, base: Optional[str] = None, *, llama: Optional[str] = None,
                allow_download: bool = True) -> "E1Source":
        if isinstance(model, E1Source):
            return model
        return _resolve(str(model), str(base or DEFAULT_BASE), llama, allow_download)


def resolve_base(arg: str, kind: str, allow_download: bool) -> Path:
    """The base pipeline folder, checked to be a HiDream-I1 pipeline with what ``kind`` reads."""
    path = Path(arg).expanduser()
    if not path.exists():
        try:
            path = resolve_model_path(arg, allow_download, E1_1_BASE_PATTERNS if kind == E1_1 else BASE_PATTERNS)
        except ModelLoadError as e:
            raise E1SourceError(f"--base {e} (the HiDream-I1-Full pipeline: a local folder or a repo id; an image "
                                "records a local base by its folder's name: give that folder with --base)") from None
    if not path.is_dir():
        raise E1SourceError(f"--base {arg}: a HiDream-I1-Full pipeline folder (model_index.json, vae/, text_encoder/, "
                            "...), not a file")
    try:
        pipeline = pipeline_class(path)
    except FamilyError as e:
        raise E1SourceError(f"--base {arg}: {e}") from None
    if pipeline not in I1_PIPELINE_CLASSES:
        what = "no model_index.json" if pipeline is None else f"its model_index.json names {pipeline!r}"
        raise E1SourceError(f"--base {arg}: not a HiDream-I1 pipeline ({what}; expected "
                            f"{' or '.join(I1_PIPELINE_CLASSES)}); give HiDream-I1-Full")
    for part in BASE_PARTS + (() if kind == E1_1 else ("transformer",)):
        if not (path / part).is_dir():
            raise E1SourceError(f"--base {arg}: no {part}/ in {path}")
    return path


def _resolve(arg: str, base_arg: str, llama: Optional[str], allow_download: bool) -> E1Source:
    model = resolve_e1_model(arg, allow_download)
    base = resolve_base(base_arg, model.kind, allow_download)
    folder = model.path if model.kind == E1_1 else base / "transformer"
    raw = read_json(folder / "config.json")
    tcfg = TransformerConfig.from_dict(raw, folder / "config.json")
    vae = VAEConfig.load(base / "vae")
    scheduler = EditScheduler.read(base)
    llama_source = resolve_llama(base, llama, allow_download)
    check_dims(base, tcfg, vae, llama_source)
    base_index, e1_full = {}, None
    if model.kind == E1_FULL:
        base_index = component_index(folder)
        e1_full = read_e1_full(model.path, base_index, tcfg, folder)
    index = model.index if e1_full is None else {**base_index, **e1_full.partial}
    config_bytes = json.dumps(raw, sort_keys=True).encode() + (base / "model_index.json").read_bytes()
    # the folder the model came in (a hub snapshot is fingerprinted by its revision)
    identity = fingerprint(model.path.parent, config_bytes, {**index, **model.index})
    return E1Source(model, base_arg, base, tcfg, vae, llama_source, scheduler, base_index, e1_full, identity,
                    raw.get("quantization"), (f"note: {llama_source.describe()}",), base_identity(base, model.kind))


def base_identity(base: Path, kind: str) -> str:
    """The base's fingerprint over what an edit of ``kind`` reads of it (configs, the encoders' and
    the VAE's tensor index, E1-Full: the transformer's too), from headers alone."""
    parts = ["vae", "text_encoder", "text_encoder_2", "text_encoder_3"] + (["transformer"] if kind == E1_FULL else [])
    if (base / "text_encoder_4").is_dir():
        parts.append("text_encoder_4")
    index: dict[str, TensorInfo] = {}
    for part in parts:
        index.update({f"{part}/{name}": info for name, info in component_index(base / part).items()})
    configs = b"".join((base / name).read_bytes() for name in ("model_index.json", "scheduler/scheduler_config.json"))
    return fingerprint(base, configs, index)
