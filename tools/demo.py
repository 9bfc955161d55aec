#!/usr/bin/env python3
"""`make demo`: compress the authentic GenderNet at T = 0.95 and print the summary.

Validation uses natural-image probes (the sample photos that come with the model's package are
whole scenes, not face crops), so the data-free fidelity contract applies. Accuracy on real
faces is measured by `make gendernet`.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from caffe_compress import cli, zoo  # noqa: E402


def main() -> int:
    model = zoo.fetch("gendernet")
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    args = [str(model.deploy), str(model.weights), "--tradeoff", "0.95", "-o", str(out / "gendernet-0.95"),
            "--json", str(out / "gendernet-0.95.json")]
    print("caffe-compress " + " ".join(args), flush=True)
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
