"""Put a trained rlhf_lit adapter where social-sim looks for persona adapters.

    python scripts/export_social_sim.py outputs/cluster13_toxicity_rlhf/adapter \
        --loras-path /path/to/social-sim/loras --cluster 13 --suffix -rlhf-tox
"""

import argparse
import sys

from rlhf_lit.export import SOCIAL_SIM_TEMPLATE, export_for_social_sim, join_dash_values


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter_dir", help="an adapter exported by rlhf_lit (run folder's adapter/)")
    ap.add_argument("--loras-path", required=True, help="social-sim's loras folder")
    ap.add_argument("--cluster", type=int, required=True, help="persona cluster id i")
    ap.add_argument("--template", default=SOCIAL_SIM_TEMPLATE, help="social-sim's lora_name_template")
    ap.add_argument("--suffix", default="", help="appended to the folder name, e.g. -rlhf-tox")
    args = ap.parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
    path = export_for_social_sim(args.adapter_dir, args.loras_path, args.cluster, args.template, args.suffix)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
