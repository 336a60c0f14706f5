"""Build (once) and print the offline demo's tiny base model and SFT adapter folders.

    python scripts/build_demo_assets.py [--cache-dir DIR] [--write-prompts prompts/demo_prompts.jsonl]
"""

import argparse
import logging

from rlhf_lit.demo_assets import ensure_demo_assets, write_demo_prompts

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=None, help="default: $RLHF_LIT_CACHE or ~/.cache/rlhf_lit")
    ap.add_argument("--write-prompts", default=None, help="also (re)write the demo prompt JSONL here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.write_prompts:
        print("prompts:", write_demo_prompts(args.write_prompts))
    assets = ensure_demo_assets(args.cache_dir)
    print("base:", assets.base_dir)
    print("sft_adapter:", assets.sft_adapter_dir)
