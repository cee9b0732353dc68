"""transformers integration: `from_pretrained` / `save_pretrained` of int4 models.

`register()` adds the quantization method "minicpm_int4" to transformers' quantizer registry
(transformers >= 4.50 has one; 4.40 - 4.49 have none, and the functions here then do nothing). A patched
transformers model carries `config.quantization_config` = {"quant_method": "minicpm_int4",
"format_version", "config": QuantConfig, "modules": {name: spec}} - the same module specs as
quant_config.json - so that:

    model.save_pretrained(out)                            # int4 tensors + that config.json
    AutoModelForImageTextToText.from_pretrained(out)      # QuantLinears built, int4 tensors loaded

`import minicpm_int4`, before or after transformers, registers the method as soon as transformers
imports its quantizer registry, through a one-shot import hook that costs nothing until then;
`register()` does it by hand. Without the registration transformers would skip an unknown method
with a warning and load the Linears' weights as missing - random. An fp checkpoint can also be
quantized as it loads:
`from_pretrained(path, quantization_config=minicpm_int4.hf_integration.quantization_config(QuantConfig()))`
loads the fp weights, then runs patch_model.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Optional

import torch
from torch import nn

QUANT_METHOD = "minicpm_int4"


@functools.lru_cache(maxsize=None)
def register() -> Optional[str]:
    """Register "minicpm_int4" with transformers; None once done, else why it cannot be (no
    transformers, or a version without a quantizer registry)."""
    try:
        from transformers import __version__ as transformers_version
        from transformers.quantizers import HfQuantizer
        from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                                  register_quantization_config, register_quantizer)
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError as e:
        version = getattr(sys.modules.get("transformers"), "__version__", "?")
        return f"transformers {version} has no quantizer registry ({e})"

    class MiniCPMInt4Config(QuantizationConfigMixin):
        """config.json's quantization_config of a minicpm_int4 model."""

        def __init__(self, modules=None, config=None, format_version=None, **kwargs):
            from .checkpoint import FORMAT_VERSION

            self.quant_method = QUANT_METHOD
            self.format_version = FORMAT_VERSION if format_version is None else format_version
            self.config = dict(config or {})
            self.modules = dict(modules or {})

        def to_dict(self):
            return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                    "config": dict(self.config), "modules": dict(self.modules)}

        def to_diff_dict(self):
            return self.to_dict()

    class MiniCPMInt4HfQuantizer(HfQuantizer):
        """Pre-quantized checkpoints: the Linears named in the config become empty QuantLinears before
        the tensors load. An fp checkpoint with this config passed to from_pretrained: patch_model once
        the fp weights have loaded."""

        requires_calibration = False

        def validate_environment(self, *args, **kwargs):
            from .checkpoint import FORMAT_VERSION, CheckpointMismatchError
            from .models import transformers_major

            version = self.quantization_config.format_version
            if getattr(self, "pre_quantized", True) and version != FORMAT_VERSION:
                raise CheckpointMismatchError(f"quantization_config format_version {version} is not supported "
                                              f"(this minicpm_int4 reads version {FORMAT_VERSION})")
            if transformers_major() < 5 and importlib.util.find_spec("accelerate") is None:
                # 4.x builds a quantized model under accelerate's init_empty_weights
                raise ImportError(f"from_pretrained of a {QUANT_METHOD} model under transformers {transformers_version} "
                                  "needs accelerate (pip install accelerate); "
                                  "minicpm_int4.checkpoint.load_pretrained_quantized(path) loads it without")

        def update_dtype(self, dtype):
            return dtype

        def _process_model_before_weight_loading(self, model, **kwargs):
            if getattr(self, "pre_quantized", True):
                build_quantized_modules(model, self.quantization_config.modules, self.quantization_config.config)

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .config import QuantConfig

            if getattr(self, "pre_quantized", True):
                from .ops import w4a16_workspace

                with torch.no_grad():
                    for name, m in model.named_modules():
                        if not isinstance(m, _quant_linear()):
                            continue
                        m.check_loaded(name)  # the kernels read x through input_perm: a bad index is refused here
                        if m.workspace.device != m.qweight.device:  # 4.x leaves unsaved buffers on meta
                            m.workspace = w4a16_workspace(m.out_features, m.qweight.device)
                        else:
                            m.workspace.zero_()  # 5.x allocates it, uninitialised, with the rest of the model
                mark_quantized(model, QuantConfig.from_dict(self.quantization_config.config))
            else:
                from .patch import patch_model

                patch_model(model, QuantConfig.from_dict(self.quantization_config.config))
            return model

        def is_serializable(self, *args, **kwargs):  # a method in 4.55+ / 5.x, a property before: truthy either way
            return True

        @property
        def is_trainable(self):  # adapters (PEFT: peft_integration.py) train over the frozen int4 layers, whose
            return True          # backward sends gradients to x; transformers' Trainer asks before it trains

        def _dequantize(self, model, dtype=None):  # model.dequantize(): fp Linears with the int4 model's weights
            from .patch import dequantize_model

            dequantize_model(model, dtype, _forget=False)
            return model

        @property
        def is_compileable(self):  # the layers are custom ops with fake kernels: generate may compile the decode step
            return True

    for cls in (MiniCPMInt4Config, MiniCPMInt4HfQuantizer):
        # module-level names (through __getattr__ below): a patched model's config pickles (torch.save(model))
        cls.__qualname__ = cls.__name__
        _registered.setdefault(cls.__name__, cls)
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(_registered["MiniCPMInt4Config"])
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(_registered["MiniCPMInt4HfQuantizer"])
    _registered["config_class"] = AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
    return None


