"""Train the GPU preset's tokenizer: a 32,768-token byte-level BPE on the training split of the
corpus that scripts/build_gpu_corpus.py builds, saved beside it, so that no run on the GPU
machine spends its time fitting one (configs/experiments/gpu-compare.yaml names the file).

Run from the repository root, after the corpus:  python scripts/build_gpu_tokenizer.py
Writes data/gpu-corpus/tokenizer.json (with its tokenizer_config.json and checksums.json).
"""

import argparse
import json
import lzma
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_lab.data.tokenizer import train_bpe  # noqa: E402


def texts(path: Path):
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "gpu-corpus")
    parser.add_argument("--vocab-size", type=int, default=32768)
    args = parser.parse_args()
    started = time.monotonic()
    tokenizer = train_bpe(texts(args.corpus / "train.jsonl.xz"), args.vocab_size)
    tokenizer.save(args.corpus)
    took = time.monotonic() - started
    print(f"wrote {args.corpus / 'tokenizer.json'}: {tokenizer.vocab_size} tokens in {took:.0f} s")


if __name__ == "__main__":
    main()
