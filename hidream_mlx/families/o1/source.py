"""Where a HiDream-O1 checkpoint is and what it holds, worked out once per process.

``ModelSource.resolve(arg)`` is the one way every O1 command path (``info``, ``generate``,
``quantize``, ``eval``, ``bench``, ``replay``) reaches a checkpoint. It answers: the folder (local,
or the Hugging Face cache), the layout (official shards, our converted folder, or a single-file
community release), the parsed config, the safetensors header index, the tokenizer folder,
the quantization plan, the model's own name (for the default recipe) and a fingerprint.
The three layouts are described in ``docs/model.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from hidream_mlx.files import read_json_file
from hidream_mlx.families.o1.config import ConfigError, ModelConfig
from hidream_mlx.families.o1.prompt import check_chat_template
from hidream_mlx.families.o1.recipes import recipe_for_name
from hidream_mlx.weights.loading import ModelLoadError, TensorInfo, checkpoint_index, read_safetensors_header
from hidream_mlx.weights.source import fingerprint, hub_download, is_repo_id, model_name, resolve_model_path

OFFICIAL = "official"  # the released folder: sharded float32, config.json without a quantization block
CONVERTED = "converted"  # written by ``hidream-mlx quantize``: config.json with a quantization block
SINGLE_FILE = "single-file"  # one .safetensors with the official tensor names and no config.json
OFFICIAL_REPOS = {"dev": "HiDream-ai/HiDream-O1-Image-Dev", "full": "HiDream-ai/HiDream-O1-Image"}
# The small files a single-file release lacks: tokenizer, chat template, processor configs.
SIDE_FILE_PATTERNS = ["*.json", "*.txt", "*.jinja"]
TEXT_PREFIX = "model.language_model."


def _layer_count(index: dict[str, TensorInfo], prefix: str) -> int:
    numbers = {int(n[len(prefix):].split(".", 1)[0]) for n in index if n.startswith(prefix)}
    if not numbers or numbers != set(range(len(numbers))):
        raise ModelLoadError(f"{prefix}*: layers missing or not numbered 0..N-1")
    return len(numbers)


def _shape(index: dict[str, TensorInfo], name: str, where: Path) -> tuple[int, ...]:
    if name not in index:
        raise ModelLoadError(f"{where}: tensor {name} missing; not a HiDream-O1 checkpoint")
    return index[name].shape


def infer_text_dims(index: dict[str, TensorInfo], where: Path) -> dict:
    """The decoder's dimensions read from tensor shapes (a single-file release has no config.json)."""
    p = TEXT_PREFIX
    vocab, hidden = _shape(index, p + "embed_tokens.weight", where)
    head_dim = _shape(index, p + "layers.0.self_attn.q_norm.weight", where)[0]
    q_out = _shape(index, p + "layers.0.self_attn.q_proj.weight", where)[0]
    k_out = _shape(index, p + "layers.0.self_attn.k_proj.weight", where)[0]
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "head_dim": head_dim,
        "num_attention_heads": q_out // head_dim,
        "num_key_value_heads": k_out // head_dim,
        "intermediate_size": _shape(index, p + "layers.0.mlp.gate_proj.weight", where)[0],
        "num_hidden_layers": _layer_count(index, p + "layers."),
    }


def single_file_config(index: dict[str, TensorInfo], template: Optional[dict], where: Path) -> tuple[dict, str]:
    """config.json content for a single-file release, and a note saying where each part came from.

    Dimensions always come from the tensor shapes; what shapes cannot tell (rotary sections,
    epsilons, token ids, the vision tower's layout) comes from the official repo's config.json,
    which must agree with the shapes.
    """
    dims = infer_text_dims(index, where)
    if template is None:
        raise ModelLoadError(f"{where}: a single-file checkpoint needs the official config.json for what tensor "
                             "shapes cannot tell (rotary sections, token ids); pass --tokenizer FOLDER "
                             "holding the official small files, or allow the download")
    data = json.loads(json.dumps(template))
    text = data.setdefault("text_config", {})
    wrong = {k: (text.get(k), v) for k, v in dims.items() if text.get(k) not in (None, v)}
    if wrong:
        key, (theirs, ours) = next(iter(wrong.items()))
        raise ModelLoadError(f"{where}: text_config.{key} is {theirs} in the official config.json but the tensors "
                             f"say {ours}; the side files belong to another model")
    text.update(dims)
    if not any(n.startswith("model.visual.") for n in index):
        data.pop("vision_config", None)
    return data, "dimensions read from the tensor shapes, the rest from the official config.json"


