"""Quantized checkpoints: `model.safetensors` (canonical int4 layout + every other tensor) and
`quant_config.json` (format version, QuantConfig, the quantized modules and their parameters)."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from .config import GROUP_SIZES, QuantConfig
from .hf_integration import QUANT_METHOD, mark_quantized
from .models import hf_config_dtype, hf_dtype_kwargs, unwrap_compiled
from .patch import CONFIG_ATTR, _progress, linear_places
from .qlinear import QuantLinear

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "quant_config.json"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


def _quant_modules(model: nn.Module) -> Dict[str, dict]:
    """name -> spec of every QuantLinear; `input_scale` / `input_perm` only where the layer has one (records
    written before they existed read the same)."""
    return {name: {"in_features": m.in_features, "out_features": m.out_features, "group_size": m.group_size,
                   "act": m.act, "bias": m.bias is not None, "dtype": str(m.scales.dtype).replace("torch.", ""),
                   **({"input_scale": True} if m.input_scale is not None else {}),
                   **({"input_perm": True} if m.input_perm is not None else {})}
            for name, m in model.named_modules() if isinstance(m, QuantLinear)}


_WEIGHT_FILE_ENDINGS = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf")


def check_output_dir(path: str, what: str = "save_quantized") -> None:
    """Refuse to write a checkpoint where it would replace something else: a path that is a file, or a
    folder holding model weights that is not an int4 checkpoint - the fp16 model's own folder, say,
    whose model.safetensors and config.json the int4 ones would overwrite (and whose weights a
    lazily loaded model may still be reading). A new or empty folder, or an int4 checkpoint's, is fine."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what}: {path!r} exists and is not a directory")
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, CONFIG_NAME)):
        return
    weights = sorted(f for f in os.listdir(path) if f.endswith(_WEIGHT_FILE_ENDINGS))
    if weights:
        raise ValueError(f"{what}: {path!r} holds model weights ({weights[0]}) and is not a minicpm_int4 checkpoint "
                         f"(no {CONFIG_NAME}): writing there would replace them; choose a new folder")


