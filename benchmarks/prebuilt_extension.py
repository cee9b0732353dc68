"""The CUDA extension minicpm_int4._C built here, without a GPU, for the GPU suite's device call to carry.

Building _C is the suite's install stage (most of a minute on the GPU machine's 16 cores, every time a fresh machine
starts - each device call, with a 30-second idle release - out of a 15-minute device budget). Built before the call
against the GPU image's own torch (benchmarks/prebuild_extension.sh: same torch build, same Python, sm_90a), the
library travels with the call (carry [".prebuilt"]) and the suite installs it instead - where, and only where, it
still matches:

  pack    (here)     .prebuilt/<the library> + manifest.json: a digest of what the library is compiled from
                     (csrc/ and setup.py), the torch build it links against, the Python extension suffix, the
                     architectures it holds code for;
  install (there)    refuses, saying why, unless the checkout's sources have the same digest, the running torch is
                     the same build, the suffix is this Python's and the GPU's architecture is among the library's;
                     then copies it into minicpm_int4/ and loads it the way ops.py does (a library that does not
                     load, or an older build's schema, is removed again and refused). A refusal exits 1: the suite
                     then builds the extension as it always did.

  python benchmarks/prebuilt_extension.py pack BUILT_LIBRARY --archs 9.0a [--out .prebuilt]
  python benchmarks/prebuilt_extension.py install .prebuilt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = "manifest.json"
FORMAT = 1


def sources_digest(root: str = ROOT) -> str:
    """sha256 over what the library is compiled from: every file in csrc/ (name and bytes) and setup.py (the
    compiler's flags). A change to any of them - a comment included - makes a carried library stale."""
    h = hashlib.sha256()
    csrc = os.path.join(root, "csrc")
    if not os.path.isdir(csrc):
        raise FileNotFoundError(f"no csrc/ folder in {root}")
    for rel in [os.path.join("csrc", name) for name in sorted(os.listdir(csrc))] + ["setup.py"]:
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            continue
        h.update(rel.encode() + b"\0")
        with open(path, "rb") as f:
            data = f.read()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _torch_build():
    import torch

    return {"torch": torch.__version__, "torch_git": getattr(torch.version, "git_version", None),
            "torch_cuda": torch.version.cuda}


def _arch_matches(archs, capability) -> bool:
    """Whether a library built for TORCH_CUDA_ARCH_LIST entries `archs` (e.g. ["9.0a"], ["8.0", "9.0+PTX"]) holds
    machine code for a GPU of compute capability `capability` ((9, 0)). (Exact matches only: the package's sm_90a
    kernels are not in a plain 9.0 build, and PTX left for a newer GPU to compile would be timed with its JIT.)"""
    want = f"{capability[0]}.{capability[1]}"
    return any(a.split("+")[0].rstrip("a") == want for a in archs)


def check(manifest: dict, root: str = ROOT, build=None, ext_suffix=None, capability=None):
    """Why the library `manifest` describes cannot stand in for a build in checkout `root` under this torch
    (`build`: _torch_build()'s fields), Python (`ext_suffix`) and GPU (`capability`) - or None where it can."""
    if manifest.get("format") != FORMAT:
        return f"manifest format {manifest.get('format')!r}, this script reads {FORMAT}"
    digest = sources_digest(root)
    if manifest.get("sources") != digest:
        return (f"it was built from other sources (csrc/ and setup.py digest {str(manifest.get('sources'))[:12]}, "
                f"this checkout's {digest[:12]}): run benchmarks/prebuild_extension.sh again")
    build = _torch_build() if build is None else build
    for key in ("torch", "torch_git", "torch_cuda"):
        if manifest.get(key) != build.get(key):
            return f"it links against {key} {manifest.get(key)!r}, this Python has {build.get(key)!r}"
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX") if ext_suffix is None else ext_suffix
    if not str(manifest.get("library", "")).endswith(ext_suffix):
        return f"the library {manifest.get('library')!r} is not for this Python (extension suffix {ext_suffix})"
    if capability is None:
        import torch

        if not torch.cuda.is_available():
            return "torch sees no GPU"
        capability = torch.cuda.get_device_capability()
    if not _arch_matches(manifest.get("archs", []), capability):
        return (f"it holds code for {', '.join(manifest.get('archs', [])) or 'no architecture'}, "
                f"this GPU is sm_{capability[0]}{capability[1]}")
    return None


def pack(library: str, archs, out: str, root: str = ROOT) -> dict:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    name = os.path.basename(library)
    if not (name.startswith("_C.") and name.endswith(suffix)):
        raise SystemExit(f"{library} is not minicpm_int4._C for this Python (extension suffix {suffix})")
    os.makedirs(out, exist_ok=True)
    for old in os.listdir(out):
        os.remove(os.path.join(out, old))
    shutil.copy2(library, os.path.join(out, name))
    manifest = {"format": FORMAT, "library": name, "sources": sources_digest(root), "archs": list(archs),
                **_torch_build(), "python": sys.version.split()[0],
                "built": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "bytes": os.path.getsize(library)}
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def install(folder: str, root: str = ROOT) -> int:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        print(f"prebuilt _C: refused, {path} unreadable ({e})")
        return 1
    why = check(manifest, root)
    if why is not None:
        print(f"prebuilt _C: refused, {why}; the extension will be built here")
        return 1
    dst = os.path.join(root, "minicpm_int4", manifest["library"])
    shutil.copy2(os.path.join(folder, manifest["library"]), dst)
    ok, said = _loads(root)
    if not ok:
        os.remove(dst)
        print(f"prebuilt _C: refused, it does not load here ({said}); the extension will be built here")
        return 1
    print(f"prebuilt _C: installed {dst} (built {manifest.get('built')} for {', '.join(manifest['archs'])} against "
          f"torch {manifest['torch']}; sources {manifest['sources'][:12]}): {said}")
    return 0


_LOAD_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
from minicpm_int4 import ops
ext, err = ops._cuda_ext()
if ext is None:
    sys.exit(err)
from minicpm_int4 import _C
print("loaded from", _C.__file__)
"""


def _loads(root: str):
    """Whether checkout `root`'s minicpm_int4._C loads the way the package loads it (ops._cuda_ext: the import - a
    torch ABI mismatch or an undefined symbol fails there - then the schema of an op that changed), in a fresh
    interpreter as the suite's stages will: (ok, what it said)."""
    r = subprocess.run([sys.executable, "-c", _LOAD_CHECK, root], capture_output=True, text=True, timeout=300)
    said = (r.stdout.strip() if r.returncode == 0 else (r.stderr.strip() or r.stdout.strip()))
    return r.returncode == 0, said.splitlines()[-1] if said else f"exit status {r.returncode}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="copy a built library and write its manifest")
    a.add_argument("library")
    a.add_argument("--archs", required=True, help="the TORCH_CUDA_ARCH_LIST it was built for (';' or ',' between)")
    a.add_argument("--out", default=os.path.join(ROOT, ".prebuilt"))
    b = sub.add_parser("install", help="check a carried library against this checkout, torch and GPU; install it")
    b.add_argument("folder", nargs="?", default=os.path.join(ROOT, ".prebuilt"))
    args = p.parse_args(argv)
    if args.cmd == "pack":
        archs = [a for a in args.archs.replace(",", ";").replace(" ", ";").split(";") if a]
        m = pack(args.library, archs, args.out)
        print(f"{args.out}: {m['library']} ({m['bytes'] / 2**20:.1f} MiB) for {', '.join(archs)}, torch {m['torch']}, "
              f"sources {m['sources'][:12]}")
        return 0
    return install(args.folder)


if __name__ == "__main__":
    sys.exit(main())