@dataclass(frozen=True, eq=False)
class ModelSource:
    arg: str  # as the user gave it
    path: Path  # the folder with the weights (for a single file, its folder)
    name: str  # the model's own name: repo id or the folder's (or file's) last component
    layout: str  # OFFICIAL, CONVERTED or SINGLE_FILE
    config: ModelConfig
    index: dict[str, TensorInfo] = field(repr=False)
    tokenizer_dir: Optional[Path]
    fingerprint: str
    notes: tuple[str, ...] = ()  # what was inferred or fetched, for the user to read
    family: ClassVar[str] = "o1"

    @property
    def quantization(self) -> Optional[dict]:
        """The stored quantization plan (a converted folder), else None."""
        return self.config.quantization

    @property
    def stored(self) -> dict:
        """The metadata our converter stored (recipe, variant, source), else empty."""
        return self.config.hidream or {}

    @property
    def variant(self) -> str:
        return recipe_for_name(self.stored.get("variant") or self.name)

    @classmethod
    def resolve(cls, arg, *, tokenizer: Optional[str] = None, allow_download: bool = True) -> "ModelSource":
        """The source for ``arg`` (a folder, a .safetensors file or a repo id), memoized by argument."""
        if isinstance(arg, ModelSource):
            return arg
        key = (str(arg), None if tokenizer is None else str(tokenizer), allow_download)
        stamp = _stamp(str(arg))
        if key not in _RESOLVED or _RESOLVED[key][0] != stamp:
            _RESOLVED[key] = (stamp, _resolve(str(arg), tokenizer, allow_download))
        return _RESOLVED[key][1]


_RESOLVED: dict[tuple, tuple] = {}


def _stamp(arg: str) -> Optional[tuple]:
    """What says a local checkpoint changed on disk since it was resolved (a folder rewritten in place)."""
    path = Path(arg).expanduser()
    target = path / "config.json" if path.is_dir() else path
    try:
        st = target.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def clear_cache() -> None:
    """Forget resolved sources (tests that rewrite a folder in place)."""
    _RESOLVED.clear()


def _side_files(tokenizer: Optional[str], variant: str, allow_download: bool) -> tuple[Path, str]:
    if tokenizer is not None:
        folder = Path(tokenizer).expanduser()
        if not (folder / "tokenizer.json").is_file():
            raise ModelLoadError(f"{folder}: --tokenizer needs a folder holding tokenizer.json")
        return folder, f"tokenizer, chat template and configs from {folder}"
    repo = OFFICIAL_REPOS["dev" if variant.startswith("dev") else "full"]
    folder = hub_download(repo, SIDE_FILE_PATTERNS, allow_download)
    return folder, f"tokenizer, chat template and configs from {repo} (small files only)"


def _resolve(arg: str, tokenizer: Optional[str], allow_download: bool) -> ModelSource:
    path = resolve_model_path(arg, allow_download)
    name = arg if is_repo_id(arg) else model_name(str(path))
    notes: list[str] = []
    if path.is_file():
        index = read_safetensors_header(path)
        variant = recipe_for_name(path.stem)
        side, where = _side_files(tokenizer, variant, allow_download)
        template = read_json_file(side / "config.json", "model config") if (side / "config.json").is_file() else None
        data, how = single_file_config(index, template, path)
        try:
            config = ModelConfig.from_dict(data)
        except ConfigError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        notes += [f"note: {path.name} is a single-file checkpoint: {how}; variant {variant} from the file name",
                  f"note: {where}"]
        config_bytes, layout, tokenizer_dir, folder = json.dumps(data, sort_keys=True).encode(), SINGLE_FILE, side, path.parent
    else:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"{path}: no config.json (not a HiDream-O1 model folder)")
        config_bytes = config_file.read_bytes()
        config = ModelConfig.from_file(config_file)
        index = checkpoint_index(path)
        layout = CONVERTED if config.quantization else OFFICIAL
        folder = path
        tokenizer_dir = Path(tokenizer).expanduser() if tokenizer else (path if (path / "tokenizer.json").is_file() else None)
    if tokenizer_dir is not None:
        check_chat_template(tokenizer_dir)
    return ModelSource(arg, folder, name, layout, config, index, tokenizer_dir,
                       fingerprint(folder, config_bytes, index), tuple(notes))
