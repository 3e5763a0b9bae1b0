"""Streaming conversion: converted folders load with no flags, generate, stay faithful to the
float model in the order Q8 < Q6 < Q4, take the bytes their bits say, and conversion memory
stays bounded by a shard rather than the checkpoint."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES, forward_cases, load_case

from hidream_mlx.cli.quantize import REPORT_FILE, quantize
from hidream_mlx.families.o1.convert import convert
from hidream_mlx.quant.writer import ShardWriter
from hidream_mlx.quant.output import TOKENIZER_FILES
from hidream_mlx.families.o1.engine import Engine, Request
from hidream_mlx.weights.loading import ModelLoadError, checkpoint_index
from hidream_mlx.families.o1.loading import load_model
from hidream_mlx.quant.recipes import SUPPORTED_BITS, QuantRecipe, get_quant_recipe
from hidream_mlx.families.o1.recipes import get_recipe
from hidream_mlx.families.o1.replay import predict_recorded

REPO = Path(__file__).resolve().parent.parent
FLAT = get_quant_recipe("flat")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("converted")
    return {bits: convert(str(FIXTURES), root / f"q{bits}", FLAT, bits=bits).output for bits in SUPPORTED_BITS}


def forward_inputs(prefix):
    case = load_case("forward_t2i.npz")
    return {k: case[f"{prefix}.{k}"] for k in ("input_ids", "position_ids", "token_types", "vinputs", "timestep")}


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_converted_folder_loads_with_no_flags_and_generates(bits, converted):
    engine = Engine.load(str(converted[bits]), dtype="float32")
    assert engine.quantization["bits"] == bits and engine.quantization["group_size"] == 64
    recipe = get_recipe("dev").with_overrides(steps=4)
    result = engine.run(Request("a red fox in the snow", 64, 64, 7, recipe))
    assert result.image.shape == (64, 64, 3) and result.image.dtype == np.uint8
    assert result.metadata["quantization"]["bits"] == bits
    assert engine.default_recipe == "full"  # what the folder recorded for its source


def test_x_pred_error_shrinks_with_bits(converted, tiny_model):
    for prefix in forward_cases():
        reference = predict_recorded(tiny_model, **forward_inputs(prefix))
        errors = {}
        for bits, folder in converted.items():
            x = predict_recorded(load_model(folder, dtype=mx.float32), **forward_inputs(prefix))
            errors[bits] = np.linalg.norm(x - reference) / np.linalg.norm(reference)
        # measured: sq256 Q4 3.7e-2, Q6 9.3e-3, Q8 2.8e-3; r192x320 8.0e-2, 2.0e-2, 6.4e-3
        assert errors[2] > errors[3] > errors[4] > errors[5] > errors[6] > errors[8] > 0, errors
        assert errors[8] < 2e-2, errors


def test_in_memory_quantization_equals_the_converted_folder(converted):
    folder_model = load_model(converted[6], dtype=mx.float32)
    memory_model = Engine.load(str(FIXTURES), dtype="float32", quantize_bits=6).model
    inputs = forward_inputs(forward_cases()[0])
    np.testing.assert_array_equal(predict_recorded(folder_model, **inputs), predict_recorded(memory_model, **inputs))


def test_replay_command_runs_on_a_converted_folder(converted, tmp_path):
    from hidream_mlx.cli import main

    out = tmp_path / "replayed.npz"
    result = CliRunner().invoke(main, ["replay", "--model", str(converted[8]), "--case",
                                       str(FIXTURES / "forward_t2i.npz"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    key = f"{forward_cases()[0]}.x_pred"
    recorded, x = load_case("forward_t2i.npz")[key], np.load(out)[key]
    assert np.linalg.norm(x - recorded) / np.linalg.norm(recorded) < 2e-2


def expected_bytes(shape, bits, group_size):
    out, inp = shape
    return out * inp * bits // 8 + out * (inp // group_size) * 2 * 2  # packed + bf16 scales and biases


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_on_disk_bytes_match_bits_per_weight(bits, converted):
    source = checkpoint_index(FIXTURES)
    written = checkpoint_index(converted[bits])
    decoder = [n for n in source if ".layers." in n and n.endswith("_proj.weight")]
    expected = sum(expected_bytes(source[n].shape, bits, 64) for n in decoder)
    actual = sum(written[n].nbytes + written[n[:-6] + "scales"].nbytes + written[n[:-6] + "biases"].nbytes
                 for n in decoder)
    assert actual == pytest.approx(expected, rel=0.02)
    params = sum(int(np.prod(source[n].shape)) for n in decoder)
    assert 8 * actual / params == pytest.approx(bits + 32 / 64, rel=0.02)
    for n, info in source.items():  # everything else: bf16, same shape
        if n not in decoder:
            assert written[n].dtype == "BF16" and written[n].shape == info.shape
    files = sorted(p.name for p in converted[bits].glob("*.safetensors"))
    assert files == ["model-00001-of-00001.safetensors"]


def test_config_json_describes_the_folder(converted):
    config = json.loads((converted[4] / "config.json").read_text())
    original = json.loads((FIXTURES / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in ("quantization", "hidream")} == original
    q = config["quantization"]
    assert (q["mode"], q["bits"], q["group_size"]) == ("affine", 4, 64)
    for kept in ("x_embedder.proj1", "x_embedder.proj2", "t_embedder1.mlp.0", "t_embedder1.mlp.2",
                 "final_layer2.linear", "language_model.embed_tokens"):
        assert q[kept] == "bf16"
    h = config["hidream"]
    assert h["recipe"] == "full" and h["quantize_recipe"] == "flat" and h["vision_tower"] is True
    assert h["source"] == FIXTURES.resolve().name and h["tool_version"]  # the folder's name, never its path
    for name in TOKENIZER_FILES:
        assert (converted[4] / name).is_file() == (FIXTURES / name).is_file()
    index = json.loads((converted[4] / "model.safetensors.index.json").read_text())
    assert "model.visual.merger.linear_fc1.weight" in index["weight_map"]
    assert "model.language_model.layers.0.mlp.up_proj.scales" in index["weight_map"]


def test_recipe_file_overrides_are_honoured(tmp_path):
    recipe_file = tmp_path / "mine.json"
    recipe_file.write_text(json.dumps({"bits": 4, "overrides": [
        {"pattern": "*.layers.1.*", "bits": "bf16"},
        {"pattern": "*.self_attn.o_proj", "bits": 8, "group_size": 32}]}))
    out = convert(str(FIXTURES), tmp_path / "out", QuantRecipe.from_file(recipe_file)).output
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["language_model.layers.1.mlp.up_proj"] == "bf16"
    assert q["language_model.layers.0.self_attn.o_proj"] == {"bits": 8, "group_size": 32}
    written = checkpoint_index(out)
    assert written["model.language_model.layers.1.mlp.up_proj.weight"].dtype == "BF16"
    assert written["model.language_model.layers.2.self_attn.o_proj.scales"].shape == (64, 2)
    assert written["model.language_model.layers.0.mlp.up_proj.weight"].dtype == "U32"
    model = load_model(out, dtype=mx.float32)
    assert model.language_model.layers[0].self_attn.o_proj.bits == 8
    assert json.loads((out / "config.json").read_text())["hidream"]["quantize_recipe"] == "mine"


def test_no_vision_drops_the_vision_tower(tmp_path):
    out = convert(str(FIXTURES), tmp_path / "out", FLAT, bits=8, include_vision=False).output
    assert not any(n.startswith("model.visual.") for n in checkpoint_index(out))
    assert json.loads((out / "config.json").read_text())["hidream"]["vision_tower"] is False
    load_model(out, dtype=mx.float32)


def test_indivisible_group_size_is_skipped_with_a_notice(tmp_path):
    notices = []
    out = convert(str(FIXTURES), tmp_path / "out", FLAT, bits=4, group_size=128, on_notice=notices.append).output
    assert len(notices) == 1 and "language_model.layers.0.mlp.up_proj" in notices[0]
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["language_model.layers.0.mlp.up_proj"] == "bf16"
    assert "language_model.layers.0.mlp.down_proj" not in q  # 128 wide: quantized at the default
    assert load_model(out, dtype=mx.float32).language_model.layers[0].mlp.down_proj.group_size == 128


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(str(FIXTURES), out, FLAT, bits=8)
    assert (out / "keep.txt").is_file()
    with pytest.raises(FileExistsError, match="only a folder written by hidream-mlx quantize"):
        convert(str(FIXTURES), out, FLAT, bits=8, overwrite=True)  # not ours: never deleted
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    convert(str(FIXTURES), out, FLAT, bits=8)
    convert(str(FIXTURES), out, FLAT, bits=4, overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_midway_leaves_neither_output_nor_temp(tmp_path, monkeypatch):
    calls = []

    def disk_full(self):
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardWriter, "flush", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert(str(FIXTURES), tmp_path / "out", FLAT, bits=4, shard_bytes=1_000_000)
    assert calls and list(tmp_path.iterdir()) == []


def test_missing_shard_is_reported_by_the_loader(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((FIXTURES / "config.json").read_text())
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ModelLoadError, match="missing shard model-00001-of-00002.safetensors"):
        convert(str(src), tmp_path / "out", FLAT, bits=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_already_quantized_source_is_refused(converted, tmp_path):
    with pytest.raises(ValueError, match="already quantized"):
        convert(str(converted[8]), tmp_path / "again", FLAT, bits=4)


def test_generate_with_other_bits_on_a_converted_folder_is_refused(converted):
    with pytest.raises(ValueError, match="already quantized to 4 bits; drop -q"):
        Engine.load(str(converted[4]), dtype="float32", quantize_bits=6)
    assert Engine.load(str(converted[4]), dtype="float32", quantize_bits=4).quantization["bits"] == 4


def test_info_treats_q_on_a_converted_folder_as_generate_does(converted):
    from hidream_mlx.cli import main

    other = CliRunner().invoke(main, ["info", "--model", str(converted[4]), "-q", "6"])
    assert other.exit_code != 0
    assert "already quantized to 4 bits; drop -q" in other.output
    same = CliRunner().invoke(main, ["info", "--model", str(converted[4]), "-q", "4"])
    assert same.exit_code == 0, same.output
    assert "stored quantization" in same.output


def test_quantize_command_prints_sizes_and_writes_the_report(tmp_path):
    out = tmp_path / "q4s"
    result = CliRunner().invoke(quantize, ["--model", str(FIXTURES), "--recipe", "q4-selective", "--output",
                                           str(out), "--report", "--report-dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "bits/weight" in result.output and "decoder" in result.output and "embed_tokens" in result.output
    report = (out / REPORT_FILE).read_text()
    assert report.count("| `language_model.layers.") == 21  # every decoder linear, once
    assert "worst layers first" in result.output
    errors = [float(line.rsplit("|", 2)[1]) for line in report.splitlines() if line.startswith("| ") and "`" in line]
    assert errors == sorted(errors, reverse=True) and errors[0] < 5e-2
    decoder = [float(line.rsplit("|", 2)[1]) for line in report.splitlines() if "| `language_model.layers." in line]
    assert min(decoder) > 0  # pixel heads kept in bf16 may show 0 when the source was bf16 already
    for family in ("attention projections", "gate/up", "down_proj", "pixel head", "embeddings"):
        assert f"| q4-selective | " in report and f"| {family} |" in report
    assert "| flat Q4 |" in report and "| q4-down8 |" in report and "with quantized embed_tokens" in report
    assert "ranking of recipes can differ from real weights" in report and "down_proj" in report


@pytest.mark.parametrize("args, message", [
    (["--bits", "7"], "'7' is not one of"),
    (["--bits", "4", "--group-size", "48"], "'48' is not one of"),
    (["--recipe", "q4-selective", "--bits", "8"], "q4-selective is 4-bit"),
    (["--recipe", "flat"], "--bits is required with the flat plan"),
])
def test_quantize_command_bad_input(args, message, tmp_path):
    result = CliRunner().invoke(quantize, ["--model", str(FIXTURES), "--output", str(tmp_path / "o"), *args])
    assert result.exit_code != 0
    assert message in (result.output + str(result.exception))
    assert not (tmp_path / "o").exists()


def test_a_single_file_checkpoint_converts_to_the_same_folder_as_its_official_folder(converted, tmp_path):
    import shutil

    weights, side = tmp_path / "hidream_o1_image_dev_bf16.safetensors", tmp_path / "side"
    shutil.copy(FIXTURES / "model.safetensors", weights)
    side.mkdir()
    for name in (*TOKENIZER_FILES, "config.json"):
        if (FIXTURES / name).is_file():
            shutil.copy(FIXTURES / name, side / name)
    out = tmp_path / "q8"
    result = CliRunner().invoke(quantize, ["--model", str(weights), "--tokenizer", str(side), "--bits", "8",
                                           "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "single-file checkpoint" in result.output
    ours, theirs = json.loads((out / "config.json").read_text()), json.loads((converted[8] / "config.json").read_text())
    assert ours["quantization"] == theirs["quantization"] and ours["text_config"] == theirs["text_config"]
    assert ours["hidream"]["variant"] == weights.stem and ours["hidream"]["source"] == weights.name
    tensors = lambda folder: {k: v for f in sorted(folder.glob("model-*.safetensors")) for k, v in mx.load(str(f)).items()}
    a, b = tensors(out), tensors(converted[8])
    assert sorted(a) == sorted(b)
    assert all(a[name].dtype == b[name].dtype and mx.array_equal(a[name], b[name]).item() for name in a)
    assert all((out / name).read_bytes() == (side / name).read_bytes() for name in TOKENIZER_FILES
               if (side / name).is_file())


def test_script_entry_gives_one_line_errors(tmp_path):
    (tmp_path / "exists").mkdir()
    run = subprocess.run([sys.executable, str(REPO / "quantize" / "convert.py"), "--model", str(FIXTURES),
                          "--bits", "4", "--output", str(tmp_path / "exists")], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error:") and "already exists" in run.stderr
    assert "Traceback" not in run.stderr


def synthetic_checkpoint(folder: Path, layers: int = 36, shards: int = 4, seed: int = 0) -> int:
    """A float32 checkpoint in the official sharded layout with random weights; returns its bytes.

    Hidden 256 with a 4096-wide MLP keeps every layer a few MB, so the 151936-row embedding
    (155 MB) stays the largest tensor and the shards ~160 MB each.
    """
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file

    from hidream_mlx.families.o1.config import ModelConfig
    from hidream_mlx.families.o1.transformer import HiDreamO1

    text = dict(hidden_size=256, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                head_dim=64, intermediate_size=4096, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=5e6,
                rope_scaling={"mrope_section": [12, 10, 10], "mrope_interleaved": True})
    config = {"model_type": "qwen3_vl", "text_config": text}
    skeleton = HiDreamO1(ModelConfig.from_dict(config))
    shapes = {f"model.{n}": p.shape for n, p in tree_flatten(skeleton.parameters())}
    shapes["lm_head.weight"] = (8, 256)  # never converted, whatever its size
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        current.append(name)
        size += int(np.prod(shape)) * 4
        if size >= total / shards and len(groups) < shards - 1:
            groups.append(current)
            current, size = [], 0
    groups.append(current)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, names in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: rng.standard_normal(shapes[n], dtype=np.float32) * 0.05 for n in names}, str(folder / name))
        weight_map.update(dict.fromkeys(names, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return total


PEAK_RSS_CHILD = textwrap.dedent("""
    import sys, threading, time
    import psutil
    from hidream_mlx.families.o1.convert import convert
    from hidream_mlx.quant.recipes import get_quant_recipe

    process = psutil.Process()
    baseline = peak = process.memory_info().rss
    done = threading.Event()

    def sample():
        global peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    conversion = convert(sys.argv[1], sys.argv[2], get_quant_recipe("flat"), bits=4, shard_bytes=64_000_000)
    done.set()
    sampler.join()
    print(baseline, peak, len(conversion.shards))
""")


def test_conversion_memory_stays_near_one_tensor_and_one_shard(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    total = synthetic_checkpoint(src)
    assert len(list(src.glob("*.safetensors"))) == 4 and total > 600e6
    run = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(src), str(tmp_path / "q4")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    baseline, peak, shards = map(int, run.stdout.split())
    # measured: ~235 MB above baseline for a 642 MB checkpoint (the 155 MB float32 embedding
    # read, its bf16 copy, and a pending 64 MB output shard)
    assert peak - baseline < 0.6 * total, (peak - baseline, total)
    assert shards >= 2
    written = checkpoint_index(tmp_path / "q4")
    assert "lm_head.weight" not in written and not any(n.startswith("lm_head") for n in written)
    model = load_model(tmp_path / "q4", dtype=mx.float32, lazy=True)
    assert model.language_model.layers[35].mlp.down_proj.bits == 4
