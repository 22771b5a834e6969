"""How many of the served model's canonical weights (engine/quant.py, bf16 serving) bf16 represents exactly:
a VDPBF16PS kernel (benchmarks/probes/dpbf16_rounding.cpp) would multiply bf16 weights, so every other weight
would change (issue 23, part 3). Per GGUF tensor type over every quantised tensor of the embedded SmolLM2 file.

    python -m sparkserve.benchmarks.probes.canonical_bf16_share --out bench_results/int4c_canonical_bf16_share.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from sparkserve.engine.gguf_loader import open_gguf
from sparkserve.engine.loader import default_model_path
from sparkserve.engine.quant import gguf_block_quant


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_results/int4c_canonical_bf16_share.json")
    args = ap.parse_args(argv)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # type -> [bf16-exact, all]
    for tensor in open_gguf(default_model_path()).tensors:
        kind = tensor.tensor_type.name
        shape = tuple(int(s) for s in reversed(tensor.shape))
        block = gguf_block_quant(np.asarray(tensor.data), kind, shape) if len(shape) == 2 else None
        if block is None:
            continue
        w = block.canonical(torch.bfloat16)  # [N, K] fp32
        counts[kind][0] += int((w.to(torch.bfloat16).float() == w).sum())
        counts[kind][1] += w.numel()
    result = {kind: {"bf16_exact": e, "weights": n, "share": round(e / n, 4)} for kind, (e, n) in counts.items()}
    Path(args.out).write_text(json.dumps({"model": str(default_model_path().name), "types": result}, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
