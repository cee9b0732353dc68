"""Reading `cuobjdump -sass` output: instructions with their addresses, and the loops.

Shared by kernels/aot.py (Triton kernels) and kernels/csrc_inspect.py (the CUDA extension)."""
from __future__ import annotations

import re
from collections import Counter
from typing import List, Tuple

# /*0a40*/  @!P0 LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;   (addresses grow past 4 hex digits)
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)([^;]*);")


def parse(sass: str) -> Tuple[List[Tuple[int, str]], List[Tuple[int, int]]]:
    """(instructions as (address, opcode with modifiers), loops as (first, last) address spans: a
    span closed by a backward branch)."""
    instrs: List[Tuple[int, str]] = []
    spans: List[Tuple[int, int]] = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        addr, op = int(m.group(1), 16), m.group(2) + m.group(3)
        instrs.append((addr, op))
        if m.group(2) == "BRA":
            target = re.search(r"0x([0-9a-f]+)", m.group(4))
            if target and int(target.group(1), 16) < addr:
                spans.append((int(target.group(1), 16), addr))
    return instrs, spans


def counts(instrs: List[Tuple[int, str]], lo: int = 0, hi: int = 1 << 62) -> Counter:
    """Opcode counts of the instructions in [lo, hi], NOPs left out."""
    return Counter(op for a, op in instrs if lo <= a <= hi and op != "NOP")


def loop_bodies(sass: str) -> List[Counter]:
    """Opcode counts of every loop body, innermost (shortest) first."""
    instrs, spans = parse(sass)
    return [counts(instrs, lo, hi) for lo, hi in sorted(spans, key=lambda s: s[1] - s[0])]