_registered: dict = {}


def __getattr__(name: str):
    """MiniCPMInt4Config / MiniCPMInt4HfQuantizer, defined by register() (their base classes come with
    transformers' quantizer registry, imported only when needed): what unpickling a model looks up."""
    if name in ("MiniCPMInt4Config", "MiniCPMInt4HfQuantizer"):
        why = register()
        if why:
            raise AttributeError(f"{__name__}.{name} needs transformers' quantizer registry: {why}")
        return _registered[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: when transformers imports its quantizer registry (`transformers.quantizers`,
    which modeling_utils imports before any model loads), register() runs right after it, so that
    `import minicpm_int4` costs nothing here (the registry's import takes ~2 s) and still comes first."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers.quantizers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real one, from the other finders
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            register()
        except Exception as e:  # never break transformers' own import
            warnings.warn(f"minicpm_int4 could not register with transformers' quantizers: {type(e).__name__}: {e}")

    def __getattr__(self, name):  # get_source, is_package, ... of the real loader
        return getattr(self.loader, name)


def register_when_transformers_loads() -> None:
    """register() now if transformers' quantizer registry is imported already, else right after it is
    (import minicpm_int4 calls this)."""
    if "transformers.quantizers" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def _quant_linear():
    from .qlinear import QuantLinear

    return QuantLinear


def quantization_config(config=None, modules=None):
    """The transformers quantization config object for a QuantConfig (and, for a quantized model,
    its module specs). Raises RuntimeError where transformers has no quantizer registry."""
    from .config import QuantConfig

    config = config or QuantConfig()
    needs = [(what, flag) for what, flag, used in (
        ("method='gptq'", "--method gptq", config.method == "gptq"),
        ("input_scales=True", "--input-scales", config.input_scales),
        ("keep_most_sensitive / weight_budget_bytes", "--keep-most-sensitive K / --weight-budget-mib B",
         config.mixed_precision)) if used]
    if modules is None and needs:
        raise ValueError(f"QuantConfig({', '.join(w for w, _ in needs)}) needs calibration inputs, which quantizing "
                         "inside from_pretrained does not have: load the fp model, then patch_model(model, config, "
                         "calibration=minicpm_int4.calibrate(model, batches)) and model.save_pretrained(...), or from "
                         f"the shell minicpm-int4 quantize MODEL OUT {' '.join(f for _, f in needs)} --calibration "
                         "prompts.txt [--calibration-images DIR]")
    why = register()
    if why:
        raise RuntimeError(f"minicpm_int4 cannot plug into from_pretrained here: {why}")
    return _registered["config_class"](modules=modules, config=config.to_dict())


def build_quantized_modules(model: nn.Module, modules: dict, config: dict) -> None:
    """Replace every Linear named in `modules` (specs as quant_config.json writes them) by an empty
    QuantLinear on the Linear's device (the meta device while transformers builds a model), at every
    place of a shared module. The layer's dtype is the model's, which the loader casts the stored
    scales / zeros / bias to (the specs' dtype is what was saved)."""
    from .checkpoint import CheckpointMismatchError, layer_from_spec
    from .patch import linear_places
    from .quantize import LAYER_DTYPES

    QuantLinear = _quant_linear()
    backend = config.get("backend", "auto")
    places = linear_places(model)
    for name, spec in modules.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointMismatchError(f"quantization_config module {name!r} does not exist in the model") from None
        if isinstance(mod, QuantLinear):
            continue
        if not isinstance(mod, nn.Linear) or (mod.in_features, mod.out_features) != (spec["in_features"], spec["out_features"]):
            raise CheckpointMismatchError(f"quantization_config module {name!r} is {spec['out_features']} x "
                                          f"{spec['in_features']} int4; the model has a {type(mod).__name__} there")
        dtype = mod.weight.dtype if mod.weight.dtype in LAYER_DTYPES else None
        ql = layer_from_spec(spec, mod.weight.device, backend, dtype)
        for parent, attr, _ in places[id(mod)]:
            setattr(parent, attr, ql)
            _mark_initialized(parent)
    untie_quantized(model)  # before the tensors load: 5.x ties what all_tied_weights_keys says after loading


def _mark_initialized(parent: nn.Module) -> None:
    """Tell transformers' weight init to pass over a module that now holds a QuantLinear and has no tensors
    of its own. transformers 5.0 - 5.3 run every module's _init_weights after loading (later versions skip a
    module whose tensors all loaded), and some read their children's weights there - SiglipAttention's
    initialises q_proj.weight - which a QuantLinear has not: from_pretrained of a model with an int4
    attention in a SigLIP vision tower stopped in an AttributeError. The children are still visited one by
    one (a kept Linear's own init sees its loaded weight and leaves it)."""
    if next(parent.parameters(recurse=False), None) is None and next(parent.buffers(recurse=False), None) is None:
        parent._is_hf_initialized = True


def _tie_configs(config) -> list:
    """The config objects whose tie_word_embeddings transformers reads: the model's own (5.x, 4.40) and
    its decoder text config (4.45+: get_text_config(decoder=True)), each once."""
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text(decoder=True)
        except TypeError:  # a get_text_config without the decoder argument
            text = get_text()
        if text is not None and all(text is not c for c in configs):
            configs.append(text)
    return configs


def untie_quantized(model: nn.Module) -> list:
    """A Linear that transformers ties to another module's weight - an lm_head tied to the input
    embeddings (MiniCPM-V OCR, small LLMs) - and that is now a QuantLinear is tied no more: its int4
    weight is its own, the embeddings keep theirs. Record that where transformers reads it, else
    `tie_weights()` (from_pretrained, resize_token_embeddings, PEFT) puts the embeddings' fp matrix on the
    QuantLinear as a `weight` its forward never reads (and save_pretrained then writes), and transformers
    5.x's from_pretrained of the saved model fails looking for that weight: each transformers model's
    `all_tied_weights_keys` (5.x, the tying that loading does) loses the pairs with an int4 end, and its
    config's `tie_word_embeddings` (what a saved config.json, `tie_weights()` and 4.x read) becomes False
    where no other pair is left to tie. Returns the QuantLinears' names untied (new ones only)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    QuantLinear = _quant_linear()
    names = {id(m): n for n, m in model.named_modules()}
    untied = []
    for _, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue

        def int4_owner(param: str):  # the QuantLinear holding `param` (a name relative to sub) in sub, else None
            try:
                owner = sub.get_submodule(param.rpartition(".")[0])
            except AttributeError:
                return None
            return owner if isinstance(owner, QuantLinear) else None

        held = getattr(sub, "all_tied_weights_keys", None)  # 5.x: {target: source}, sub's and its children's
        if isinstance(held, dict):
            for target in [t for t, s in held.items() if int4_owner(t) or int4_owner(s)]:
                del held[target]
        if not any(getattr(c, "tie_word_embeddings", False) for c in _tie_configs(sub.config)):
            continue
        if hasattr(sub, "get_expanded_tied_weights_keys"):  # 5.x: the pairs sub's config ties
            try:
                pairs = sub.get_expanded_tied_weights_keys(all_submodels=False)
            except ValueError:  # a pattern that matches nothing now: nothing of it is tied either
                pairs = {}
            owners = [int4_owner(t) or int4_owner(s) for t, s in pairs.items()]
        else:  # 4.x: tie_weights() ties get_output_embeddings() to the input embeddings
            try:
                out = sub.get_output_embeddings()
            except (AttributeError, NotImplementedError):
                out = None
            owners = [out] if isinstance(out, QuantLinear) else []
        if owners and all(owners):
            for c in _tie_configs(sub.config):
                if getattr(c, "tie_word_embeddings", False):
                    c.tie_word_embeddings = False
            untied += [names.get(id(o), "?") for o in owners]
    return untied


def _replace_foreign_quantizer(model: nn.Module, qc) -> None:
    """A model transformers loaded through another quantization method (an AWQ / GPTQ / compressed-tensors
    checkpoint) keeps that method's quantizer as `model.hf_quantizer`, which transformers asks when the model
    saves, compiles, trains or dequantizes. Once its layers are QuantLinears (patch_model converts them), it is
    this package's: model.dequantize() would otherwise call compressed-tensors' quantizer (NotImplementedError)
    or AutoAWQ's on layers it no longer has. Not while a layer of that method is left (patch_model kept it), nor
    for a model without a quantizer."""
    from .patch import foreign_quantization

    current = getattr(model, "hf_quantizer", None)
    ours = _registered["MiniCPMInt4HfQuantizer"]
    if current is None or isinstance(current, ours) or any(foreign_quantization(m) for m in model.modules()):
        return
    model.hf_quantizer = ours(qc, pre_quantized=True)
    if hasattr(model, "quantization_method"):  # 4.x sets it beside hf_quantizer
        model.quantization_method = QUANT_METHOD


def mark_quantized(model: nn.Module, config) -> list:
    """Record on a patched / loaded model what it holds: the QuantConfig (patch_model's default for a
    second call, save_quantized's record; None: leave it), a tied output embedding that is int4 now as
    untied (untie_quantized, whose list of names this returns) and, for a transformers model where the
    registry exists, config.quantization_config, which save_pretrained writes and from_pretrained reads back."""
    from .checkpoint import _quant_modules
    from .patch import CONFIG_ATTR

    if config is not None:
        setattr(model, CONFIG_ATTR, config)
    untied = untie_quantized(model)
    hf_config = getattr(model, "config", None)
    if not hasattr(hf_config, "save_pretrained") or register():
        return untied
    modules = _quant_modules(model)
    if modules:
        hf_config.quantization_config = quantization_config(config, modules)
        _replace_foreign_quantizer(model, hf_config.quantization_config)
    else:
        qc = getattr(hf_config, "quantization_config", None)
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if method == QUANT_METHOD:  # no int4 layer left (dequantize_model)
            del hf_config.quantization_config
    return untied
