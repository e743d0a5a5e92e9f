"""Where DiffusionGemma models come from: a local checkpoint, or a config built in code.

Nothing here downloads: ``load_model`` reads a local folder only, and the random-weight
builders exist for tests and speed measurements (a tiny config runs a denoising step on a
CPU in milliseconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError

#: Where the bundled demo model (safetensors + config + tokenizer.json) lives in the package.
BUILTIN_MODEL_DIR = Path(__file__).resolve().parent.parent / "model"

#: Text-config sizes of the random-weight presets. "tiny" is what the tests use; "40m" is
#: the ~40M-parameter CPU benchmark size.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, num_experts=4, top_k_experts=2, moe_intermediate_size=64,
                 sliding_window=64),
    # DiffusionGemma 26B-A4B, approximately: 30 layers (5 sliding : 1 full), window 1024,
    # 128 experts top-8 plus a dense MLP, 262k vocab (published); hidden 2816, expert width
    # 704, dense width 2112, 16 heads of 256 (global layers 2 KV heads of 512) are derived
    # to match the published 25.2B total / 3.8B active parameters. For speed measurements
    # with random weights; a real checkpoint's config.json is authoritative.
    "diffusiongemma-26b-a4b": dict(hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                                   num_attention_heads=16, num_key_value_heads=8, head_dim=256, num_experts=128,
                                   top_k_experts=8, moe_intermediate_size=704, sliding_window=1024,
                                   num_global_key_value_heads=2, global_head_dim=512,
                                   layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention")
                                                for i in range(30)]),
    "40m": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64, num_experts=8, top_k_experts=2, moe_intermediate_size=256,
                sliding_window=256),
}


def diffusion_gemma_config(vocab_size: int, *, preset: str = "tiny", canvas_length: int = 256,
                           max_position_embeddings: int = 4096, pad_token_id: int = 0, eos_token_id: int = 1,
                           bos_token_id: int = 2, **overrides: Any) -> Any:
    """A ``DiffusionGemmaConfig`` of a preset size with a zero-layer vision tower.

    The last layer is full attention and the others sliding, as in the released model.

    >>> cfg = diffusion_gemma_config(300, preset="tiny", canvas_length=32)
    >>> cfg.canvas_length, cfg.text_config.vocab_size, cfg.text_config.layer_types
    (32, 300, ['sliding_attention', 'full_attention'])
    """
    from transformers import DiffusionGemmaConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    text = dict(PRESETS[preset], vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=bos_token_id)
    text.update(overrides)
    n = text["num_hidden_layers"]
    text.setdefault("layer_types", ["sliding_attention"] * (n - 1) + ["full_attention"])
    vision = dict(model_type="gemma4_vision", num_hidden_layers=0, hidden_size=32, intermediate_size=64,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    # No image tokens: generate() compares the prompt with image_token_id, so it must be an
    # int; the pad id never occurs in a prompt.
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, boi_token_id=None, eoi_token_id=None,
                                image_token_id=pad_token_id, canvas_length=canvas_length)


def random_model(config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Any:
    """A ``DiffusionGemmaForBlockDiffusion`` with seeded random weights, in eval mode."""
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dev = torch.device(device)
    small = config.text_config.hidden_size <= 1024
    if small:  # built on the CPU in fp32, then moved: the same weights on every device for a seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DiffusionGemmaForBlockDiffusion(config)
        return model.to(device=dev, dtype=dtype).eval()
    # Real-width configs are built in place (26B parameters would not fit in host memory as fp32).
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            model = build_tied(DiffusionGemmaForBlockDiffusion, config, dev)
    finally:
        torch.set_default_dtype(old_dtype)
    return model.eval()


def build_tied(model_class: Any, config: Any, device: torch.device) -> Any:
    """``model_class(config)`` on ``device``, each tied weight allocated once.

    DiffusionGemma's encoder and decoder share their text weights, but the model's
    constructor allocates both stacks and ties them afterwards: ~100 GB for a moment at
    26B-A4B in bf16, more than an 80 GB H100 (or a 96 GB RTX PRO 6000) holds. Here each
    parameter goes to the meta device as soon as it is created (buffers, such as the rotary
    frequencies, are computed on ``device`` as usual), the constructor ties the meta
    parameters, then each distinct parameter gets storage once and the model's own
    initialisation fills it (from torch's current seed). Not for concurrent use: it
    patches ``nn.Module.register_parameter`` while the constructor runs.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:  # created on the device, freed here: one at a time
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        with device:
            model = model_class(config)
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    storage: dict[int, torch.nn.Parameter] = {}  # id of a meta parameter -> its one tensor on the device
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in storage:
                storage[id(param)] = torch.nn.Parameter(torch.empty_like(param, device=device),
                                                        requires_grad=param.requires_grad)
            module._parameters[name] = storage[id(param)]
        module.__dict__.pop("_is_hf_initialized", None)  # set while the parameters were on meta
    model.init_weights()
    return model


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """Load a DiffusionGemma checkpoint from a local folder (never from the hub)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p} is not a model folder: it has no config.json (expected a local "
                             "DiffusionGemmaForBlockDiffusion checkpoint: config.json + *.safetensors)")
    try:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(p, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load a DiffusionGemma checkpoint from {p}: {e}") from e
    return model.to(device).eval()
