"""Entry point: ``python -m rlhf_lit fit --config configs/demo.yaml``."""

from rlhf_lit.cli import main

if __name__ == "__main__":
    main()