def save_quantized(model: nn.Module, path: str, report=None) -> None:
    """Write a patched model to directory `path` (created if needed): model.safetensors,
    quant_config.json and, for a transformers model, its config.json (and generation_config.json where it
    can generate, as save_pretrained writes them). A folder holding other model
    weights (the original model's, say) is refused (check_output_dir); an earlier int4 checkpoint's is
    overwritten."""
    from safetensors.torch import save_file

    model = unwrap_compiled(model)  # a torch.compile wrapper: the model's own names, not `_orig_mod.`-prefixed
    modules = _quant_modules(model)
    if not modules:
        raise ValueError("save_quantized: the model has no QuantLinear layers; call patch_model(model) first")
    check_output_dir(path)
    config = getattr(model, CONFIG_ATTR, None) or QuantConfig()
    os.makedirs(path, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:   # tied weights are stored once
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view of a larger tensor (fuse_projections' rows): older safetensors refuse those
        tensors[key] = t
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "modules": modules, "aliases": aliases}
    if report is not None:
        meta["decisions"] = report.to_dict()["decisions"]
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt", "minicpm_int4": str(FORMAT_VERSION)})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)
    hf_config = getattr(model, "config", None)
    if hasattr(hf_config, "save_pretrained"):  # a transformers model: lets load_pretrained_quantized rebuild it
        if not getattr(hf_config, "architectures", None):
            hf_config.architectures = [type(model).__name__]
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if dtype is not None:  # what the high-precision tensors in the file are (`torch_dtype` in 4.x)
            for key, value in hf_dtype_kwargs(dtype).items():
                setattr(hf_config, key, value)
        if _remote_code_class(model, hf_config):
            # remote code (MiniCPM-V 2.x / o-2.6, loaded with trust_remote_code=True): its modeling files
            # go beside the checkpoint and into config.auto_map, as save_pretrained does; the config
            # class's own file follows in hf_config.save_pretrained
            from transformers.dynamic_module_utils import custom_object_save

            custom_object_save(model, path, config=hf_config)
        qc = getattr(hf_config, "quantization_config", None)
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        stale = qc is not None and getattr(method, "value", method) != QUANT_METHOD
        if stale:  # another package's record (transformers loaded AWQ / GPTQ layers that patch_model converted,
            del hf_config.quantization_config  # and no registry let it put ours there): not in the checkpoint
        # transformers 4.46 - 4.53 keep "attention implementation chosen" in the config, and a config.json that says
        # so made the loaded model use eager attention (not the sdpa of the model saved: other logits); their
        # save_pretrained clears it first, as here
        autoset = [c for c in _configs(hf_config) if getattr(c, "_attn_implementation_autoset", False) is True]
        for c in autoset:
            c._attn_implementation_autoset = False
        try:
            hf_config.save_pretrained(path)
        finally:
            if stale:
                hf_config.quantization_config = qc
            for c in autoset:
                c._attn_implementation_autoset = True
        if _can_generate(model):  # as save_pretrained: eos ids, sampling defaults, generate()'s limits
            model.generation_config.save_pretrained(path)


GENERATION_CONFIG_NAME = "generation_config.json"


def _remote_code_class(model: nn.Module, hf_config) -> bool:
    """Whether `model` is remote code (its class from a checkpoint's own files, which transformers imports under
    `transformers_modules`): then make sure the class knows its auto class, as from_pretrained registers it, so
    that custom_object_save copies its files - transformers 4.45 - 4.52's AutoModel.from_pretrained does not
    register it (4.40 - 4.44's only for a local folder), so those files were left out and the int4 folder did
    not load. The auto class is the config's auto_map entry naming the class, else AutoModel (MiniCPM-V 2.x's)."""
    if getattr(model, "_auto_class", None) is not None:
        return True
    if not type(model).__module__.startswith("transformers_modules."):
        return False
    entry = _auto_map_entry(hf_config, type(model).__name__)
    type(model).register_for_auto_class(entry[0] if entry else "AutoModel")
    return True


def _auto_map_entry(hf_config, class_name: str):
    """(auto class, "module.Class") of the config's auto_map entry for the model class `class_name`, or None."""
    auto_map = getattr(hf_config, "auto_map", None) or {}
    return next(((k, v) for k, v in auto_map.items() if k != "AutoConfig" and isinstance(v, str)
                 and v.rsplit(".", 1)[-1] == class_name), None)


def _configs(hf_config) -> List:
    """A transformers config and the sub-configs it holds (a vision / text config)."""
    subs = [v for v in vars(hf_config).values() if hasattr(v, "to_json_string") and hasattr(v, "save_pretrained")]
    return [hf_config, *subs]


def _can_generate(model: nn.Module) -> bool:
    """Whether transformers' save_pretrained / from_pretrained would write / read the model's
    generation_config.json: a model that can generate and holds a GenerationConfig."""
    can = getattr(model, "can_generate", None)
    return callable(can) and bool(can()) and hasattr(getattr(model, "generation_config", None), "save_pretrained")


def read_generation_config(model: nn.Module, path: str) -> None:
    """Give `model` the generation_config.json of folder `path`, where there is one, as from_pretrained does
    (the checkpoint's end-of-turn tokens and sampling defaults: without them generate() falls back to a
    config derived from config.json and may not stop where the model was meant to, or sample otherwise)."""
    if not _can_generate(model) or not os.path.isfile(os.path.join(path, GENERATION_CONFIG_NAME)):
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(path)


def layer_from_spec(spec: dict, device, backend: str, dtype: Optional[torch.dtype] = None) -> QuantLinear:
    """An empty QuantLinear for one module record of quant_config.json (in `dtype`, default the record's)."""
    return QuantLinear(spec["in_features"], spec["out_features"], bias=spec["bias"], group_size=spec["group_size"],
                       dtype=dtype or getattr(torch, spec["dtype"]), device=device, act=spec["act"], backend=backend,
                       input_scale=spec.get("input_scale", False), input_perm=spec.get("input_perm", False))


def read_json(path: str):
    """json.load of a checkpoint's file; a file that is not JSON is named (json's own error gives a line and
    column, not the file)."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointMismatchError(f"{path} is not valid JSON ({e}): a damaged or unfinished checkpoint") from None


def read_quant_config(path: str) -> dict:
    """quant_config.json of a save_quantized folder or, for a folder that transformers' save_pretrained
    wrote from a patched model, the same record from config.json's quantization_config."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if os.path.exists(cfg_path):
        meta = read_json(cfg_path)
    else:
        hf_path = os.path.join(path, "config.json")
        meta = None
        if os.path.exists(hf_path):
            meta = read_json(hf_path)
            meta = meta.get("quantization_config") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("quant_method") != QUANT_METHOD:
            raise FileNotFoundError(f"{path} is not a minicpm_int4 checkpoint: {CONFIG_NAME} not found, and no "
                                    f"config.json with a {QUANT_METHOD!r} quantization_config")
        cfg_path = hf_path
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointMismatchError(f"{cfg_path}: not a minicpm_int4 record (a JSON object with 'format_version', "
                                      f"'config' and 'modules'), got {str(meta)[:80]}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{cfg_path}: format_version {meta.get('format_version')} is not supported "
                                      f"(this minicpm_int4 reads version {FORMAT_VERSION})")
    return meta


class _TorchFile:
    """A `torch.save`d state dict (pytorch_model.bin) behind the part of safetensors' safe_open API
    the loaders use: keys(), get_slice(key).get_shape(), get_tensor(key)."""

    def __init__(self, path: str):
        try:  # memory-mapped: tensors are read as they are used, not all at once
            self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be mapped
            self._state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(self._state, dict):
            raise CheckpointMismatchError(f"{path} holds a {type(self._state).__name__}, not a state dict")

    def keys(self):
        return self._state.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._state[key]

    def get_slice(self, key: str):
        t = self._state[key]
        return type("_Slice", (), {"get_shape": staticmethod(lambda: list(t.shape))})()


@contextlib.contextmanager
def _open_weights(path: str, allow_bin: bool = False):
    """{tensor name: open file} over model.safetensors, or the shards that model.safetensors.index.json
    lists (save_pretrained of a large model); with `allow_bin` (AWQ / GPTQ checkpoints) also
    pytorch_model.bin (+ index), or the folder's one *.safetensors file of another name (AutoGPTQ's
    `gptq_model-4bit-128g.safetensors`)."""
    from safetensors import safe_open

    candidates = [WEIGHTS_NAME] + (["pytorch_model.bin"] if allow_bin else [])
    files = None
    for single in candidates:
        index = os.path.join(path, single + ".index.json")
        if os.path.exists(os.path.join(path, single)):
            files = [single]
        elif os.path.exists(index):
            index_data = read_json(index)
            weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointMismatchError(f"{index} has no 'weight_map' (tensor name -> file)")
            files = sorted(set(weight_map.values()))
        if files:
            break
    if not files and allow_bin and os.path.isdir(path):
        others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(others) > 1:
            raise FileNotFoundError(f"{path}: {len(others)} .safetensors files ({', '.join(others[:3])}, ...) and no "
                                    f"{WEIGHTS_NAME}.index.json saying which tensor is where")
        files = others
    if not files:
        raise FileNotFoundError(f"{path}: no {' / '.join(candidates)} (nor their .index.json)")
    with contextlib.ExitStack() as stack:
        by_key = {}
        for name in files:
            full, safetensors = os.path.join(path, name), name.endswith(".safetensors")
            try:
                handle = stack.enter_context(safe_open(full, framework="pt")) if safetensors else _TorchFile(full)
            except (OSError, CheckpointMismatchError):
                raise
            except Exception as e:  # safetensors' SafetensorError, torch.load's UnpicklingError ...: name the file
                raise CheckpointMismatchError(f"{full} cannot be read as a {'safetensors' if safetensors else 'torch'} "
                                              f"file ({type(e).__name__}: {e}): a damaged or unfinished download") from e
            by_key.update(dict.fromkeys(handle.keys(), handle))
        yield by_key


def check_load_device(device, what: str) -> torch.device:
    """The device a loader was asked for, refused with the reason where no tensor can be loaded onto it: not a
    device, the meta device (which holds no values: the loaders materialise a model built on it), or a GPU this
    machine / this build of torch has not."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what}(device={device!r}): not a device ({e})") from None
    if d.type == "meta":
        raise ValueError(f"{what}(device='meta'): the meta device holds no values to load a checkpoint into; for the "
                         "model's structure alone, build it under checkpoint.parameters_on_meta()")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise RuntimeError(f"{what}(device={device!r}): no CUDA device here (torch {torch.__version__}, {build})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise RuntimeError(f"{what}(device={device!r}): this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def load_quantized(model: nn.Module, path: str, device=None, progress: bool = True) -> nn.Module:
    """Load a checkpoint written by save_quantized (a folder, or a Hugging Face Hub model id: hub.py) into a
    freshly built model of the same config.

    The Linears named in the checkpoint are replaced by empty QuantLinear modules (QuantLinears of a
    model patched already must match them, and take the checkpoint's act and backend), then every tensor
    is loaded one at a time (bounded memory). Tensors of a model built with its parameters on the
    meta device (see `load_pretrained_quantized`) are materialised on `device` as they are read, so
    the fp16 weights of quantized layers never exist in memory. Raises CheckpointMismatchError
    naming the first module or tensor that does not match.
    """
    from . import foreign
    from .hub import checkpoint_dir

    if device is not None:
        check_load_device(device, "load_quantized")
    path = checkpoint_dir(path)  # a Hub model id: its files, fetched or from the cache
    load_device = device or "cpu"
    wrapper, model = model, unwrap_compiled(model)  # returned as given (a torch.compile wrapper stays one)

    fmt = foreign.detect(path)
    if fmt is not None:  # an AWQ / GPTQ / compressed-tensors checkpoint (foreign.py)
        _load_foreign(model, path, fmt, load_device, progress)
        return wrapper

    meta = read_quant_config(path)
    config = QuantConfig.from_dict(meta["config"])
    places = linear_places(model)
    for name, spec in meta["modules"].items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointMismatchError(f"checkpoint module {name!r} does not exist in the model") from None
        if not isinstance(mod, (nn.Linear, QuantLinear)):
            raise CheckpointMismatchError(f"checkpoint module {name!r} is a {type(mod).__name__} in the model, not a Linear")
        if (mod.in_features, mod.out_features) != (spec["in_features"], spec["out_features"]):
            raise CheckpointMismatchError(
                f"checkpoint module {name!r} is {spec['out_features']} x {spec['in_features']} but the model's is "
                f"{mod.out_features} x {mod.in_features}")
        if isinstance(mod, nn.Linear):
            device = mod.weight.device if mod.weight.device.type != "meta" else torch.device(load_device)
            ql = layer_from_spec(spec, device, config.backend)
            for parent, attr, _ in places.get(id(mod), ()):  # every place of a shared module
                setattr(parent, attr, ql)
        else:  # a model patched already: its layer must hold what the checkpoint holds, and runs as saved
            held = {"group_size": mod.group_size, "dtype": str(mod.dtype).replace("torch.", ""), "bias": mod.bias is not None,
                    "input_scale": mod.input_scale is not None, "input_perm": mod.input_perm is not None}
            for key, value in held.items():
                if value != spec.get(key, False):
                    raise CheckpointMismatchError(f"checkpoint module {name!r} has {key}={spec.get(key, False)!r} but the model's "
                                                  f"QuantLinear has {key}={value!r}")
            mod.act, mod.backend = spec["act"], config.backend
    extra = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and n not in meta["modules"]]
    if extra:
        raise CheckpointMismatchError(f"module {extra[0]!r} is a QuantLinear in the model but not int4 in the checkpoint "
                                      f"({len(extra)} such modules): load into a model that is not patched")

    with _open_weights(path) as files:
        _load_tensors(model, files, meta.get("aliases", {}), load_device, progress)
    _check_loaded_layers(model)
    mark_quantized(model, config)
    return wrapper


def _check_loaded_layers(model: nn.Module) -> None:
    """QuantLinear.check_loaded of every int4 layer (input_perm a permutation, finite scales / zeros)."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            try:
                m.check_loaded(name)
            except ValueError as e:
                raise CheckpointMismatchError(f"checkpoint module {e}") from None


def _load_foreign(model: nn.Module, path: str, fmt, load_device, progress: bool) -> None:
    """An AWQ / GPTQ / compressed-tensors checkpoint into `model`: its int4 layers become QuantLinears
    (foreign.load_layers), every other tensor loads as in load_quantized."""
    from . import foreign

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise CheckpointMismatchError(f"{path} is a {fmt.name} checkpoint: load it into a model that is not patched")
    with _open_weights(path, allow_bin=True) as files:
        consumed, group_size = foreign.load_layers(model, files, fmt, load_device, progress=progress)
        _load_tensors(model, files, {}, load_device, progress, consumed, skip_quant_layers=True, cast=True)
    _check_loaded_layers(model)
    hf_config = getattr(model, "config", None)
    if isinstance(getattr(hf_config, "quantization_config", None), dict):  # the foreign record: ours replaces it
        del hf_config.quantization_config
    mark_quantized(model, QuantConfig(group_size=group_size if group_size in GROUP_SIZES else -1))


def _load_tensors(model: nn.Module, files: Dict, aliases: Dict[str, str], load_device, progress: bool,
                  consumed=(), skip_quant_layers: bool = False, cast: bool = False) -> None:
    """Every tensor of `model`'s state dict from `files` (tensor name -> open file), one at a time:
    meta tensors are materialised on `load_device`, others copied into; tied names stay one tensor.
    Checkpoint tensors named in `consumed` were read already (and with `skip_quant_layers` the
    QuantLinears' own tensors were filled from them); any other tensor the model lacks is an error,
    unless it names one of the model's non-persistent buffers (rotary `inv_freq`, which older
    checkpoints saved and the model computes itself) or the model's class says to ignore it
    (transformers' `_keys_to_ignore_on_load_unexpected`). `cast`: a floating-point tensor of another
    dtype is cast to the model's (else that is an error)."""
    import re

    targets = model.state_dict(keep_vars=True)
    if skip_quant_layers:
        targets = {k: t for k, t in targets.items()
                   if not isinstance(model.get_submodule(k.rpartition(".")[0]), QuantLinear)}
    loaded: Dict[int, torch.Tensor] = {}  # id(model tensor) -> what it holds now: ties stay tied
    first: Dict[int, str] = {}  # id(model tensor) -> the name it was loaded under
    used = set(consumed)
    for key, target in _progress(list(targets.items()), progress, "load int4 checkpoint", "tensor"):
        src = aliases.get(key, key)
        if id(target) in loaded:
            # a second name of one tensor (a tied lm_head / embedding): the tensor loaded under the first name
            # again, not a copy (which would double its memory and untie it). save_pretrained stores it once; a
            # .bin keeps both names with the same values, but a model saved untied (an lm_head given its own
            # weight) has two different ones, which one tensor cannot hold
            if src in files and aliases.get(first[id(target)], first[id(target)]) != src:
                held = loaded[id(target)].detach()
                t = files[src].get_tensor(src)
                if tuple(t.shape) != tuple(held.shape) or not torch.equal(t.to(held.dtype), held.cpu()):
                    raise CheckpointMismatchError(
                        f"tensors {first[id(target)]!r} and {key!r} are one tensor in the model (tied) but differ in "
                        "the checkpoint, whose model had them untied: build the model untied (tie_word_embeddings="
                        "False in its config), as load_pretrained_quantized does from a checkpoint's config.json")
            if target.device.type == "meta":
                _assign(model, key, loaded[id(target)])
            used.add(src)
            continue
        if src not in files:
            raise CheckpointMismatchError(f"tensor {key!r} of the model is missing from the checkpoint")
        f = files[src]
        sl = f.get_slice(src)
        shape = tuple(sl.get_shape())
        if shape != tuple(target.shape):
            raise CheckpointMismatchError(f"tensor {key!r}: checkpoint shape {shape} != model shape {tuple(target.shape)}")
        t = f.get_tensor(src)
        if cast and t.dtype != target.dtype and t.is_floating_point() and target.is_floating_point():
            t = t.to(target.dtype)
        if t.dtype != target.dtype:
            hint = (f" (a model saved in {t.dtype}: build the model in that dtype - load_pretrained_quantized does - and "
                    "convert it after loading, model.to(dtype))" if t.is_floating_point() and target.is_floating_point()
                    else "")
            raise CheckpointMismatchError(f"tensor {key!r}: checkpoint dtype {t.dtype} != model dtype {target.dtype}{hint}")
        if target.device.type == "meta":
            loaded[id(target)] = _assign(model, key, t.to(load_device))
        else:
            with torch.no_grad():
                target.data.copy_(t)
            loaded[id(target)] = target
        first.setdefault(id(target), key)
        used.add(src)
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    used |= {name for name, _ in model.named_buffers(remove_duplicate=False)} - set(model.state_dict())
    extra = sorted(k for k in set(files) - used if not any(p.search(k) for p in ignore))
    if extra:
        raise CheckpointMismatchError(f"tensor {extra[0]!r} in the checkpoint has no counterpart in the model "
                                      f"({len(extra)} unexpected tensors)")


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
    """Replace the meta parameter/buffer `key` of `model` by `value` (a Parameter is set as it is);
    returns what was set."""
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if not value.is_contiguous():  # a view a .bin file kept as one (torch.save keeps strides): held contiguous, as
        # the model's own tensors are and the kernels read a QuantLinear's (row-major)
        value = value.contiguous()
    if attr in mod._parameters:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        mod._parameters[attr] = value
    else:
        mod._buffers[attr] = value
    return value


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (buffers stay real): each parameter
    exists in memory only while its own module is constructed, so a model's skeleton costs nothing."""
    register = nn.Module.register_parameter

    def register_on_meta(self, name, param):
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_pretrained_quantized(path: str, device="cpu", model_class=None, trust_remote_code: bool = False,
                              progress: bool = True, dtype: Optional[torch.dtype] = None, revision: Optional[str] = None,
                              **config_overrides) -> nn.Module:
    """Rebuild a transformers model from the `config.json` that `minicpm-int4 quantize` saves beside the
    checkpoint and load the int4 checkpoint into it, module by module, never holding fp16 copies of
    the quantized layers. `path` is a folder or a Hugging Face Hub model id (`openbmb/MiniCPM-V-4_6-AWQ`:
    fetched as from_pretrained fetches one, at `revision` - a branch, tag or commit - if given; hub.py).
    `model_class` defaults to the config's first `architectures` entry: a
    transformers class, or for remote code (MiniCPM-V 2.x / o-2.6, whose modeling files
    save_quantized copied beside the checkpoint) the `auto_map` class of that name, which needs
    `trust_remote_code=True` as `from_pretrained` does.

    `path` may also be an int4 checkpoint of AutoAWQ (GEMM layout), GPTQ (AutoGPTQ / GPTQModel, act-order
    too) or compressed-tensors (llm-compressor's pack-quantized): its layers are read exactly into
    QuantLinears (foreign.py), so the model computes what it computed there, on this package's kernels;
    `save_quantized` then writes it in this package's format (`minicpm-int4 convert`). `dtype`
    (default: config.json's) builds such a model in another dtype, its other tensors cast as
    from_pretrained(dtype=) casts them: AWQ's scales are fp16, so a checkpoint whose config says bf16
    runs its int4 layers exactly in fp16 or fp32, not bf16. This package's own checkpoints load in
    the dtype they were saved in (model.to(dtype) converts after)."""
    import transformers

    from . import foreign
    from .hub import checkpoint_dir

    check_load_device(device, "load_pretrained_quantized")  # before a download and minutes of building
    path = checkpoint_dir(path, revision=revision)  # a Hub model id: its files, fetched (with progress) or cached
    fmt = foreign.detect(path)  # before minutes of building: an unreadable AWQ / GPTQ variant fails here
    if dtype is not None and fmt is None:
        raise ValueError(f"load_pretrained_quantized(dtype={dtype}) is for AWQ / GPTQ / compressed-tensors checkpoints; "
                         f"{path} holds this package's tensors in the dtype they were saved in: load it, then "
                         "model.to(dtype)")
    cfg = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **config_overrides)
    if fmt is not None and hasattr(cfg, "quantization_config"):  # not for transformers to act on
        del cfg.quantization_config
    if model_class is None:
        model_class = _model_class_of(cfg, path, trust_remote_code)
    dtype = dtype or hf_config_dtype(cfg)
    with parameters_on_meta():
        model = model_class._from_config(cfg, **hf_dtype_kwargs(dtype))
    model = model.eval()
    read_generation_config(model, path)
    for name, buf in list(model.named_buffers()):
        if buf.device != torch.device(device) and buf.device.type != "meta":
            _assign(model, name, buf.to(device))
    load_quantized(model, path, device=device, progress=progress)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointMismatchError(f"parameter {leftover[0]!r} was not in the checkpoint ({len(leftover)} missing)")
    return model


def _model_class_of(cfg, path: str, trust_remote_code: bool):
    """The model class config.json names: `architectures[0]` from transformers, else from the remote
    code of `auto_map` in `path`."""
    import transformers

    archs = getattr(cfg, "architectures", None) or []
    if archs and hasattr(transformers, archs[0]):
        return getattr(transformers, archs[0])
    entry = _auto_map_entry(cfg, archs[0]) if archs else None
    if entry is None:
        auto_map = {k: v for k, v in (getattr(cfg, "auto_map", None) or {}).items() if k != "AutoConfig"}
        raise ValueError(f"{path}/config.json names no transformers model class ({archs}) and no remote-code class "
                         f"of that name in auto_map ({auto_map}); pass model_class=")
    auto, ref = entry
    if not trust_remote_code:
        raise ValueError(f"{path}/config.json names the remote-code class {ref} (a file beside the checkpoint): "
                         "pass trust_remote_code=True to run it, as from_pretrained asks")
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cls = get_class_from_dynamic_module(ref, path)
    # as from_pretrained does: the class then knows its auto_map entry, so that save_quantized of the
    # loaded model copies its modeling files again (a converted or re-saved checkpoint stays loadable)
    cls.register_for_auto_class(auto)
    return cls
