"""tests/tools/make_sparse_i1_checkpoint.py writes what the released HiDream-I1 repos hold.

Its tensor names and shapes are written out from the diffusers layout, independently of our
modules: with a fixture's configs it reproduces that fixture's headers exactly, and at real
size our strict loader accepts every tensor (only headers are read; the files are holes).
"""

import importlib.util
import json
from pathlib import Path

import pytest

from hidream_mlx.families.i1.config import TransformerConfig, VAEConfig
from hidream_mlx.families.i1.transformer import HiDreamImageTransformer
from hidream_mlx.families.i1.vae import AutoencoderKL, torch_to_mlx
from hidream_mlx.families.i1.weights import component_index, expert_widths
from hidream_mlx.weights.loading import TensorInfo, check_against
from i1_support import FIXTURES

TOOL = Path(__file__).parent / "tools" / "make_sparse_i1_checkpoint.py"


def tool():
    spec = importlib.util.spec_from_file_location("make_sparse_i1_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def headers(folder: Path) -> dict:
    return {name: (info.shape, info.dtype) for name, info in component_index(folder).items()}


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_with_a_fixtures_configs_it_writes_that_fixtures_headers(tmp_path, component):
    out = tmp_path / "sparse"
    tool().main([str(out), "--from", str(FIXTURES), "--transformer-config", str(FIXTURES / "transformer" / "config.json"),
                 "--vae-config", str(FIXTURES / "vae" / "config.json"), "--dtype", "F32", "--shard-bytes", "0"])
    assert headers(out / component) == headers(FIXTURES / component)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "i1"
    tool().main([str(out)])
    return out


def test_the_real_size_transformer_is_17b_bf16_in_shards_and_loads_strictly(real):
    folder = real / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((folder / s).stat().st_size <= 5 * 10**9 + 10**6 for s in shards)
    infos = component_index(folder)
    assert {info.dtype for info in infos.values()} == {"BF16"}
    params = sum(info.nbytes for info in infos.values()) // 2
    assert 16.5e9 < params < 17.5e9
    cfg = TransformerConfig.load(folder)
    assert (cfg.num_layers, cfg.num_single_layers, cfg.inner_dim, cfg.num_routed_experts) == (16, 32, 2560, 4)
    widths = expert_widths(infos, folder)
    assert widths == (6912, 3584, 6912)  # int(2*4D/3), int(2*2D/3), int(2*4D/3), each rounded up to 256
    check_against(HiDreamImageTransformer(cfg, widths), infos, folder, prefix="")


def test_the_real_size_vae_loads_strictly(real):
    folder = real / "vae"
    infos = component_index(folder)
    shaped = {k: TensorInfo(**{**v.__dict__, "shape": tuple(torch_to_mlx(k, v.shape))}) for k, v in infos.items()}
    check_against(AutoencoderKL(VAEConfig.load(folder)), shaped, folder, prefix="")
