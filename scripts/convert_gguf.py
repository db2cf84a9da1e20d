"""Convert a llama-family GGUF file (llama.cpp) into an HF folder ctxjax loads.

    python scripts/convert_gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m

Every tensor is dequantized to float32 (the numbers llama.cpp computes with); the folder gets
config.json, model.safetensors, generation_config.json and the tokenizer with its chat template.
Needs `pip install gguf` (and transformers, for the tokenizer). Bad input exits with status 2.
"""

import argparse
import sys

from ctxjax.host_memory import exec_with_caching_allocator

if __name__ == "__main__":
    # First of all: the process is replaced, and the imports below (jax and the rest, about a
    # second) would otherwise run in both.
    exec_with_caching_allocator()  # re-executes with mimalloc preloaded on a CPU host

from ctxjax.gguf import convert_gguf
from ctxjax.hf import HFFolderError


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", help="the .gguf file")
    p.add_argument("out", help="the HF folder to write (replaced atomically if it exists)")
    args = p.parse_args(argv)
    try:
        path = convert_gguf(args.src, args.out)
    except (HFFolderError, ImportError) as e:  # GGUFError is an HFFolderError
        p.exit(2, f"error: {e}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
