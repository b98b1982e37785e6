"""`python -m skip2lora.bench --worker SPEC`: the benchmark's worker process."""

import sys

from .worker import worker_main

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        print("usage: python -m skip2lora.bench --worker SPEC_JSON (run `skip2lora benchmark` instead)", file=sys.stderr)
        sys.exit(2)
    sys.exit(worker_main(sys.argv[2]))
