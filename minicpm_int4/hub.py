"""Where a checkpoint's files are: a local folder as it is, or a Hugging Face Hub model id (`openbmb/MiniCPM-V-4_6-AWQ`),
whose files huggingface_hub fetches into its cache - or finds there, offline (`HF_HUB_OFFLINE=1`) - as
transformers' from_pretrained does. The loaders and the CLI read folders only; this module gives them one.

It also carries a checkpoint's other files (tokenizer, processor, chat template, remote code, licence) into the
folder an int4 model is saved to, so that the folder is as complete as the one it came from: the processor loads
from it, and a published copy needs nothing else."""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
from typing import List, Optional

# Besides the weights: configs (config.json, quantization records, generation_config.json, tokenizer / processor
# configs, weight indexes), remote code, vocabularies, chat templates, licences. Top-level files only (the Hub's
# patterns match across folders: a repo's other folders - original/ weights, examples - are left), and the one
# folder a processor reads, transformers' named chat templates.
SUPPORT_PATTERNS = ("*.json", "*.py", "*.txt", "*.model", "*.tiktoken", "*.jinja", "LICENSE*", "NOTICE*")
WEIGHT_PATTERNS = ("*.safetensors",)
LEGACY_WEIGHT_PATTERNS = ("*.bin",)  # pytorch_model*.bin: fetched only where a model has no safetensors
SUBFOLDERS = ("*/*",)
CHAT_TEMPLATES_DIR = "additional_chat_templates"

# Not carried into an int4 folder: what its own writer puts there (config.json is the int4 model's; a
# generation_config.json is carried where the writer did not write one), other quantizers' records (the folder is not
# theirs any more), weight indexes of files it does not have, and the model card (it describes the other weights).
NOT_CARRIED = ("config.json", "quant_config.json", "quantize_config.json", "*.index.json", "README*", "*.safetensors",
               "*.bin", "*.pt", "*.pth", "*.gguf")

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class CheckpointNotFoundError(FileNotFoundError):
    """Neither a local folder nor a Hub model that could be fetched."""


def looks_like_repo_id(path: str) -> bool:
    """`name` or `owner/name` as the Hub spells them (not `./x`, `/x`, `~/x`, `a/b/c`, `x.safetensors`)."""
    return bool(_REPO_ID.match(path)) and ".." not in path and not path.endswith((".json", ".safetensors", ".bin"))


def _has_weights(folder: str) -> bool:
    return any(f.endswith(".safetensors") for f in os.listdir(folder))


def checkpoint_dir(path, weights: bool = True, revision: Optional[str] = None) -> str:
    """The local folder holding checkpoint `path`: `path` itself where it is a folder; for a Hub model id, the
    snapshot folder huggingface_hub fills with its top-level configs, code, tokenizer files and (with `weights`)
    *.safetensors - or *.bin where it has none - and its named chat templates, printing download progress, or finds
    in its cache when the Hub cannot be reached. Raises CheckpointNotFoundError naming `path` where there is
    neither."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointNotFoundError(f"{path!r} is a file, not a checkpoint folder")
    if not looks_like_repo_id(path):
        raise CheckpointNotFoundError(f"{path!r}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # (transformers depends on it; a bare install may not have it)
        raise CheckpointNotFoundError(f"{path!r} is not a local folder, and huggingface_hub (to fetch it from the "
                                      "Hub) is not installed") from None

    def fetch(allow, ignore=SUBFOLDERS):
        return snapshot_download(path, revision=revision, allow_patterns=list(allow), ignore_patterns=list(ignore))

    try:
        folder = fetch(SUPPORT_PATTERNS + (WEIGHT_PATTERNS if weights else ()))
        if weights and not _has_weights(folder):
            folder = fetch(SUPPORT_PATTERNS + LEGACY_WEIGHT_PATTERNS)
        folder = fetch((f"{CHAT_TEMPLATES_DIR}/*",), ignore=())
    except Exception as e:  # huggingface_hub's errors (not found, gated, offline and not cached) are of many kinds
        raise CheckpointNotFoundError(f"{path!r} is not a local folder, and no Hugging Face Hub model of that name "
                                      f"could be fetched ({type(e).__name__}: {' '.join(str(e).split())})") from e
    return folder


def copy_support_files(src: str, dst: str) -> List[str]:
    """Copy checkpoint folder `src`'s tokenizer, processor, chat-template, remote-code and licence files into `dst`
    (an int4 folder just written), leaving every file `dst` has already - its config.json, generation_config.json
    and modeling code, written from the model - and what NOT_CARRIED names. Returns the names copied."""
    copied = []
    for root, dirs, files in os.walk(src):
        rel_root = os.path.relpath(root, src)
        dirs[:] = [d for d in dirs if d == CHAT_TEMPLATES_DIR] if rel_root == "." else []
        for name in sorted(files):
            rel = name if rel_root == "." else os.path.join(rel_root, name)
            if name.startswith(".") or not any(fnmatch.fnmatch(name, p) for p in SUPPORT_PATTERNS):
                continue
            if any(fnmatch.fnmatch(name, p) for p in NOT_CARRIED) or os.path.exists(os.path.join(dst, rel)):
                continue
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(root, name), os.path.join(dst, rel))  # (the Hub cache holds links: the file)
            copied.append(rel)
    return copied
