"""End-to-end prefill benchmark (LLaVA-1.5 shape): full against keep in {192, 128, 64} of 576.

    python benchmarks/bench_prefill.py [--shape hidden,layers,text,image] [--device cuda]
        prints the table and appends rows to benchmarks/results/prefill.csv (same as
        `autoselect bench --op prefill --results benchmarks/results`)

Defaults: CPU 1024,8,64,576 fp32 (reduced width); GPU 4096,32,64,576 bf16 (the LLaVA-1.5-7B language
model). Setup and measurement live in autoselect.bench.prefill.
"""

import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    from autoselect.cli import main

    sys.exit(main(["bench", "--op", "prefill", "--results", RESULTS, *sys.argv[1:]]))
