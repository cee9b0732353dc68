"""LoRA adapters (PEFT) on the int4 layers: fine-tuning a patched model QLoRA-style, its int4 weights frozen.

PEFT puts adapters only on the layer types it knows; a LoraConfig made here knows QuantLinear too (PEFT's
custom-module hook), so that

    model = minicpm_int4.checkpoint.load_pretrained_quantized("int4/")      # or patch_model(model)
    model = peft.get_peft_model(model, minicpm_int4.peft_integration.lora_config(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    ...train...                                    # gradients: the adapters'; x's through the int4 GEMM
    model.save_pretrained("adapter/")              # the adapter only, as PEFT saves it
    model = minicpm_int4.peft_integration.load_adapter(int4_model, "adapter/")

Each adapted layer computes QuantLinear(x) + B(A(dropout(x))) * scaling, the sum in the adapter's dtype
(fp32 by PEFT's default) rounded once to the layer's. The int4 weight is not changed: merging an adapter into
it (merge_and_unload) would round the adapter's small update away, and is refused with what to do instead
(merged_model: the adapters merged into fp weights, to be quantized again);
so are the LoRA variants and initialisations that read the base layer's floating-point weight (DoRA, PiSSA,
OLoRA, LoftQ, ...). peft is optional: nothing here imports it before it is used.
"""
from __future__ import annotations

import functools
import types
import warnings

from torch import nn

from .qlinear import QuantLinear

# the initialisations that do not read the base layer's weight (PEFT's default, none, gaussian)
PLAIN_INITS = (True, False, "gaussian")
_MERGE_REFUSED = ("merging a LoRA adapter into an int4 QuantLinear would round the adapter's update away "
                  "(its steps are far below the int4 grid's); keep it unmerged (PeftModel runs it beside the int4 "
                  "layer), or merge into fp weights with minicpm_int4.peft_integration.merged_model(model) and "
                  "quantize the merged model again (patch_model)")


def _peft():
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ImportError("LoRA adapters on QuantLinear layers need peft (pip install peft)") from e


@functools.lru_cache(maxsize=None)
def lora_layer_class():
    """The PEFT LoRA layer for a QuantLinear (built on first use: peft is optional)."""
    _peft()
    from peft.tuners.lora.layer import LoraLayer

    class QuantLinearLora(nn.Module, LoraLayer):
        """LoRA adapters beside a frozen QuantLinear: y = QuantLinear(x) + sum over active adapters of
        B(A(dropout(x))) * scaling."""

        def __init__(self, base_layer, adapter_name: str, config=None, r: int = 0, lora_alpha: int = 1, **kwargs):
            super().__init__()
            with warnings.catch_warnings():  # peft 0.13 warns of any layer type it does not list, then reads
                warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)  # in/out_features
                LoraLayer.__init__(self, base_layer)
            # PEFT hands a custom layer its LoraConfig (0.14 on) or, before, the settings as keyword arguments
            # (peft 0.13: the last release that imports under transformers 4.40, which MiniCPM-V 2.x's recipes pin)
            settings = config if config is not None else types.SimpleNamespace(**kwargs)
            refused = [name for name in ("use_dora", "use_qalora", "use_alora", "use_bdlora", "velora_config",
                                         "lora_ga_config")
                       if getattr(settings, name, None)]
            if refused:
                raise ValueError(f"LoRA on an int4 QuantLinear: {refused[0]} is not supported (it needs the base layer's "
                                 "floating-point weight); plain LoRA is")
            init = getattr(settings, "init_lora_weights", True)
            if init not in PLAIN_INITS:
                raise ValueError(f"LoRA on an int4 QuantLinear: init_lora_weights={init!r} reads the base layer's "
                                 f"floating-point weight; use one of {PLAIN_INITS}")
            self._active_adapter = adapter_name
            if config is not None:
                self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
            else:
                self.update_layer(adapter_name, r, lora_alpha=lora_alpha, lora_dropout=kwargs.get("lora_dropout", 0.0),
                                  init_lora_weights=init, use_rslora=kwargs.get("use_rslora", False))

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def resolve_lora_variant(self, *, config, **kwargs):
            return None  # (the variants were refused above)

        def forward(self, x, *args, **kwargs):
            if kwargs.pop("adapter_names", None) is not None:
                raise NotImplementedError("LoRA on an int4 QuantLinear: a batch of rows with different adapters "
                                          "(adapter_names=) is not supported; set one adapter active")
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters:
                return result
            dtype = result.dtype
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                cast = getattr(self, "_cast_input_dtype", None)  # (PEFT's, which its helpers can switch off; 0.14 on)
                xa = cast(x, lora_A.weight.dtype) if cast is not None else x.to(lora_A.weight.dtype)
                result = (result + lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]).to(dtype)
            return result

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise NotImplementedError(_MERGE_REFUSED)

        def unmerge(self) -> None:
            raise NotImplementedError(_MERGE_REFUSED)

        def get_delta_weight(self, adapter):
            raise NotImplementedError(_MERGE_REFUSED)

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return QuantLinearLora


def merged_model(model, dtype=None) -> nn.Module:
    """The fine-tuned model with its active adapters merged into fp weights, to be quantized again
    (patch_model, or save_pretrained and `minicpm-int4 quantize`): then it runs at the int4 kernels' speed with
    no adapter matmuls beside them. Each adapted int4 layer becomes an nn.Linear holding
    dequantize(W) + B A * scaling (summed in fp32; in the layer's dtype, or `dtype`), PEFT merges the adapters of
    the other layers, and the PEFT wrappers go (merge_and_unload); the int4 layers without an adapter stay as
    they are. `model`: the PeftModel. Returns its base model, changed in place."""
    import torch

    from .patch import frozen_linear

    cls = lora_layer_class()
    with torch.no_grad():
        for name, mod in list(model.named_modules()):
            if not isinstance(mod, cls):
                continue
            base = mod.base_layer
            w = base.dequantized_weight().float()
            b = base.bias.detach().float() if base.bias is not None else None
            for adapter in mod.active_adapters:
                if adapter not in mod.lora_A:
                    continue
                lora_A, lora_B, scale = mod.lora_A[adapter], mod.lora_B[adapter], mod.scaling[adapter]
                w += (lora_B.weight.float() @ lora_A.weight.float()) * scale
                if lora_B.bias is not None:  # (lora_bias=True)
                    b = (b if b is not None else torch.zeros_like(w[:, 0])) + lora_B.bias.float() * scale
            out_dtype = dtype or base.dtype
            lin = frozen_linear(w.to(out_dtype), None if b is None else b.to(out_dtype), base.training)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, lin)
    return model.merge_and_unload()


def register(config):
    """Let PEFT LoraConfig `config` put its adapters on QuantLinear layers too (returns it)."""
    config._register_custom_module({QuantLinear: lora_layer_class()})
    return config


def lora_config(**kwargs):
    """peft.LoraConfig(**kwargs) that adapts QuantLinear layers (target_modules names them as for nn.Linear)."""
    _peft()
    from peft import LoraConfig

    return register(LoraConfig(**kwargs))


def load_adapter(model, path: str, **kwargs):
    """peft.PeftModel.from_pretrained(model, path) for a model with QuantLinear layers: a saved adapter's
    LoraConfig does not keep the registration (register), so PEFT alone would refuse the int4 layers."""
    _peft()
    from peft import LoraConfig, PeftModel

    config = register(LoraConfig.from_pretrained(path))
    return PeftModel.from_pretrained(model, path, config=config, **kwargs)
